"""Optimize your own nn.Module: no workload class needed, just inputs and (optionally) an eval function.

    python examples/optimize_own_model.py
"""
import torch

import optistack as ost

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512), torch.nn.LayerNorm(512),
).eval()
inputs = torch.randn(64, 512)
target = model(inputs).argmax(-1)


def agreement(m) -> float:
    """Fraction of rows whose arg-max is unchanged: higher is better."""
    with torch.no_grad():
        return float((m(inputs).argmax(-1) == target).float().mean())


result = ost.optimize(
    model, inputs, pipeline="prune-magnitude{sparsity=0.5},compile",
    eval_fn=agreement, higher_is_better=True, max_accuracy_drop=0.05,
)
result.report.print()
print(result.report.to_markdown())

# Without eval_fn the metric is the relative output error against your unoptimized model.
plain = ost.optimize(model, inputs, pipeline="cast{dtype=bf16}", verbose=False)
print("bf16 relative output error:", plain.report.steps[0].accuracy.after)
