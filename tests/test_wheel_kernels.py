"""A wheel with the prebuilt C++ kernels, installed in a clean venv where no compiler is on PATH: the
decode engine runs, every variant this CPU can run computes what the reference does, nothing is compiled
(the kernel cache stays empty), and another torch release is refused with one reason naming both.

Compiling the five CPU variants takes many minutes on 2 cores, so `make test` skips this file: `make
wheel-check` builds the wheel with `python -m build` and runs it ($OPTISTACK_WHEEL names the wheel;
$OPTISTACK_WHEEL_CHECK=1 builds one from a copy of the tree instead)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_wheel_install import ROOT, _build_wheel, _run  # noqa: E402

from optistack.kernels import build, prebuilt  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("OPTISTACK_WHEEL") and os.environ.get("OPTISTACK_WHEEL_CHECK") != "1",
                                 reason="compiles every kernel variant (many minutes): run `make wheel-check`"),
              pytest.mark.skipif(not build.is_x86(), reason="the prebuilt kernels are x86-64 builds")]
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "cpp", "ld", "as", "ninja", "nvcc")


def _no_compiler_bin(tmp: Path) -> Path:
    """A directory of links to /usr/bin and /bin without any compiler, linker, assembler or ninja."""
    out = tmp / "bin-without-compilers"
    out.mkdir()
    for d in (Path("/usr/bin"), Path("/bin")):
        for f in d.iterdir():
            n = f.name
            bad = n in COMPILERS or any(c in n for c in ("gcc", "g++", "c++", "clang")) or n.startswith("x86_64-")
            if not bad and not (out / n).exists():
                (out / n).symlink_to(f)
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(wheel, venv python, env without a compiler, kernel cache dir): torch, transformers and the wheel."""
    tmp = tmp_path_factory.mktemp("wheel-kernels")
    wheel = Path(os.environ["OPTISTACK_WHEEL"]) if os.environ.get("OPTISTACK_WHEEL") else _build_wheel(tmp, kernels=True)
    _run([sys.executable, "-m", "venv", str(tmp / "venv")], cwd=tmp)
    python = tmp / "venv" / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile", "-c", str(ROOT / "constraints.txt")]
    _run(pip + ["torch"], cwd=tmp)
    _run(pip + [str(wheel), f"transformers=={importlib.metadata.version('transformers')}"], cwd=tmp)
    cache, home = tmp / "kernel-cache", tmp / "home"
    cache.mkdir(), home.mkdir()
    assert not os.environ.get("CXX") and not os.environ.get("CC"), "unset $CC/$CXX: this check hides the compilers"
    env = {"PATH": f"{python.parent}:{_no_compiler_bin(tmp)}", "OPTISTACK_KERNEL_CACHE": str(cache), "HOME": str(home),
           "TORCH_EXTENSIONS_DIR": str(home / "ext")}
    return wheel, python, env, cache


def _json(python: Path, code: str, env: dict, cwd: Path) -> dict:
    return json.loads(_run([str(python), "-c", code], cwd=cwd, env=env).stdout.strip().splitlines()[-1])


def test_the_wheel_carries_every_variant_built_against_the_pinned_torch(venv):
    wheel = venv[0]
    names = zipfile.ZipFile(wheel).namelist()
    manifest = json.loads(zipfile.ZipFile(wheel).read("optistack/kernels/_prebuilt/manifest.json"))
    pin = next(ln.split("==")[1].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
               if ln.startswith("torch=="))
    assert manifest["torch"].split("+")[0] == pin
    assert set(manifest["cpu"]) == set(prebuilt.VARIANTS)
    for lib in manifest["cpu"].values():
        assert f"optistack/kernels/_prebuilt/{lib}" in names
    assert wheel.name.endswith("linux_x86_64.whl"), wheel.name


