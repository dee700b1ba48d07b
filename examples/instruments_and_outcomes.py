"""How a step ends: your own pass and instrument, and the runner's verdicts (applied, skipped, rejected, failed).

    python examples/instruments_and_outcomes.py

- a pass that finds nothing to change returns `modified=False`: the step is skipped with its reason;
- a pass that does not apply to this workload raises `PreconditionError`: skipped, not failed;
- a pass that raises anything else fails, and the report keeps its traceback;
- an instrument refuses a candidate by raising `Reject(reason)`; the gate (finite outputs, accuracy
  budget) is on even when you pass only your own instruments.
"""
import torch

import optistack as ost
from optistack.bench.progress import ProgressInstrument
from optistack.core.errors import PreconditionError
from optistack.core.outcome import Reject
from optistack.workloads.generic import GenericWorkload


class HalveConvs(ost.ConfiguredPass):
    """Halves every Conv2d weight; a model with no Conv2d has nothing to change."""

    name = "example-halve-convs"

    def apply(self, model, ctx):
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        if not convs:
            return ost.PassResult(model, modified=False, info={"reason": "no Conv2d layer in the model"})
        with torch.no_grad():
            for conv in convs:
                conv.weight.mul_(0.5)
        return ost.PassResult(model, info={"convs": len(convs)})


class LlmOnly(ost.ConfiguredPass):
    name = "example-llm-only"

    def apply(self, model, ctx):
        if ctx.workload is None or ctx.workload.kind != "causal-lm":
            raise PreconditionError(f"{self.name}: serves causal-lm workloads; this one is {ctx.workload.kind}")
        return ost.PassResult(model)


class Poison(ost.ConfiguredPass):
    name = "example-poison"

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return ost.PassResult(model)


class Crash(ost.ConfiguredPass):
    name = "example-crash"

    def apply(self, model, ctx):
        raise KeyError("layer 'blocks.3' not found")


class MaxParams:
    """An instrument with a policy of its own: refuse any candidate with more parameters than a limit."""

    def __init__(self, limit):
        self.limit = limit

    def after_pass(self, p, step, candidate, state):
        n = sum(t.numel() for t in candidate.parameters())
        if n > self.limit:
            raise Reject(f"{n} parameters > limit {self.limit}")


class Widen(ost.ConfiguredPass):
    name = "example-widen"

    def apply(self, model, ctx):
        return ost.PassResult(torch.nn.Sequential(model, torch.nn.Linear(64, 64)))


for cls in (HalveConvs, LlmOnly, Poison, Crash, Widen):
    ost.register_pass(cls)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
workload = GenericWorkload(model, torch.randn(16, 64))
pipeline = ost.Pipeline.parse("example-halve-convs,example-llm-only,example-poison,example-crash,"
                              "example-widen,prune-magnitude{sparsity=0.2}")

# No benchmark here: only progress lines and a parameter limit; the gate is added (last) all the same.
result = pipeline.run(workload, instruments=[ProgressInstrument(), MaxParams(10_000)], max_accuracy_drop=0.3)
for step in result.report.steps:
    print(f"{step.text:<32} {step.status:<8} {step.reason or ''}")
crash = next(s for s in result.report.steps if s.status == "failed")
print("\nthe failed step's traceback, as kept in the JSON report:\n" + crash.traceback)
assert [s.status for s in result.report.steps] == ["skipped", "skipped", "rejected", "failed", "rejected", "applied"]
