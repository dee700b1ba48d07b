"""save_gguf for Qwen2 and Qwen3: llama.cpp's "qwen2"/"qwen3" graphs (rows in transformers' order, Qwen2's
q/k/v biases, Qwen3's per-head q/k norms), read back by an independent reader: transformers' own GGUF
loader (gguf-py's block decoder, its own tensor-name map and config from the metadata) must rebuild a
model whose weights and logits are our quantized model's, up to fp16's rounding of the block scales."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_gguf_out import tiny_tokenizer  # noqa: E402

from optistack.checkpoints import CheckpointError, save_gguf  # noqa: E402
from optistack.core.pass_protocol import PassContext  # noqa: E402
from optistack.core.pipeline import Pipeline  # noqa: E402


def tiny(kind: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=20000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(kind, **(shape | extra))
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and biases away from their ones and zeros, so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, tok


def _dequantized(model):
    """A float copy of a quantized model: every int4/int8 layer replaced by nn.Linear of its own weight."""
    from optistack.layers.int4 import Int4Linear

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, Int4Linear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.float())
            out.set_submodule(name, lin)
    return out


# Qwen3 at head size 128 over hidden 128 (4 heads: 512 wide), as every Qwen3 size has; transformers' GGUF loader
# does not read attention.key_length back (it takes Qwen3Config's default 128), llama.cpp does
@pytest.mark.parametrize("kind,head_dim", [("qwen2", None), ("qwen3", 128)])
@pytest.mark.parametrize("text,ggml", [("rtn-int4{group_size=64,zero_point=false}", "Q4_0"),
                                       ("rtn-int4{group_size=32,zero_grid=float}", "Q4_1")])
def test_transformers_reads_back_our_weights_and_logits(tmp_path, kind, head_dim, text, ggml):
    from transformers import AutoModelForCausalLM

    model, tok = tiny(kind, **({"head_dim": head_dim} if head_dim else {}))
    quant = Pipeline.parse(text).apply(copy.deepcopy(model), PassContext()).model
    written = save_gguf(tmp_path / "m.gguf", quant, tokenizer=tok)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(written.path)).fields.items()}
    assert fields["general.architecture"] == kind
    assert fields[f"{kind}.rope.freq_base"] == pytest.approx(20000.0)
    assert fields.get(f"{kind}.attention.key_length") == head_dim  # written where heads are not hidden / count
    assert written.type_counts()[ggml] == 2 * 7
    names = {t.name for t in written.tensors}
    assert ({"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names) == (kind == "qwen3")
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    want = _dequantized(quant)
    theirs, ours = back.state_dict(), want.state_dict()
    assert set(theirs) == set(ours)
    for name, w in ours.items():
        assert theirs[name].shape == w.shape, name
        assert (theirs[name] - w).abs().max() <= 1e-3 * w.abs().max() + 1e-6, name  # fp16 block scales
    ids = tok("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = back(ids).logits, want(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_sliding_window_layers_are_refused(tmp_path):
    model, tok = tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(CheckpointError, match="sliding-window"):
        save_gguf(tmp_path / "s.gguf", model, tokenizer=tok)
    assert not (tmp_path / "s.gguf").exists()


def test_a_module_the_qwen3_graph_has_no_place_for_is_named(tmp_path):
    model, tok = tiny("qwen3")
    model.model.layers[0].self_attn.extra = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.extra \(a Linear\) has no place in "
                                              r"llama.cpp's qwen3 graph"):
        save_gguf(tmp_path / "x.gguf", model, tokenizer=tok)


def test_smollm3_is_written_as_llamas_rows_and_only_with_llama_cpps_nope_layers(tmp_path):
    """SmolLM3: llama.cpp's smollm3 graph reads q/k rows in the llama order and skips RoPE in every fourth layer
    (no key says so), so only that pattern is written."""
    from test_gguf_out import _unpermute

    model, tok = tiny("smollm3", num_hidden_layers=4, pad_token_id=0)
    written = save_gguf(tmp_path / "s.gguf", model, tokenizer=tok, float_type="f32")
    r = gguf.GGUFReader(str(written.path))
    assert r.fields["general.architecture"].contents() == "smollm3"
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}
    q = model.model.layers[3].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(_unpermute(tensors["blk.3.attn_q.weight"], 4), q)
    odd, _ = tiny("smollm3", num_hidden_layers=4, pad_token_id=0, no_rope_layers=[1, 0, 1, 1])
    with pytest.raises(CheckpointError, match=r"every fourth layer; this model's no_rope_layers is \[1, 0, 1, 1\]"):
        save_gguf(tmp_path / "o.gguf", odd, tokenizer=tok)