ENGINE = """
import copy, json, os, shutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.kernels import cpu, prebuilt
torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
model = LlamaForCausalLM(config).eval()
result = Pipeline.parse("rtn-int4{head=int8},decode-engine{prefill=engine}").apply(copy.deepcopy(model), PassContext())
prompt = torch.randint(0, 300, (2, 9))
gen = greedy_decode(result.model, prompt, 8)
print(json.dumps({"engine": getattr(result.model, "optistack_decode", None) is not None, "variant": prebuilt.cpu_choice().variant,
                  "isa": cpu.isa(), "agreement": result.info.get("decode-engine.top1_agreement"),
                  "tokens": list(gen.tokens.shape), "compiler": [shutil.which(c) for c in ("c++", "gcc", "g++")],
                  "file": cpu.lib().__file__}))
"""


def test_the_decode_engine_runs_where_no_compiler_is(venv, tmp_path):
    _, python, env, cache = venv
    if "avx512_vnni" not in build.cpu_flags():
        pytest.skip("the decode engine needs AVX512-VNNI; this CPU does not have it")
    out = _json(python, ENGINE, env, tmp_path)
    assert out["compiler"] == [None, None, None]
    assert out["variant"] == prebuilt.choose_variant(build.cpu_flags(), list(prebuilt.VARIANTS))
    assert out["isa"] == prebuilt.variant_isa(out["variant"])[0]
    assert "/site-packages/optistack/kernels/_prebuilt/" in out["file"]
    assert out["engine"] and out["tokens"] == [2, 8] and out["agreement"] >= 0.9
    assert not any(cache.iterdir()), f"something was compiled into {cache}: {list(cache.iterdir())}"


KERNELS = """
import json, sys
import torch
from optistack.kernels import build, cpu, prebuilt, reference
build.cpu_flags = lambda: set(prebuilt.VARIANTS[sys.argv[1]])  # this CPU as one of the variant's class
torch.manual_seed(0)
x, w = torch.randn(3, 256), torch.randn(256)
codes, scale, zero = torch.randint(0, 16, (64, 256), dtype=torch.uint8), torch.rand(64, 4) / 8, torch.full((64, 4), 8.0)
q8, s8 = torch.randint(-127, 128, (64, 256), dtype=torch.int8), torch.rand(64) / 64
err = lambda a, b: float((a - b).abs().max() / b.abs().max())
print(json.dumps({"variant": prebuilt.cpu_choice().variant, "isa": cpu.isa(),
                  "rms_norm": err(cpu.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)),
                  "int4": err(cpu.int4_matmul(x, codes, scale, zero, 64), reference.int4_matmul(x, codes, scale, zero, 64)),
                  "int8": err(cpu.int8_matmul(x, q8, s8), reference.int8_matmul(x, q8, s8))}))
"""


@pytest.mark.parametrize("variant", list(prebuilt.VARIANTS))
def test_each_variant_this_cpu_runs_matches_the_reference(venv, tmp_path, variant):
    _, python, env, cache = venv
    if not prebuilt.VARIANTS[variant] <= build.cpu_flags():
        pytest.skip(f"this CPU cannot run the {variant} build")
    out = json.loads(_run([str(python), "-c", KERNELS, variant], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert out["variant"] == variant and out["isa"] == prebuilt.variant_isa(variant)[0]
    assert out["rms_norm"] < 1e-5 and out["int4"] < 2e-2 and out["int8"] < 2e-2, out
    assert not any(cache.iterdir())


def test_another_torch_release_is_refused_without_a_compiler(venv, tmp_path):
    _, python, env, cache = venv
    code = "from optistack.kernels import prebuilt; print(prebuilt.DIRECTORY / prebuilt.MANIFEST)"
    path = Path(_run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip())
    original = path.read_text()
    path.write_text(json.dumps({**json.loads(original), "torch": "2.12.0+cpu"}))
    try:
        code = ("import json, torch; from optistack.kernels import cpu; "
                "print(json.dumps([torch.__version__, cpu.available().reason]))")
        version, reason = json.loads(_run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    finally:
        path.write_text(original)
    assert "torch 2.12.0+cpu" in reason and f"torch {version}" in reason and "compiler" in reason, reason
    assert not any(cache.iterdir())
