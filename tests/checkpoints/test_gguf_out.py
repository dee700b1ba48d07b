"""save_gguf: the file gguf's own reader reads back, dequantized by gguf's own (independent) block
decoder, equals our quantized layers' weights up to fp16 rounding of the block scales; the
metadata llama.cpp needs is there; what cannot map is refused before a byte is written."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optistack.checkpoints import CheckpointError, save_gguf  # noqa: E402
from optistack.core.pass_protocol import PassContext  # noqa: E402
from optistack.core.pipeline import Pipeline  # noqa: E402


def tiny_tokenizer():
    """A byte-level BPE with merges (tiny_folders' 256-token one is all alphabet, no merges)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:12]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def llama_folder(path: Path, tie: bool = False) -> Path:
    """A tiny Llama folder whose vocab_size is its tokenizer's length (llama.cpp needs every id in range)."""
    from optistack.testing import tiny_llama

    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=tie).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _load(llama_folder(tmp_path_factory.mktemp("src") / "llama"))


def _apply(model, text: str, int8_head: bool = False):
    out = Pipeline.parse(text).passes[0].apply(copy.deepcopy(model), PassContext()).model
    if int8_head:  # what `head=int8` makes, without building the C++ int8 kernel
        from optistack.layers.int8 import Int8Linear

        out.lm_head = Int8Linear.from_linear(model.lm_head, kernel="torch")
    return out


