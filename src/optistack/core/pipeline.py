"""`Pipeline`: an ordered list of passes that is itself a pass, with a text form that round-trips.

`Pipeline.parse("int8-dynamic,compile")` builds it; `str(p)` prints text that parses to an equal
pipeline. A pipeline given as one of the passes contributes its passes in place (one flat chain: each
pass is its own measured step, and the text still parses back). Model forms are checked at parse time,
so a pass that cannot take what the previous one gives is refused with a message naming both, before
anything runs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from .errors import OptistackError, PipelineParseError
from .pass_protocol import MODULE, PassContext, PassResult, form_after, pass_text
from .registry import get_pass_class
from .syntax import parse_pipeline_text

_preset_expander: Callable[[str], str] | None = None  # set by the API layer: core imports nothing above it


def set_preset_expander(fn: Callable[[str], str]) -> None:
    """Called by `optistack/__init__.py`: how `@name` in pipeline text expands (`optistack.presets`)."""
    global _preset_expander
    _preset_expander = fn


_FORM_WORDS = {"module": "an eager torch module", "compiled": "a torch.compile'd model",
               "onnx": "an ONNX Runtime model", "engine": "a TensorRT engine"}


class Pipeline:
    """A sequence of passes; applying it applies each in order (no measurement: see `run`).
    `Pipeline([Pipeline.parse("a,b"), c])` is the chain a,b,c."""

    name = "pipeline"

    def __init__(self, passes: Iterable[Any] = (), start_form: str = MODULE) -> None:
        self.passes = _flatten(passes)
        self.start_form = start_form
        self.config = None
        self.preset: str | None = None  # the text as written when it named a preset (`@llm-decode`)
        check_forms(self.passes, start_form)

    @classmethod
    def parse(cls, text: str, start_form: str = MODULE) -> "Pipeline":
        """Build from pipeline text; `@name` presets expand for this machine (`optistack.presets`,
        installed from above with `set_preset_expander`), and `str()` then prints the expansion."""
        used: list[str] = []

        def expand(preset: str) -> str:
            if _preset_expander is None:
                raise PipelineParseError(f"'@{preset}' names a preset, but no presets are installed "
                                         "(import optistack installs them)")
            used.append(preset)
            return _preset_expander(preset)

        passes = []
        for name, options in parse_pipeline_text(text, expand=expand):
            pass_cls = get_pass_class(name)
            passes.append(pass_cls(**options))
        pipeline = cls(passes, start_form)
        pipeline.preset = " ".join(text.split()) if used else None
        return pipeline

    @property
    def takes(self) -> frozenset[str]:
        return self.passes[0].takes if self.passes else frozenset({self.start_form})

    @property
    def gives(self) -> str | None:
        form = self.start_form
        for p in self.passes:
            form = form_after(p, form)
        return form

    def requirements(self) -> Any:
        from .requirements import all_of

        return all_of(*(p.requirements() for p in self.passes))

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        modified, info = False, {}
        for p in self.passes:
            result = p.apply(model, ctx)
            model, modified = result.model, modified or result.modified
            info.update({f"{p.name}.{k}": v for k, v in result.info.items()})
        return PassResult(model, modified, info)

    def run(self, workload: Any, *, max_accuracy_drop: float | None = None, timing: Any = None,
            instruments: Sequence[Any] | None = None, verbose: bool = True) -> Any:
        """Apply every pass to `workload` (a workload or its name), measured and gated by the default
        instruments (benchmark, progress, gate) through `core.run.Runner`: `optistack.wiring.run_pipeline`,
        the one entry path, which the package installs as core's default wiring."""
        from .run import run_pipeline

        return run_pipeline(self, workload, max_accuracy_drop=max_accuracy_drop, timing=timing,
                            instruments=instruments, verbose=verbose)

    def __str__(self) -> str:
        return ",".join(pass_text(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)


def _flatten(passes: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for p in passes:
        out.extend(_flatten(p.passes) if isinstance(p, Pipeline) else [p])
    return out


def check_forms(passes: Sequence[Any], start_form: str = MODULE) -> None:
    """Refuse a chain where a pass cannot take the form the previous pass gives."""
    form, previous = start_form, None
    for p in passes:
        for attr in ("name", "apply", "takes"):
            if not hasattr(p, attr):
                raise OptistackError(f"{p!r} is not a pass: it has no '{attr}' attribute")
        if form not in p.takes:
            takes = " or ".join(_FORM_WORDS.get(f, f) for f in sorted(p.takes))
            after = f"after '{previous.name}', which gives {_FORM_WORDS.get(form, form)}" if previous else \
                f"on {_FORM_WORDS.get(form, form)}"
            hint = f"; put '{p.name}' before '{previous.name}'" if previous and start_form in p.takes else ""
            raise PipelineParseError(f"pass '{p.name}' cannot run {after}: it takes {takes}{hint}")
        form, previous = form_after(p, form), p
