"""Merge a LoRA adapter into SmolLM2 and measure it against the unmerged PeftModel.

A random-init adapter (nonzero B) stands in for a fine-tuned one: the point is the cost of carrying
the adapter at serving time, and that merging changes nothing but that.

    python examples/lora_merge.py
"""
import torch
from peft import LoraConfig, get_peft_model

import optistack as ost
from optistack.workloads.smollm2 import SmolLM2Workload

wl = SmolLM2Workload(seq_len=256)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
peft_model = get_peft_model(wl.model, lora)
torch.manual_seed(0)
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.002)  # small: a plausible fine-tune, perplexity stays near the base model's
wl.model = peft_model.eval()  # the workload now measures the unmerged adapter as its baseline

result = ost.Pipeline.parse("lora-merge").run(wl, max_accuracy_drop=1e-4)  # perplexity within 1e-4 relative
result.report.print()