def _read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in r.tensors}
    return {k: f.contents() for k, f in r.fields.items()}, tensors


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row order, written independently: rows (head, i, half) -> (head, half, i)."""
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def _ours(layer) -> np.ndarray:
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight(torch.float32).numpy()
    return layer.weight.detach().float().numpy()


def _check_weights(m, tensors, tol_rel: float) -> None:
    cfg = m.config
    for i in range(cfg.num_hidden_layers):
        blk = m.model.layers[i]
        for short, layer, heads in (("attn_q", blk.self_attn.q_proj, cfg.num_attention_heads),
                                    ("attn_k", blk.self_attn.k_proj, cfg.num_key_value_heads),
                                    ("attn_v", blk.self_attn.v_proj, None), ("attn_output", blk.self_attn.o_proj, None),
                                    ("ffn_gate", blk.mlp.gate_proj, None), ("ffn_up", blk.mlp.up_proj, None),
                                    ("ffn_down", blk.mlp.down_proj, None)):
            _, got = tensors[f"blk.{i}.{short}.weight"]
            got = _unpermute(got, heads) if heads else got
            want = _ours(layer)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= tol_rel * np.abs(want).max(), f"blk.{i}.{short}"


def test_float_llama_metadata_names_and_rope_order(model, tmp_path):
    written = save_gguf(tmp_path / "f.gguf", model, float_type="f32")
    fields, tensors = _read(written.path)
    cfg = model.config
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0  # ALL_F32
    for key, value in (("llama.block_count", 2), ("llama.embedding_length", 64), ("llama.feed_forward_length", 128),
                       ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
                       ("llama.rope.dimension_count", 16), ("llama.context_length", 256), ("llama.vocab_size", cfg.vocab_size)):
        assert fields[key] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # <unk> <s> </s> <pad>: control tokens
    assert len(fields["tokenizer.ggml.merges"]) > 0 and " " in fields["tokenizer.ggml.merges"][0]
    assert "output.weight" in tensors  # untied head
    assert len(tensors) == 1 + 2 * 9 + 2
    _check_weights(model, tensors, 0.0)  # F32: exact, with q/k rows back in HF order
    assert tensors["blk.0.attn_q.weight"][1].tolist() != _ours(model.model.layers[0].self_attn.q_proj).tolist()


@pytest.mark.parametrize("text,kind", [
    ("rtn-int4{group_size=32,zero_grid=integer}", "Q4_1"),
    ("rtn-int4{group_size=64,zero_grid=float}", "Q4_1"),
    ("rtn-int4{group_size=128,zero_point=false}", "Q4_0"),
])
def test_int4_layers_match_gguf_dequantization(model, tmp_path, text, kind):
    ours = _apply(model, text, int8_head="group_size=32" in text)
    written = save_gguf(tmp_path / "q.gguf", ours)
    fields, tensors = _read(written.path)
    assert tensors["blk.1.ffn_down.weight"][0] == kind
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind}"))
    _check_weights(ours, tensors, 2e-3)  # fp16 rounding of d and m only
    head_kind = "Q8_0" if "group_size=32" in text else "F16"
    assert tensors["output.weight"][0] == head_kind
    assert np.abs(tensors["output.weight"][1] - _ours(ours.lm_head)).max() <= 2e-3 * np.abs(_ours(ours.lm_head)).max()
    reported = {t.name: t for t in written.tensors}
    assert reported["blk.0.attn_q.weight"].ggml_type == kind
    assert reported["blk.0.attn_q.weight"].max_abs_error < 2e-3 * np.abs(_ours(ours.model.layers[0].self_attn.q_proj)).max()
    assert "int4 g" in written.summary()


def test_tied_head_is_left_to_token_embd_unless_quantized(tmp_path):
    tied = _load(llama_folder(tmp_path / "tied", tie=True))
    _, tensors = _read(save_gguf(tmp_path / "t.gguf", tied).path)
    assert "output.weight" not in tensors and tensors["token_embd.weight"][0] == "F16"
    quant = _apply(tied, "rtn-int4{group_size=32}", int8_head=True)
    _, tensors = _read(save_gguf(tmp_path / "h.gguf", quant).path)
    assert tensors["output.weight"][0] == "Q8_0"  # the int8 copy of the tied head is its own tensor


@pytest.mark.parametrize("text,match", [
    ("group_size=16", r"model\.layers\.1\.mlp\.up_proj: int4 group_size 16 is not a multiple of 32"),
    ("fp8", r"model\.layers\.0\.self_attn\.q_proj is a Fp8Linear"),
])
def test_what_cannot_map_is_refused_naming_the_layer(model, tmp_path, text, match):
    if text == "fp8":
        ours = _apply(model, text)
    else:  # the passes take 32..256; a hand-built layer of 16 (the dequant kernel) must still be refused
        from optistack.layers.int4 import DEQUANT, Int4Linear

        ours = _apply(model, "rtn-int4{group_size=32}")
        ours.model.layers[1].mlp.up_proj = Int4Linear.from_linear(model.model.layers[1].mlp.up_proj, 16, kernel=DEQUANT)
    with pytest.raises(CheckpointError, match=match):
        save_gguf(tmp_path / "x.gguf", ours)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_other_architectures_and_shapes_are_refused(tmp_path):
    from optistack.testing import tiny_gpt2, tiny_llama

    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        save_gguf(tmp_path / "g.gguf", tiny_gpt2())
    from optistack.layers.int8 import Int8Linear

    odd = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)  # float: any width maps
    odd.model.layers[0].mlp.up_proj = Int8Linear.from_linear(odd.model.layers[0].mlp.up_proj, kernel="torch")
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj: in_features 48 is not a multiple of 32"):
        save_gguf(tmp_path / "s.gguf", odd)
    with pytest.raises(CheckpointError, match="needs the tokenizer"):
        save_gguf(tmp_path / "n.gguf", tiny_llama())
    with pytest.raises(ValueError, match="float_type"):
        save_gguf(tmp_path / "n.gguf", tiny_llama(), float_type="bf16")


def test_cli_save_format_gguf(model, tmp_path, capsys):
    """`--save X --save-format gguf` after a run (the run itself is covered by test_cli_save.py)."""
    from optistack.cli import build_parser, save_result
    from optistack.wiring import RunResult

    args = build_parser().parse_args(["run", "--pipeline", "identity", "--save", "m.gguf", "--save-format", "gguf"])
    assert args.save_format == "gguf"
    text = "rtn-int4{group_size=32}"
    result = RunResult(_apply(model, text), None, model, Pipeline.parse(text))
    save_result(result, str(tmp_path / "m.gguf"), args.save_format)
    assert "int4 g32 asymmetric" in capsys.readouterr().err
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.description"].endswith(text) and len(tensors) == 21
    assert tensors["blk.0.ffn_up.weight"][0] == "Q4_1" and tensors["output.weight"][0] == "F16"  # head skipped


def test_gptq_rounding_maps_the_same_way(model, tmp_path):
    """GPTQ changes which codes are chosen, not the grid: its layers map onto Q4_1 as exactly."""
    from optistack.testing import tiny_llama_workload

    wl = tiny_llama_workload(model, vocab_size=model.config.vocab_size)
    ours = Pipeline.parse("gptq{group_size=32,calib_samples=2,calib_seq_len=16}").passes[0].apply(
        copy.deepcopy(model), PassContext(workload=wl)).model
    _, tensors = _read(save_gguf(tmp_path / "g.gguf", ours).path)
    assert tensors["blk.0.attn_k.weight"][0] == "Q4_1"
    _check_weights(ours, tensors, 2e-3)


def test_fused_and_decode_engine_forms_write_what_the_int4_layers_write(tmp_path):
    """`@llm-decode`'s model holds fuse-kernels' FusedInt4Linear (gate and up stacked) and decode-engine's
    EngineInt4Linear views: its GGUF holds the same weights as the Int4Linear model's it came from."""
    from optistack.kernels import cpu
    from optistack.kernels.build import cpu_flags
    from optistack.testing import tiny_llama

    if not cpu.available() or "avx512_vnni" not in cpu_flags():
        pytest.skip("the decode engine needs the C++ CPU kernels and AVX512-VNNI")
    tok = tiny_tokenizer()
    base = tiny_llama(vocab_size=len(tok), hidden_size=128, intermediate_size=256, max_position_embeddings=256)
    plain = Pipeline.parse("rtn-int4{head=int8,zero_grid=float}").apply(base, PassContext()).model
    fused = Pipeline.parse("fuse-kernels").apply(copy.deepcopy(plain), PassContext()).model
    engine = Pipeline.parse("decode-engine{check_prompts=0,scales=float32}").apply(copy.deepcopy(fused),
                                                                                    PassContext()).model
    assert hasattr(fused.model.layers[0].mlp, "gate_up") and type(engine.model.layers[0].mlp.down_proj).__name__ \
        == "EngineInt4Linear"
    _, want = _read(save_gguf(tmp_path / "plain.gguf", plain, tokenizer=tok).path)
    for name, m in (("fused", fused), ("engine", engine)):
        written = save_gguf(tmp_path / f"{name}.gguf", m, tokenizer=tok)
        _, got = _read(written.path)
        assert sorted(got) == sorted(want), name
        for key, (kind, w) in want.items():
            assert got[key][0] == kind, (name, key)
            assert np.abs(got[key][1] - w).max() <= 1e-3 * max(np.abs(w).max(), 1e-6), (name, key)
    assert "decode engine" in written.summary()


def test_int8_embedding_rows_are_written_as_q8_0(tmp_path):
    """embed-int8's rows: Q8_0 blocks whose dequantization (gguf's decoder) is our table up to the fp16
    rounding of each row's scale."""
    tied = _load(llama_folder(tmp_path / "tied", tie=True))
    quant = _apply(_apply(tied, "rtn-int4{group_size=32}", int8_head=True), "embed-int8")
    _, tensors = _read(save_gguf(tmp_path / "e.gguf", quant).path)
    kind, got = tensors["token_embd.weight"]
    want = quant.model.embed_tokens.weight.numpy()
    assert kind == "Q8_0" and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
