"""The pass contract: any object with `name`, `config`, `requirements()` and `apply()` is a pass.

A `Protocol`, not a base class (LLVM's new pass manager): third-party passes need not inherit anything.
`ConfiguredPass` is an optional mixin that supplies the constructor, equality and text form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from .config import PassConfig, build_config, format_value
from .requirements import Availability

# What a model *is* between passes. A pass declares the forms it takes and the form it gives, so a
# pipeline like "compile,int8-dynamic" is refused when parsed rather than failing deep inside torch.
MODULE = "module"  # an eager torch.nn.Module whose weights can be edited
COMPILED = "compiled"  # a torch.compile'd callable: runs like the module, but is no longer edited
ONNX = "onnx"  # an ONNX Runtime session behind the workload's calling convention
ENGINE = "engine"  # a TensorRT engine behind the same calling convention
FORMS = (MODULE, COMPILED, ONNX, ENGINE)


@dataclass
class PassResult:
    """What `apply` returns: the model and an honest flag saying whether anything changed.

    `info` carries facts for the report (e.g. how many weights were pruned); JSON scalars only. With
    `modified=False` the runner ends the step `skipped`, giving `info["reason"]` (or "nothing to
    change") as the reason, and the step does not count as applied.
    """

    model: Any
    modified: bool = True
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may consult while it runs: the workload (for calibration data) and the device."""

    workload: Any = None
    device: str = "cpu"

    def calibration_inputs(self, n: int = 8) -> list[Any]:
        """Inputs in the workload's calling convention, for passes that calibrate on data."""
        if self.workload is None or not hasattr(self.workload, "calibration_inputs"):
            return []
        return list(self.workload.calibration_inputs(n))


@runtime_checkable
class Pass(Protocol):
    name: str
    config: PassConfig
    takes: frozenset[str]
    gives: str | None

    def requirements(self) -> Availability: ...

    def apply(self, model: Any, ctx: PassContext) -> PassResult: ...


class ConfiguredPass:
    """Optional mixin: `Config` class attribute + `__init__(config=None, **options)` + text form.

    Subclasses set `name`, `Config`, and optionally `takes`/`gives`, then implement `apply`.
    `apply` must leave the model it is given untouched if it raises (the pipeline hands each pass a
    private copy, so mutating that copy in place is fine).
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    takes: ClassVar[frozenset[str]] = frozenset({MODULE})
    gives: ClassVar[str | None] = None  # None: gives the form it was given
    lossy: ClassVar[bool] = False  # informational: may change outputs beyond float rounding
    reapply_on_load: ClassVar[bool] = False  # its effect lives outside tensors (hooks): rerun it on load
    # A control that exists to be measured although it changes nothing (identity checks the benchmark);
    # any other pass returning `modified=False` ends its step skipped ("nothing to change").
    measure_unmodified: ClassVar[bool] = False
    # True: it never writes into a tensor of its input (it swaps in new modules/parameters), so the
    # runner may hand it a copy that shares the tensors (`core.model_copy`); default: a deep copy.
    copy_on_write: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError(f"{self.name}: pass either a config or options, not both")
        if config is None:
            config = build_config(self.name, self.Config, options)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: config must be {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def requirements(self) -> Availability:
        return Availability.yes()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and getattr(other, "config", None) == self.config

    def __hash__(self) -> int:
        return hash((self.name, self.config))

    def __str__(self) -> str:
        return pass_text(self)

    def __repr__(self) -> str:
        return f"<pass {pass_text(self)}>"


def pass_text(p: Any) -> str:
    """`name{k=v,...}` with only non-default options, the inverse of pipeline parsing."""
    cfg = getattr(p, "config", None)
    opts = cfg.to_dict(non_default_only=True) if isinstance(cfg, PassConfig) else {}
    if not opts:
        return str(p.name)
    body = ",".join(f"{k}={_quote(format_value(v))}" for k, v in opts.items())
    return f"{p.name}{{{body}}}"


def _quote(text: str) -> str:
    if text == "" or any(ch in text for ch in ',{}="\' '):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def config_of(p: Any) -> dict[str, Any]:
    cfg = getattr(p, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else {}


def form_after(p: Any, form_in: str) -> str:
    gives = getattr(p, "gives", None)
    return gives if gives is not None else form_in
