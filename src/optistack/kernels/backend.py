"""The one interface every kernel backend module implements (cpu.py, cuda.py, triton/, reference.py).

`modules.py` and the `fuse-kernels` pass talk to backends only through these functions, so a new
backend is a module with them; `tests/kernels/test_backend_contract.py` checks each one against it.
Semantics (exact results, layouts) are those of `reference.py`.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..core.requirements import Availability

BACKENDS = {"cpu-cpp": "optistack.kernels.cpu", "triton": "optistack.kernels.triton",
            "cuda": "optistack.kernels.cuda", "torch": "optistack.kernels.reference"}


@runtime_checkable
class KernelBackend(Protocol):
    """What `backend_module(name)` returns."""

    def available(self) -> Availability:
        """Cheap (never compiles); not ok with the reason when this machine cannot run the backend."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> Any:
        """Llama RMSNorm; with `residual`, (norm(x + residual), x + residual)."""

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up."""

    def int4_prepack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int) -> dict[str, torch.Tensor]:
        """The backend's own layout of an int4 weight (codes 0..15, w = (q - 8) * scale + zero)."""

    def int4_matmul_packed(self, x: torch.Tensor, packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
        """x @ w.T for a weight in the layout `int4_prepack` made."""

    def int4_matmul(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
        """One-shot form of the two above (packs every call: for tests)."""


def missing(module: Any) -> list[str]:
    """Names of the interface's functions `module` lacks (empty: it is a backend)."""
    wanted = [n for n in KernelBackend.__dict__ if not n.startswith("_") and callable(KernelBackend.__dict__[n])]
    return [n for n in wanted if not callable(getattr(module, n, None))]
