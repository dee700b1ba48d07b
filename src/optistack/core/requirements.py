"""What a pass needs to run here, checked before `apply` so a skip says why instead of crashing."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Availability:
    """`ok` with no reason, or not ok with one sentence a user can act on."""

    ok: bool
    reason: str | None = None

    @staticmethod
    def yes() -> "Availability":
        return Availability(True)

    @staticmethod
    def no(reason: str) -> "Availability":
        return Availability(False, reason)

    def __bool__(self) -> bool:
        return self.ok


def need_packages(*modules: str, extra: str | None = None) -> Availability:
    """Check importability without importing (find_spec keeps `optistack passes` fast)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return Availability.yes()
    hint = f"pip install 'optistack[{extra}]'" if extra else "pip install " + " ".join(missing)
    return Availability.no(f"package(s) {', '.join(missing)} not installed; {hint}")


def need_cuda(min_capability: tuple[int, int] | None = None) -> Availability:
    """CUDA present (and at least `min_capability`), else a reason naming what was found."""
    import torch

    if not torch.cuda.is_available():
        return Availability.no("needs a CUDA GPU; none is visible to torch on this machine")
    if min_capability is not None:
        cap = torch.cuda.get_device_capability()
        if cap < min_capability:
            want = f"{min_capability[0]}.{min_capability[1]}"
            return Availability.no(f"needs compute capability >= {want}; this GPU is {cap[0]}.{cap[1]}")
    return Availability.yes()


def all_of(*checks: Availability) -> Availability:
    """First failing check wins, so the reason shown is the first thing to fix."""
    for check in checks:
        if not check.ok:
            return check
    return Availability.yes()
