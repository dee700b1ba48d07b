"""`optistack.testing`: SQNR reads what it should, the tiny models run, the hardware markers say why."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import optistack.testing as ot


def test_sqnr_of_identical_tensors_is_inf_and_of_scaled_noise_is_its_db():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert ot.sqnr(x, x) == math.inf
    for db in (20.0, 40.0, 60.0):
        noise = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 10 ** (-db / 20)
        assert ot.sqnr(x, x + noise) == pytest.approx(db, abs=0.3)


def test_sqnr_edge_cases():
    zero = torch.zeros(4)
    assert ot.sqnr(zero, zero) == math.inf
    assert ot.sqnr(zero, torch.ones(4)) == -math.inf
    assert math.isnan(ot.sqnr(torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])))
    assert ot.sqnr(torch.ones(4, dtype=torch.bfloat16), torch.full((4,), 0.5, requires_grad=True)) == pytest.approx(
        20 * math.log10(2))
    with pytest.raises(ValueError, match=r"shape \(4,\) but approximation has \(2, 2\)"):
        ot.sqnr(torch.ones(4), torch.ones(2, 2))


@pytest.mark.parametrize("name", sorted(ot.ARCHITECTURES))
def test_every_tiny_architecture_runs_a_forward_and_is_reproducible(name):
    build, inputs = ot.ARCHITECTURES[name]
    x = inputs()[0]
    with torch.no_grad():
        a = build()(**x) if isinstance(x, dict) else build()(x)
        b = build()(**x) if isinstance(x, dict) else build()(x)
    a, b = (out if isinstance(out, torch.Tensor) else out[0] for out in (a, b))
    assert torch.isfinite(a).all() and torch.equal(a, b)  # seeded: the same weights every call


def test_tiny_mlp_widths_activation_and_refusal():
    mlp = ot.tiny_mlp(32, 128, 16, activation=torch.nn.ReLU)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"] and mlp(torch.randn(3, 32)).shape == (3, 16)
    assert ot.tiny_mlp()(torch.randn(2, 16)).shape == (2, 8)
    with pytest.raises(ValueError, match="at least two positive int widths"):
        ot.tiny_mlp(8)


def test_tiny_bert_classifier_and_llama_workload():
    logits = ot.tiny_bert(num_labels=3)(**ot.token_inputs(n=1)[0]).logits
    assert logits.shape == (1, 3)
    wl = ot.tiny_llama_workload(ot.tiny_llama(vocab_size=128))
    scores = wl.evaluate(wl.model)  # the original model against its own reference outputs: no error
    assert scores and all(v == 0.0 for v in scores.values())


def test_missing_names_the_absent_cpu_flags():
    assert ot.missing("amx", flags={"amx_tile", "amx_bf16", "amx_int8"}) is None
    assert ot.missing("amx", flags={"amx_tile", "avx2"}) == \
        "needs AMX tiles for bf16 and int8 (amx_tile, amx_bf16, amx_int8): this CPU's flags lack amx_bf16, amx_int8"
    assert "lack avx512_vnni" in ot.missing("avx512_vnni", flags={"avx512f"})
    assert "no CPU flags to read" in ot.missing("avx512", flags=())
    with pytest.raises(ValueError, match="unknown hardware feature 'avx9'; valid: amx, avx512"):
        ot.missing("avx9")


def test_predicates_agree_with_missing_and_the_machine():
    for feature in ot.FEATURES:
        reason = ot.missing(feature)
        assert ot.has(feature) is (reason is None)
        assert reason is None or reason.startswith(f"needs {ot.FEATURES[feature]}: ")
    assert ot.has_cuda() is torch.cuda.is_available()
    assert ot.has_amx() is ({"amx_tile", "amx_bf16", "amx_int8"} <= ot.cpu_flags())
    assert ot.has_avx512_vnni() is ("avx512_vnni" in ot.cpu_flags())


def test_cxx_compiler_follows_the_cxx_variable(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/bin/c++ -O2")
    assert ot.cxx_compiler() is None and not ot.has_cxx_compiler()
    assert ot.missing("cxx").endswith("$CXX='/nonexistent/bin/c++ -O2' is not an executable on PATH")
    monkeypatch.setenv("CXX", sys.executable)  # any executable on PATH stands in for a compiler here
    assert ot.cxx_compiler() == sys.executable and ot.has_cxx_compiler()


def test_requires_is_a_skip_marker_with_every_reason():
    marker = ot.requires("cuda", "cxx")
    reasons = [r for r in (ot.missing("cuda"), ot.missing("cxx")) if r]
    assert marker.mark.name == "skipif" and marker.mark.args == (bool(reasons),)
    assert marker.mark.kwargs["reason"] == ("; ".join(reasons) or "has cuda, cxx")
    assert ot.requires_cuda.mark.args == (not ot.has_cuda(),)
    with pytest.raises(ValueError, match="valid: amx"):
        ot.requires()
    with pytest.raises(ValueError, match="unknown hardware feature 'gpu'"):
        ot.requires("gpu")


def test_import_optistack_does_not_import_testing_and_testing_does_not_import_pytest():
    code = ("import sys, optistack; assert 'optistack.testing' not in sys.modules; "
            "import optistack.testing; assert 'pytest' not in sys.modules, 'pytest imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
