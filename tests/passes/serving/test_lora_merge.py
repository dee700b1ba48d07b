"""`lora-merge`: a random (nonzero B) LoRA adapter on a tiny Llama merges to the same outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_workload

from optistack.core.errors import PassApplyError
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.core.run import run_pipeline
from optistack.passes.serving.lora_merge import LoraMergePass

peft = pytest.importorskip("peft")


def lora_model(seed: int = 0, adapters: tuple[str, ...] = ("default",)):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(vocab_size=128)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # peft initializes B to zero (a no-op adapter); make it do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def test_merged_model_matches_the_adapter_and_drops_it():
    model = lora_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    result = LoraMergePass().apply(copy.deepcopy(model), PassContext())
    merged = result.model
    out = logits(merged, ids)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert result.info["lora_layers_merged"] == 6  # 3 targets x 2 layers
    with model.disable_adapter():
        assert not torch.allclose(logits(model, ids), ref, atol=1e-3)  # the adapter mattered


def test_merge_one_named_adapter():
    model = lora_model(adapters=("first", "second"))
    model.set_adapter("second")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = logits(model, ids)
    merged = LoraMergePass(adapter="second").apply(copy.deepcopy(model), PassContext()).model
    assert torch.allclose(logits(merged, ids), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(PassApplyError, match="no adapter named .third.*first, second"):
        LoraMergePass(adapter="third").apply(copy.deepcopy(model), PassContext())


def test_refuses_a_model_without_adapters():
    with pytest.raises(PassApplyError, match="lora-merge: needs a peft PeftModel"):
        LoraMergePass().apply(tiny_llama(vocab_size=128), PassContext())


def test_pipeline_outputs_within_1e_4_of_the_adapter():
    """The bar: the merged model's outputs equal the unmerged adapter's (relative error, gated)."""
    model = lora_model()
    wl = tiny_llama_workload(model)
    result = run_pipeline(Pipeline.parse("lora-merge"), wl, max_accuracy_drop=1e-4, verbose=False,
                          timing=_quick())
    step = result.report.steps[0]
    assert step.status == "applied", step.reason
    assert step.accuracy.after < 1e-5  # relative output error vs the unmerged adapter


def _quick():
    from optistack.bench.timer import TimingConfig

    return TimingConfig(warmup=1, min_rounds=3, max_rounds=3)


def test_refuses_a_workload_that_is_not_a_causal_lm_unless_told():
    from types import SimpleNamespace

    ctx = PassContext(workload=SimpleNamespace(kind="encoder", name="minilm"))
    with pytest.raises(PassApplyError, match=r"lora-merge: a serving pass for causal LMs.*causal_lm_only=false"):
        LoraMergePass().apply(copy.deepcopy(lora_model()), ctx)
    assert LoraMergePass(causal_lm_only=False).apply(copy.deepcopy(lora_model()), ctx).modified
