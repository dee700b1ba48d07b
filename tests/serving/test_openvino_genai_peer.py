"""The OpenVINO GenAI serving peer (benchmarks/peers/) without OpenVINO GenAI: its module imports lazily, and a
missing package, a bad request field or a missing exporter is one clear error. The peer itself is measured by
`pytest benchmarks/peers/test_server_peers.py -s` (`make bench-peers`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from optistack.serving.backend import SamplingParams, ServingError

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_peer_{name}", PEERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_backend_module_imports_without_openvino():
    before = {m for m in ("openvino", "openvino_genai") if m in sys.modules}
    _load("openvino_genai_backend")
    assert {m for m in ("openvino", "openvino_genai") if m in sys.modules} == before


def test_missing_openvino_genai_is_refused_with_the_install_hint(monkeypatch, tmp_path):
    backend = _load("openvino_genai_backend")
    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # find_spec -> None, import -> ImportError
    ok, why = backend.available()
    assert not ok and "pip install 'optistack[peers]'" in why
    with pytest.raises(ServingError, match="openvino-genai"):
        backend.OpenVINOGenAIBackend(tmp_path)


def test_a_negative_seed_is_refused_naming_the_field():
    backend = _load("openvino_genai_backend")
    with pytest.raises(ServingError, match=r"^seed=-1 .*rng_seed"):
        backend._check_supported(SamplingParams(do_sample=True, seed=-1))
    backend._check_supported(SamplingParams(do_sample=True, seed=7, min_new_tokens=2, stop_token_ids=(2,),
                                            repetition_penalty=1.2, top_k=5, top_p=0.9, temperature=0.7))


def test_exporter_interpreter_that_does_not_exist_is_named(monkeypatch):
    export = _load("openvino_export")
    monkeypatch.setenv(export.PYTHON_ENV, "/nonexistent/python")
    with pytest.raises(export.ExportUnavailable, match="/nonexistent/python"):
        export.exporter_python()


def test_compression_settings_are_read_from_the_ir(tmp_path):
    export = _load("openvino_export")
    (tmp_path / "openvino_model.xml").write_text(
        '<net><rt_info><nncf><weight_compression><all_layers value="False" /><backup_mode value="int8_asym" />'
        '<group_size value="64" /><mode value="int4_asym" /><ratio value="1.0" /></weight_compression></nncf>'
        "</rt_info></net>")
    assert export.compression_info(tmp_path) == {"mode": "int4_asym", "group_size": "64", "ratio": "1.0",
                                                 "backup_mode": "int8_asym", "all_layers": "False"}
