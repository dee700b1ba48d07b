"""Save an optimized model once, load it anywhere, and see what `optistack.load_model` refuses.

    python examples/save_and_load.py [out_dir]

A tiny random-weight Llama (no download) is int4-quantized, saved (model.safetensors + optistack.json
with a SHA-256 of every file), loaded back bit-identical, then loaded from two tampered copies: each
is one LoadError that names the file or manifest key, and nothing is written or run.
See docs/saving-and-loading.md.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import optistack as ost
from optistack.core.errors import LoadError

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)).eval()
ids = torch.randint(0, 128, (1, 16))
result = ost.optimize(model, {"input_ids": ids}, "rtn-int4{group_size=32}", verbose=False)

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny-int4"
result.save(out)
manifest = json.loads((out / "optistack.json").read_text())
print("saved:", sorted(p.name for p in out.iterdir()))
print("checksums:", {name: entry["sha256"][:12] + "..." for name, entry in manifest["integrity"]["files"].items()})

loaded = ost.load_model(out)
with torch.no_grad():
    same = torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
print("loaded back bit-identical:", same)


def tampered(edit) -> Path:
    copy = out.parent / (out.name + "-tampered")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out, copy)
    edit(copy)
    return copy


def flip_a_weight_byte(folder: Path) -> None:
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-3] ^= 0x10
    (folder / "model.safetensors").write_bytes(bytes(raw))


def name_a_class_that_is_not_a_layer(folder: Path) -> None:
    """Refused by the manifest's own checksum; were that recomputed, by the exact class registry."""
    m = json.loads((folder / "optistack.json").read_text())
    m["replaced"]["model.layers.0.mlp.down_proj"]["class"] = "os:system"
    (folder / "optistack.json").write_text(json.dumps(m))


for edit in (flip_a_weight_byte, name_a_class_that_is_not_a_layer):
    try:
        ost.load_model(tampered(edit))
        print(f"{edit.__name__}: loaded (unexpected)")
    except LoadError as exc:
        print(f"{edit.__name__}: LoadError: {exc}")
