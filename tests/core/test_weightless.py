"""Loading without the weights twice (core.weightless, core.load_tensors.read_tensors): a saved model's base is
built on meta with its non-persistent buffers computed as a real build computes them, or built for real where
that cannot be vouched for; the file's tensors are read into memory of their own; loading a saved int4 model
never holds its float base."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from optistack.core.errors import LoadError
from optistack.core.load_tensors import read_tensors
from optistack.core.weightless import meta_tensor_attributes, weightless_replacement, weightless_transformers
from optistack.testing import models

BUILDERS = {
    "llama": lambda: models.tiny_llama(),
    "llama-rope-scaled": lambda: models.tiny_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "bert": lambda: models.tiny_bert(),
    "gpt2": lambda: models.tiny_gpt2(),
    "gpt-neox": lambda: models.tiny_gpt_neox(),
    "phi3": lambda: models.tiny_phi3(),
    "opt": lambda: models.tiny_opt(),
    "t5": lambda: models.tiny_t5(),
}


def non_persistent_values(model):
    return {f"{n}.{b}": m._buffers[b] for n, m in model.named_modules()
            for b in sorted(m._non_persistent_buffers_set) if m._buffers.get(b) is not None}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_a_weightless_base_has_a_real_builds_buffers_and_no_weights(arch):
    real = BUILDERS[arch]()
    model, why = weightless_transformers(BUILDERS[arch])
    if model is None:  # refused: then it must say why, and the loader builds for real
        assert why
        return
    assert all(p.is_meta for p in model.parameters())
    want, got = non_persistent_values(real), non_persistent_values(model)
    assert set(got) == set(want)
    for name, value in want.items():
        assert not got[name].is_meta, name
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_the_architectures_people_load_are_built_weightless():
    for arch in ("llama", "llama-rope-scaled", "gpt2", "phi3"):
        model, why = weightless_transformers(BUILDERS[arch])
        assert model is not None, f"{arch}: {why}"


class Computed(torch.nn.Module):
    """A non-persistent buffer no _init_weights computes."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(8.0), persistent=False)

    def _init_weights(self, module):
        pass


class NeedsValues(Computed):
    """An _init_weights that reads its parameters' values (which meta tensors do not have)."""

    def _init_weights(self, module):
        if module is self:
            self.table.copy_(torch.arange(8.0) * float(self.lin.weight.sum()))


class Stray(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.cache = [torch.zeros(3)]


def test_what_cannot_be_vouched_for_is_refused_by_name():
    model, why = weightless_transformers(Computed)
    assert model is None and "table" in why
    model, why = weightless_transformers(Stray)
    assert model is None and "cache" in why
    model, why = weightless_transformers(NeedsValues)
    assert model is None and "_init_weights fails" in why
    with torch.device("meta"):
        assert meta_tensor_attributes(Stray()) == ["cache"]
        assert not weightless_replacement(Stray())
        assert weightless_replacement(torch.nn.Linear(4, 4))
        assert not weightless_replacement(Computed())


def test_read_tensors_reads_what_safetensors_wrote(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(-4, 4), "u8": torch.arange(256).to(torch.uint8),
        "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    got = read_tensors(path, "t.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    got["f32"].add_(1)  # memory of its own: writable, and the file is untouched
    assert torch.equal(read_tensors(path, "t.safetensors")["f32"], tensors["f32"])


def test_read_tensors_refuses_a_file_cut_short(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(LoadError, match="does not fit"):
        read_tensors(path, "t.safetensors")


LOAD_PEAK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import LlamaForCausalLM
    import optistack as ost

    def hwm():
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

    before = hwm()
    model = ost.load_model(sys.argv[1])
    print(json.dumps({"grew": hwm() - before}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_a_saved_int4_model_never_holds_its_float_base(tmp_path):
    """A Llama whose float32 weights are ~78 MB, saved as int4 (~12 MB): the loading process's peak grows by
    less than half the float model (it grew by more than the float model when the base was built for real)."""
    from optistack.core.pass_protocol import PassContext
    from optistack.core.persist import save_model
    from optistack.core.pipeline import Pipeline

    def base():
        return models.tiny_llama(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                                 num_attention_heads=8, num_key_value_heads=4)

    model = base()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    chain = "rtn-int4{group_size=64}"
    quantized = Pipeline.parse(chain).apply(model, PassContext()).model

    class Step:
        status, pass_name, text, config, info = "applied", "rtn-int4", chain, {"group_size": 64}, {}

    with torch.device("meta"):
        original = base()
    save_model(tmp_path / "m", quantized, original, [Step()], {})
    script = tmp_path / "peak.py"
    script.write_text(LOAD_PEAK)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "m")], capture_output=True, text=True,
                         check=True)
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew"]
    assert fp32 > 70e6
    assert grew < 0.5 * fp32, f"loading grew the peak by {grew / 1e6:.0f} MB for a {fp32 / 1e6:.0f} MB float model"
