"""Default wiring of a run: what `Pipeline.run` and `optimize` mean by default, above core.

Core's runner knows nothing of workloads, benchmarks or reports; this module resolves a workload
name, picks the default instruments (benchmark, progress, and the gate, which is always on and always
last), records environment facts in a `Report`, hands all of it to `core.run.Runner`, and returns a
`RunResult` (the model, its report, `save` and `save_pretrained`).
`optistack/__init__.py` installs `run_pipeline` as core's default (`core.run.set_default_wiring`).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Sequence

from .core.errors import OptistackError
from .core.instrument import RunState
from .core.pass_protocol import MODULE, PassContext
from .core.run import Runner, device_of


@dataclass
class RunResult:
    model: Any  # the last accepted model, callable like the original
    report: Any  # bench.report.Report
    original: Any  # the untouched original model
    pipeline: Any
    workload: Any = None  # the workload it ran on

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def save(self, path: Any) -> Any:
        """Write the optimized model (safetensors + manifest, no pickle); `optistack.load_model(path)` reads it."""
        from .core.persist import save_model

        return save_model(path, self.model, self.original, self.report.steps, self.report.workload)

    def save_pretrained(self, path: Any, **options: Any) -> Any:
        """Write the model as a Hugging Face folder that transformers and vLLM load (compressed-tensors
        for int4/int8/fp8 weights, plain otherwise; tokenizer beside); see optistack.checkpoints."""
        from .checkpoints import save_pretrained

        return save_pretrained(path, self, **options)

    def save_gguf(self, path: Any, **options: Any) -> Any:
        """Write a Llama-family model as one GGUF file llama.cpp runs (int4 -> Q4_0/Q4_1, int8 -> Q8_0,
        float -> F16/F32, tokenizer included); see optistack.checkpoints.gguf_out."""
        from .checkpoints import save_gguf

        return save_gguf(path, self, **options)

    def __repr__(self) -> str:
        return f"<RunResult pipeline={str(self.pipeline)!r} final_speedup={self.report.final_speedup}>"


def resolve_workload(spec: Any) -> Any:
    """A workload from its registered name, itself (an object with `run`, `evaluate` and `model`), or a
    zero-argument factory returning one (search sends picklable factories to its workers). Anything
    else is one WorkloadError. The one resolver: `Pipeline.run`, `optimize` and search all use it."""
    from .core.errors import WorkloadError

    if isinstance(spec, str):
        from .workloads import load

        return load(spec)
    if all(hasattr(spec, attr) for attr in ("run", "evaluate", "model")):
        return spec
    if callable(spec) and not hasattr(spec, "parameters"):  # a factory, not a torch model
        return resolve_workload(spec())
    raise WorkloadError(f"expected a workload name, a workload object or a factory returning one; got "
                        f"{type(spec).__name__}" + (" (a model: wrap it with optistack.optimize(model, inputs, ...) "
                                                    "or workloads.GenericWorkload)" if hasattr(spec, "parameters") else ""))


def with_gate(instruments: Sequence[Any], max_accuracy_drop: float | None) -> list[Any]:
    """`instruments` with exactly one gate, placed last (it judges what the others measured).

    A gate the caller passed is kept (moved last); otherwise one is added with `max_accuracy_drop`, or
    with the budget a (deprecated) `BenchmarkInstrument(max_accuracy_drop=...)` carried.
    """
    from .bench.gate import GateInstrument

    gates = [i for i in instruments if isinstance(i, GateInstrument)]
    others = [i for i in instruments if not isinstance(i, GateInstrument)]
    if len(gates) > 1:
        raise OptistackError(f"pass at most one GateInstrument; got {len(gates)}")
    if gates and max_accuracy_drop is not None and gates[0].max_accuracy_drop != max_accuracy_drop:
        raise OptistackError(f"two accuracy budgets: max_accuracy_drop={max_accuracy_drop:g} and "
                             f"GateInstrument(max_accuracy_drop={gates[0].max_accuracy_drop}); give one")
    if not gates:
        if max_accuracy_drop is None:
            carried = [getattr(i, "max_accuracy_drop", None) for i in others]
            max_accuracy_drop = next((b for b in carried if b is not None), None)
        gates = [GateInstrument(max_accuracy_drop)]
    return others + gates


def default_instruments(max_accuracy_drop: float | None, timing: Any, verbose: bool) -> list[Any]:
    from .bench.benchmark import BenchmarkInstrument
    from .bench.progress import ProgressInstrument

    instruments: list[Any] = [BenchmarkInstrument(timing=timing)]
    if verbose:
        instruments.append(ProgressInstrument())
    return with_gate(instruments, max_accuracy_drop)


def new_report(workload: Any, pipeline_text: str, max_accuracy_drop: float | None) -> Any:
    """An empty report carrying the workload's description and the environment's facts."""
    from .bench.environment import git_commit, machine_info, package_versions
    from .bench.report import Report

    return Report(
        workload=workload.describe() | {"name": workload.name, "kind": workload.kind},
        pipeline=pipeline_text, machine=machine_info(), versions=package_versions(), baseline={},
        max_accuracy_drop=max_accuracy_drop, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def pipeline_of(pipeline: Any) -> Any:
    """The one pipeline check: text is parsed (empty or whitespace-only text, an unknown pass, a bad option
    or an order that cannot work is a `PipelineParseError` or the pass's own config error), and a
    pipeline must name at least one pass."""
    from .checks import check_pipeline, check_pipeline_text
    from .core.pipeline import Pipeline

    if isinstance(pipeline, str):
        check_pipeline_text(pipeline)
        pipeline = Pipeline.parse(pipeline)
    check_pipeline(pipeline)
    return pipeline


def run_pipeline(pipeline: Any, workload: Any, *, max_accuracy_drop: float | None = None,
                 timing: Any = None, instruments: Sequence[Any] | None = None, verbose: bool = True) -> RunResult:
    """Run `pipeline` (text or a `Pipeline`) on `workload`, measured and gated: the one entry path, which
    `optistack run`, `optimize()` and `Pipeline.run` take. Every input is checked once, here, before
    anything loads: the pipeline (`pipeline_of`), the budget (`bench.gate.check_budget`, a `BudgetError`),
    the timing; only then is the workload resolved (a name, a workload, or a factory that builds it)."""
    from .bench.gate import check_budget
    from .bench.report import Step
    from .checks import check_original_finite, check_timing

    pipeline = pipeline_of(pipeline)
    check_budget(max_accuracy_drop)
    check_timing(timing)
    workload = resolve_workload(workload)
    check_original_finite(workload)
    if instruments is None:
        instruments = default_instruments(max_accuracy_drop, timing, verbose)
    else:
        instruments = with_gate(list(instruments), max_accuracy_drop)
    budget = instruments[-1].max_accuracy_drop  # the gate's, wherever it came from
    report = new_report(workload, str(pipeline), budget)
    ctx = PassContext(workload=workload, device=device_of(workload.model))
    state = RunState(workload=workload, original=workload.model, current=workload.model,
                     form=getattr(pipeline, "start_form", MODULE), ctx=ctx, report=report)
    Runner(instruments, Step).run_all(pipeline.passes, state)
    if getattr(pipeline, "preset", None) is not None and getattr(report, "preset", None) is None:
        report.preset = pipeline.preset  # the report keeps the `@name` beside its expansion
    return RunResult(model=state.current, report=report, original=state.original, pipeline=pipeline,
                     workload=workload)
