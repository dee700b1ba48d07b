import importlib.metadata
import sys
import textwrap

import pytest

from optistack.core import registry
from optistack.core.errors import OptistackError, UnknownPassError, WorkloadError
from optistack.core.pass_protocol import ConfiguredPass, PassResult

BUILT_IN = {"identity", "cast", "compile", "int8-dynamic", "int8-weight", "prune-magnitude", "prune-structured"}


def test_built_in_passes_come_from_entry_points():
    eps = {ep.name for ep in importlib.metadata.entry_points(group="optistack.passes")}
    assert BUILT_IN <= eps
    assert BUILT_IN <= set(registry.pass_names())
    for name in BUILT_IN:
        assert registry.get_pass_class(name).name == name


def test_unknown_pass_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(UnknownPassError) as info:
        registry.get_pass_class("int8-dynamik")
    msg = str(info.value)
    assert "did you mean 'int8-dynamic'?" in msg and "identity" in msg


def test_unknown_workload_suggests_the_closest():
    with pytest.raises(WorkloadError, match="did you mean 'minilm'"):
        registry.get_workload_factory("minilmm")


def test_a_third_party_package_registers_through_the_same_entry_point_group(tmp_path, monkeypatch):
    pkg = tmp_path / "acme_passes.py"
    pkg.write_text(textwrap.dedent('''
        from optistack.core.pass_protocol import ConfiguredPass, PassResult
        class AcmePass(ConfiguredPass):
            name = "acme"
            def apply(self, model, ctx):
                return PassResult(model, modified=False)
    '''))
    dist = tmp_path / "acme_passes-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-passes\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[optistack.passes]\nacme = acme_passes:AcmePass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_points.cache_clear()
    try:
        assert "acme" in registry.pass_names()
        from optistack import Pipeline

        assert str(Pipeline.parse("acme,identity")) == "acme,identity"
    finally:
        monkeypatch.undo()
        sys.modules.pop("acme_passes", None)
        registry._entry_points.cache_clear()


def test_runtime_registration_refuses_duplicates():
    class Twice(ConfiguredPass):
        name = "test-twice"

        def apply(self, model, ctx):
            return PassResult(model)

    registry.register_pass(Twice)
    try:
        assert registry.get_pass_class("test-twice") is Twice

        class Other(Twice):
            pass

        with pytest.raises(OptistackError, match="already registered"):
            registry.register_pass(Other)
        with pytest.raises(OptistackError, match="already registered"):
            registry.register_pass(type("X", (Twice,), {"name": "identity"}))
    finally:
        registry.unregister_pass("test-twice")
