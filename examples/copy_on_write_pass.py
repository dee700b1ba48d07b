"""A pass that swaps layers declares `copy_on_write = True`: it costs only the layers it replaces.

    python examples/copy_on_write_pass.py

The runner hands such a pass a copy of the model that shares every tensor (docs/architecture.md, "Memory
per pass"); a pass that writes into a shared tensor anyway is refused before the write. Passes that do
not declare it get a deep copy. Each step records the process's peak resident memory.
"""
from __future__ import annotations

import torch

import optistack as ost
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass
from optistack.testing.models import tiny_llama, tiny_llama_workload


class HalfMlp(ConfiguredPass):
    """Replaces every MLP projection by a bfloat16 copy of it: new layers, the input's tensors untouched."""

    name = "example-half-mlp"
    copy_on_write = True

    def apply(self, model, ctx):
        for block in model.model.layers:
            for attr in ("gate_proj", "up_proj", "down_proj"):
                old = getattr(block.mlp, attr)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=False, dtype=torch.bfloat16)
                with torch.no_grad():
                    new.weight.copy_(old.weight)  # writes into the new layer: allowed
                setattr(block.mlp, attr, _Cast(new))
        return PassResult(model, info={"replaced": 3 * len(model.model.layers)})


class _Cast(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)


class ScaleNorms(ConfiguredPass):
    """Claims copy_on_write but scales the norms in place: the runner refuses the write."""

    name = "example-scale-norms"
    copy_on_write = True

    def apply(self, model, ctx):
        with torch.no_grad():
            for block in model.model.layers:
                block.input_layernorm.weight.mul_(1.5)
        return PassResult(model)


if __name__ == "__main__":
    register_pass(HalfMlp)
    register_pass(ScaleNorms)
    model = tiny_llama()
    result = ost.Pipeline.parse("example-half-mlp,example-scale-norms").run(
        tiny_llama_workload(model, vocab_size=100), instruments=[], verbose=False)
    for step in result.report.steps:
        print(f"{step.text}: {step.status}; peak RSS so far {step.peak_rss_bytes / 2**20:.0f} MiB"
              + (f"\n  {step.reason}" if step.reason else ""))
    shared = result.model.model.embed_tokens.weight is model.model.embed_tokens.weight
    print("embedding shared with the original (not copied):", shared)
    assert shared and [s.status for s in result.report.steps] == ["applied", "failed"]
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the original keeps its layers
