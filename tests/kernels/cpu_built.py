"""What the C++ CPU kernel tests share: build the kernels once per module (skip with the reason where
they cannot build), and the relative error they are judged by."""
from __future__ import annotations

import pytest

from optistack.kernels import cpu


@pytest.fixture(scope="module", autouse=True)
def built():
    avail = cpu.available()
    if not avail:
        pytest.skip(f"cpu-cpp unavailable: {avail.reason}")
    cpu.ensure_built()


def rel_err(got, want):
    """max |got - want| / max |want|, in float32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
