"""Every kernel backend module implements the one KernelBackend interface (optistack/kernels/backend.py)."""
from __future__ import annotations

import importlib

import pytest

from optistack.kernels import backend
from optistack.kernels.modules import backend_module


@pytest.mark.parametrize("name", sorted(backend.BACKENDS))
def test_backend_implements_the_interface(name):
    mod = importlib.import_module(backend.BACKENDS[name])
    assert backend.missing(mod) == []
    assert isinstance(mod.available().ok, bool)


def test_missing_names_what_a_module_lacks():
    class Half:
        def available(self):
            return None

    assert "rms_norm" in backend.missing(Half())
    assert "available" not in backend.missing(Half())


def test_backend_module_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="cpu-cpp"):
        backend_module("avx9000")


def test_old_import_path_warns_and_answers():
    import optistack.passes.kernels as old

    with pytest.warns(DeprecationWarning, match="optistack.kernels.cpu"):
        mod = old.cpu
    assert mod is importlib.import_module("optistack.kernels.cpu")
