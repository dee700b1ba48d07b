"""Weight passes on a GPT-2-style model (transformers Conv1D layers, lm_head tied to the embedding).

Builds a small GPT-2 from a config (random weights: nothing is downloaded), runs int8, int4, AWQ, fp8
and pruning on it one at a time, and prints what each did: how many layers it rewrote (Conv1D layers
become the equivalent nn.Linear first), that the tied head was left alone and why, and the model's
size before and after. Then a pass with nothing to change: it says so instead of claiming work.

Run: python examples/weight_passes_any_architecture.py
"""
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from optistack.bench.memory import model_bytes
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.workloads.generic import GenericWorkload

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, vocab_size=500,
                                   bos_token_id=0, eos_token_id=0)).eval()
g = torch.Generator().manual_seed(1)
batches = [{"input_ids": torch.randint(0, 500, (1, 32), generator=g), "use_cache": False} for _ in range(4)]
workload = GenericWorkload(model, batches[0], eval_inputs=batches[1:])  # its inputs also calibrate AWQ/Wanda
ctx = PassContext(workload)

for text in ["int8-weight", "rtn-int4{group_size=32}",
             "awq{group_size=32,calib_seq_len=32,calib_samples=4,n_grid=5}", "fp8",
             "prune-wanda{sparsity=0.5}", "prune-structured{sparsity=0.25}"]:
    p = Pipeline.parse(text).passes[0]
    result = p.apply(copy.deepcopy(model), ctx)
    err = workload.evaluate(result.model)["rel_error"]
    info = result.info
    print(f"{p.name:17s} modified={result.modified}  relative output error {err:.4f}  "
          f"bytes {model_bytes(model):,} -> {model_bytes(result.model):,}")
    if "conv1d_converted" in info:
        print(f"{'':17s} Conv1D layers converted to nn.Linear: {info['conv1d_converted']}")
    if "tied_reason" in info:  # lm_head is in the default skip of most passes; int8-weight's skip is empty
        print(f"{'':17s} left alone: {info['tied_reason']}")
    assert model_bytes(result.model) <= model_bytes(model)

# Everything skipped: the pass reports that it changed nothing, and why.
result = Pipeline.parse("rtn-int4{skip=.*}").passes[0].apply(copy.deepcopy(model), ctx)
print("rtn-int4{skip=.*}", result.modified, result.info["reason"])
assert not result.modified
