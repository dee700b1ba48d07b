"""`compile`: wrap the model in `torch.compile` (TorchDynamo + a backend, Inductor by default).

Compilation is lazy: `apply` only wraps the module; the graph is captured and compiled on the first
call, which the benchmark instrument reports separately as compile time. Later calls with new input
shapes may recompile (set `dynamic=true` to ask for shape-generic kernels up front).

The result is a COMPILED model: it runs like the module (same arguments, same outputs, attribute
access such as `.config` passes through to the original) but later passes must not edit its weights,
so weight-editing passes (quantization, pruning) belong before `compile` in a pipeline.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Literal, Optional

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError, closest
from ...core.load_registry import register_reapply
from ...core.load_schema import choice
from ...core.pass_protocol import COMPILED, MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability

# Always valid without asking dynamo (importing torch._dynamo costs ~1 s, so only done when needed).
_BUILTIN_BACKENDS = ("inductor", "eager", "aot_eager")


def _valid_backends() -> tuple[list[str], list[str]]:
    """(every registered backend, the ones worth listing in an error: no debug/testing backends)."""
    import torch._dynamo

    every = set(torch._dynamo.list_backends(exclude_tags=())) | set(_BUILTIN_BACKENDS)
    shown = set(torch._dynamo.list_backends()) | set(_BUILTIN_BACKENDS)
    return sorted(every), sorted(shown)


@dataclasses.dataclass(frozen=True)
class CompileConfig(PassConfig):
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    backend: str = "inductor"
    dynamic: Optional[bool] = None
    fullgraph: bool = False
    # Inductor folds the weights into constants and prepacks them for oneDNN (CPU). Takes effect when
    # the first call runs without autograd (workloads run under inference_mode). Measured on SmolLM2
    # decode with a static KV cache: 45.4 ms/token against 54.3 without freezing.
    freezing: bool = False
    # Inductor writes the graph's wrapper (the code that calls each kernel) in C++ instead of Python:
    # a decode step of a small LM calls hundreds of kernels, and the Python wrapper costs microseconds
    # each. Patched around calls like `freezing` (see `patch_when_compiling`).
    cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        if self.backend not in _BUILTIN_BACKENDS:
            every, shown = _valid_backends()
            check(
                self.backend in every,
                f"compile: option 'backend' must be a registered torch.compile backend such as "
                f"{', '.join(shown)}; got {self.backend!r}{closest(self.backend, every)} "
                "(torch._dynamo.list_backends(exclude_tags=()) lists debug backends too)",
            )
        check(
            self.mode == "default" or self.backend == "inductor",
            f"compile: option 'mode={self.mode}' needs backend=inductor (got backend={self.backend}); "
            "other backends take mode=default only",
        )
        for opt in ("freezing", "cpp_wrapper"):
            check(not getattr(self, opt) or self.backend == "inductor",
                  f"compile: option '{opt}=true' is an Inductor setting; got backend={self.backend}")


def _cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use for CPU kernels: $CXX, then g++, then cc."""
    for name in (os.environ.get("CXX"), "g++", "c++", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def patch_when_compiling(compiled: Any, **settings: Any) -> None:
    """Set Inductor config `settings` (freezing, cpp_wrapper) around every call of this compiled
    module (and so around each of its lazy compiles and recompiles), not for the rest of the process.
    Passing them as torch.compile options is not enough for `freezing`: Dynamo decides whether
    parameters become graph inputs from the global setting while it traces, before the option is
    applied (measured: no speedup that way)."""
    import torch._inductor.config as inductor_config

    dynamo_forward = compiled.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(**settings):
            return dynamo_forward(*args, **kwargs)

    compiled.forward = forward


def freeze_when_compiling(compiled: Any) -> None:
    """`patch_when_compiling(compiled, freezing=True)` (kept for callers of the old name)."""
    patch_when_compiling(compiled, freezing=True)


class CompilePass(ConfiguredPass):
    """`torch.compile(model, mode=..., backend=..., dynamic=..., fullgraph=...)`, compiled on first call."""

    name = "compile"
    Config = CompileConfig
    takes = frozenset({MODULE})
    gives = COMPILED

    def requirements(self) -> Availability:
        if self.config.backend == "inductor" and _cxx_compiler() is None:
            return Availability.no(
                "compile: backend=inductor generates C++ for CPU kernels but no C++ compiler was found "
                "(looked for $CXX, g++, c++, cc); install g++ or use backend=aot_eager"
            )
        return Availability.yes()

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch
        from torch._dynamo.eval_frame import OptimizedModule

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"compile: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, OptimizedModule):
            raise PassApplyError("compile: the model is already torch.compile'd; compile it once")
        cfg = self.config
        compiled = torch.compile(
            model, mode=cfg.mode, backend=cfg.backend, dynamic=cfg.dynamic, fullgraph=cfg.fullgraph
        )
        settings = {k: True for k in ("freezing", "cpp_wrapper") if getattr(cfg, k)}
        if settings:
            patch_when_compiling(compiled, **settings)
        info: dict[str, Any] = {"backend": cfg.backend, "mode": cfg.mode, "freezing": cfg.freezing,
                                "cpp_wrapper": cfg.cpp_wrapper, "lazy": True}
        from ...generation.hf_generate import carry_generate

        # a decode strategy's generate() on the module decodes through the compiled wrapper (the compiled step)
        return PassResult(carry_generate(compiled), modified=True, info=info)


register_reapply(CompilePass, {"backend": choice("inductor", "eager", "aot_eager")})
