"""SmolLM2-135M-Instruct exported once to an OpenVINO IR with int4 weights (optimum-intel), cached.

The source is the bundled GGUF written as a plain Hugging Face folder (`optistack.bundled_models.smollm2_dir()`:
`save_pretrained` with `hf_quantizer=None`, plus the tokenizer; cached under `~/.cache/optistack`). optimum-intel
exports it (`optimum-cli export openvino --task text-generation-with-past --weight-format int4 --group-size 64
--ratio 1.0`, no `--sym`: asymmetric int4 with integer zero points, OpenVINO's default int4 export; NNCF keeps the
tied embedding / `lm_head` matrix in its int8 asymmetric backup, as it does by default) and converts the tokenizer
with openvino_tokenizers, which OpenVINO GenAI needs even when it is given token ids.

optimum-intel 2.2 pins transformers<5.6 and huggingface-hub<1.22, older than optistack's, so it lives in its own
virtualenv and runs as a subprocess (`make bench-peers` makes `.venv-optimum-intel`; `OPTISTACK_OPTIMUM_INTEL_PYTHON`
names another interpreter). The IR goes to `<cache>/openvino-genai/<name>/`, written to a temporary folder and renamed
into place, with a marker of what made it: a rerun with the same source and settings reuses it.

`random_llama_dir` makes a second source: a Llama of a given shape with seeded random weights and SmolLM2's
vocabulary and tokenizer (llm_pipeline_peers.py's `llama-1.1b`), saved once as a HF folder with a marker.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "OPTISTACK_OPTIMUM_INTEL_PYTHON"
DEFAULT_VENV = ROOT / ".venv-optimum-intel"
MARKER = "optistack-export.json"
INSTALL_HINT = ("the OpenVINO GenAI peer's int4 export needs optimum-intel, which pins transformers<5.6 and so cannot "
                "share .venv: `make .venv-optimum-intel/.installed` (or `make bench-peers`) makes its own venv, or point "
                f"{PYTHON_ENV} at an interpreter with optimum-intel[openvino]==2.2.0")
SETTINGS = {"task": "text-generation-with-past", "weight_format": "int4", "group_size": 64, "sym": False, "ratio": 1.0}


class ExportUnavailable(RuntimeError):
    """The export cannot be made here (no optimum-intel interpreter); the message says how to get one."""


def exporter_python() -> str:
    """The interpreter with optimum-intel: $OPTISTACK_OPTIMUM_INTEL_PYTHON, .venv-optimum-intel, or this one."""
    candidates = [os.environ.get(PYTHON_ENV), str(DEFAULT_VENV / "bin" / "python"), sys.executable]
    for python in filter(None, candidates):
        if not Path(python).is_file():
            if python == os.environ.get(PYTHON_ENV):
                raise ExportUnavailable(f"{PYTHON_ENV}={python}: no such interpreter")
            continue
        probe = subprocess.run([python, "-c", "import optimum.intel, openvino_tokenizers"], capture_output=True, text=True)
        if probe.returncode == 0:
            return python
    raise ExportUnavailable(INSTALL_HINT)


def _versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('optimum-intel', 'optimum', 'openvino', 'openvino-tokenizers', 'nncf', 'transformers', 'torch')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _stamp(source: Path, versions: dict[str, str]) -> dict[str, Any]:
    try:
        origin = json.loads((source / "optistack-source.json").read_text())
    except (OSError, ValueError):
        origin = {"folder": source.name}
    return {"source": origin, "settings": SETTINGS, "versions": versions}


def _valid(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("stamp") == stamp
    except (OSError, ValueError):
        return False


def random_llama_dir(name: str, shape: tuple[int, ...], root: str | Path, seed: int = 0) -> Path:
    """`<root>/<name>-random-seed<seed>-hf`: shape (hidden, intermediate, layers, heads, kv heads), SmolLM2's vocab."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from optistack.bundled_models import smollm2_dir

    hidden, inter, layers, heads, kv = shape
    stamp = {"random_llama": name, "seed": seed, "shape": [hidden, inter, layers, heads, kv, 49152],
             "tokenizer": "SmolLM2-135M-Instruct"}
    root, source = Path(root), "optistack-source.json"  # _stamp puts this file's content in the IR's marker
    target = root / f"{name}-random-seed{seed}-hf"
    if (target / source).is_file() and json.loads((target / source).read_text()) == stamp:
        return target
    print(f"building {name} with seeded random weights in {target} (once)", file=sys.stderr, flush=True)
    src = smollm2_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        torch.manual_seed(seed)
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # SmolLM2's
        LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
            **ids)).eval().save_pretrained(tmp)
        GenerationConfig(**ids).save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        (tmp / source).write_text(json.dumps(stamp))  # written last: marks the folder complete
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def compression_info(folder: str | Path) -> dict[str, str]:
    """What NNCF wrote into the IR's rt_info (mode, group_size, ratio, backup_mode, all_layers): the export as made."""
    text = Path(folder, "openvino_model.xml").read_text(errors="replace")
    keys = ("mode", "group_size", "ratio", "backup_mode", "all_layers")
    found = {k: m.group(1) for k in keys if (m := re.search(rf'<{k} value="([^"]*)"', text))}
    return found


def export_int4(source: str | Path, cache_root: str | Path, name: str = "smollm2-135m-instruct-int4-asym-g64",
                log: Any = None) -> tuple[Path, dict[str, Any]]:
    """(the IR folder, its marker: source, settings, versions, seconds, command); exported on first use."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    source = Path(source)
    root = Path(cache_root) / "openvino-genai"
    target = root / name
    try:
        python = exporter_python()
    except ExportUnavailable:  # no exporter here: an export of the same source with the same settings still serves
        try:
            marker = json.loads((target / MARKER).read_text())
        except (OSError, ValueError):
            raise ExportUnavailable(INSTALL_HINT) from None
        have, want = marker.get("stamp", {}), _stamp(source, {})
        if have.get("source") != want["source"] or have.get("settings") != want["settings"]:
            raise ExportUnavailable(INSTALL_HINT) from None
        return target, marker
    stamp = _stamp(source, _versions(python))
    if _valid(target, stamp):
        return target, json.loads((target / MARKER).read_text())
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(source),
           "--task", SETTINGS["task"], "--weight-format", SETTINGS["weight_format"],
           "--group-size", str(SETTINGS["group_size"]), "--ratio", str(SETTINGS["ratio"]), str(tmp)]
    log(f"openvino export: {' '.join(cmd[2:])}")
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        missing = [f for f in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
                   if not (tmp / f).is_file()]
        if run.returncode or missing:
            raise RuntimeError(f"optimum-cli export failed (exit {run.returncode}"
                               f"{', missing ' + ', '.join(missing) if missing else ''}):\n{run.stderr[-3000:]}")
        marker = {"stamp": stamp, "seconds": round(time.perf_counter() - started, 1), "command": cmd[2:],
                  "compression": compression_info(tmp), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))  # written last: marks the folder complete
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"openvino export: {target} in {marker['seconds']:.0f} s ({marker['compression']})")
    return target, marker
