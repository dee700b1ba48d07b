"""`awq{quantize=false},gptq` with `awq_check=model` (the default): GPTQ rounds the body with AWQ's scales and a copy
with them undone, and keeps the one closer to the float model on held-out calibration windows
(awq_model_check.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from test_awq import CTX, FAST, VOCAB, held_out_ids, logits, tiny_llama

from optistack.core.errors import PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.layers.int4 import Int4Linear
from optistack.passes.quant import head as head_module
from optistack.passes.quant.awq_check import FOLDS_ATTR, AwqFold
from optistack.passes.quant.awq_model_check import Reference, judge_windows
from optistack.passes.quant.awq_search import fold_scale
from optistack.passes.quant.gptq import GptqConfig, GptqPass

QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
GPTQ = {k: v for k, v in FAST.items() if k != "search_samples"}


def wild_scale(width: int, seed: int = 0) -> torch.Tensor:
    """Per-channel factors from 1e-3 to 1e3: folded into q/k/v, a few channels own each group's range and the rest
    round to zero."""
    return 10.0 ** (torch.rand(width, generator=torch.Generator().manual_seed(seed)) * 6 - 3)


def plain_and_wild():
    """(good, bad, ds): a tiny Llama, and the same function with wild factors ds[i] folded into block i's q/k/v."""
    good = tiny_llama()
    bad = copy.deepcopy(good)
    ds = [wild_scale(64, i) for i in range(len(bad.model.layers))]
    for layer, d in zip(bad.model.layers, ds):
        fold_scale(layer.input_layernorm, [layer.get_submodule(n) for n in QKV], d)
    return good, bad, ds


class SampledText:
    """Calibration windows the float model itself would write (sampled at temperature 1, seeded): on such text a
    model's cross-entropy is the float model's entropy plus its KL from it, so the check's two scores agree (on
    random tokens a tiny random model's cross-entropy says nothing)."""

    def __init__(self, model, seq_len: int = 32) -> None:
        self.model, self.seq_len, self.windows = model, seq_len, None

    @torch.no_grad()
    def calibration_inputs(self, n: int):
        if self.windows is None or self.windows.shape[0] < n:
            g = torch.Generator().manual_seed(3)
            ids = torch.randint(0, VOCAB, (max(n, 48), 1), generator=g)
            while ids.shape[1] < self.seq_len:
                p = torch.softmax(self.model(ids).logits[:, -1].float(), -1)
                ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
            self.windows = ids
        return [((), {"input_ids": self.windows[i:i + 1]}) for i in range(n)]


def with_recorded_folds(model, s_of_block):
    """Records on `model` one q/k/v fold per block with scale `s_of_block(i)`, as the awq pass would."""
    setattr(model, FOLDS_ATTR, [AwqFold(f"model.layers.{i}", "input_layernorm", QKV, s_of_block(i))
                                for i in range(len(model.model.layers))])
    return model


def kl_to(reference, model, ids):
    p = torch.log_softmax(logits(reference, ids), -1)
    q = torch.log_softmax(logits(model, ids), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
@pytest.mark.parametrize("scales_help", [True, False])
def test_the_body_closer_to_the_float_model_is_kept(scales_help):
    """`good` has plain weights; `bad` is the same function with wild factors folded into q/k/v. Recorded as AWQ's
    scales, 1/d on `good` (undoing them would make it `bad`: kept) or d on `bad` (undoing makes it `good`: undone)."""
    good, bad, ds = plain_and_wild()
    model = with_recorded_folds(copy.deepcopy(good), lambda i: 1.0 / ds[i]) if scales_help \
        else with_recorded_folds(copy.deepcopy(bad), lambda i: ds[i])
    ref = copy.deepcopy(good)
    info = GptqPass(**GPTQ).apply(model, PassContext(SampledText(good))).info
    assert info["awq_scales_kept"] is scales_help
    assert info["awq_check_windows"] == GptqConfig().awq_check_samples
    low, high = sorted((info["awq_check_kl_with"], info["awq_check_kl_without"]))
    assert high > 3 * low  # the wild factors cost far more than the rounding
    # the text the float model writes agrees: the wild body predicts it clearly worse
    assert all(0 < info[f"awq_check_ce_{k}"] < 2 * math.log(VOCAB) for k in ("with", "without"))
    assert (info["awq_check_ce_with"] < info["awq_check_ce_without"]) is scales_help
    assert not hasattr(model, FOLDS_ATTR)
    for layer, plain in zip(model.model.layers, good.model.layers):  # the norms of the plain body either way
        assert torch.allclose(layer.input_layernorm.weight, plain.input_layernorm.weight, rtol=1e-5)
        assert isinstance(layer.self_attn.q_proj, Int4Linear)
    assert kl_to(ref, model, held_out_ids()) == pytest.approx(low, rel=0.5)  # judged on other text: the same order
    plain = GptqPass(**GPTQ).apply(copy.deepcopy(good), CTX).model  # GPTQ on the plain weights
    assert kl_to(ref, model, held_out_ids()) < 1.5 * kl_to(ref, plain, held_out_ids())


def test_awq_then_gptq_judges_the_whole_model_by_default_and_reports_both_scores():
    model = tiny_llama()
    opts = ",".join(f"{k}={v}" for k, v in GPTQ.items())
    out, result = copy.deepcopy(model), None
    for p in Pipeline.parse(f"awq{{quantize=false,n_grid=4,search_samples=4,{opts}}},gptq{{{opts}}}").passes:
        result = p.apply(out, CTX)
        out = result.model
    info = result.info
    assert isinstance(info["awq_scales_kept"], bool) and "awq_blocks_kept" not in info
    # kept: closer to the float model by more than awq_check_z (2) standard errors, and the text's cross-entropy
    # not clearly worse; the paired t statistics in info say which
    z = GptqConfig().awq_check_z
    assert info["awq_scales_kept"] is (info["awq_check_kl_t"] < -z and info["awq_check_ce_t"] < -z)
    assert (info["awq_check_kl_t"] < 0) is (info["awq_check_kl_with"] < info["awq_check_kl_without"])
    assert not hasattr(out, FOLDS_ATTR) and all(isinstance(m.self_attn.q_proj, Int4Linear) for m in out.model.layers)
    ref = logits(model, held_out_ids())
    assert float((logits(out, held_out_ids()) - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())


def test_without_held_out_windows_the_scales_are_kept_and_the_report_says_why():
    class Short:  # exactly the windows GPTQ calibrates on, no more
        def calibration_inputs(self, n):
            g = torch.Generator().manual_seed(1)
            return [((), {"input_ids": torch.randint(0, VOCAB, (1, 32), generator=g)}) for _ in range(min(n, 8))]

    model = with_recorded_folds(tiny_llama(), lambda i: torch.full((64,), 2.0))
    before = model.model.layers[0].input_layernorm.weight.clone()
    info = GptqPass(**GPTQ).apply(model, PassContext(Short())).info
    assert "no calibration windows of 32 tokens after the 8" in info["awq_check_skipped"]
    assert "awq_scales_kept" not in info and torch.equal(model.model.layers[0].input_layernorm.weight, before)
    assert judge_windows(PassContext(Short()), 8, 32, 4, "gptq") is None
    assert judge_windows(CTX, 8, 32, 4, "gptq").shape == (4, 32)


@torch.no_grad()
def test_the_reference_scores_the_float_model_itself_at_zero():
    model = tiny_llama()
    ref = Reference(model, held_out_ids(n=3))
    assert ref.scores(model)[0].abs().max() < 1e-3  # bfloat16 probabilities against exact log-probabilities
    ids = held_out_ids(n=3)  # the cross-entropy beside it: the windows' own next tokens, as torch computes it
    want = torch.stack([torch.nn.functional.cross_entropy(model(input_ids=ids[i:i + 1]).logits[0, :-1].float(),
                                                          ids[i, 1:]) for i in range(3)]).double()
    torch.testing.assert_close(ref.scores(model)[1], want, rtol=1e-5, atol=1e-5)
    noisy = copy.deepcopy(model)
    noisy.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(noisy.model.layers[0].mlp.down_proj.weight))
    assert float(ref.scores(noisy)[0].min()) > 1e-3


def test_a_failure_after_the_unscaled_body_was_chosen_puts_the_scaled_float_model_back(monkeypatch):
    good, bad, ds = plain_and_wild()
    model = with_recorded_folds(bad, lambda i: ds[i])
    blocks = list(model.model.layers)
    ids = held_out_ids()
    ref = logits(model, ids)

    def boom(*args, **kwargs):
        raise RuntimeError("head failed")

    monkeypatch.setattr(head_module, "quantize_head", boom)
    with pytest.raises(RuntimeError, match="head failed"):
        GptqPass(**GPTQ).apply(model, CTX)
    assert all(a is b for a, b in zip(model.model.layers, blocks))  # the scaled blocks, back in place
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("raw,expected", [("model", "model"), ("block", "block"), ("off", "off"), ("true", "block"),
                                          ("false", "off")])
def test_awq_check_takes_a_mode_and_the_older_booleans(raw, expected):
    (p,) = Pipeline.parse(f"gptq{{awq_check={raw}}}").passes
    assert p.config.awq_check == expected
    assert GptqConfig(awq_check=True).awq_check == "block"


def test_a_misspelt_mode_is_answered_with_the_modes():
    with pytest.raises(PassConfigError, match=r"option 'awq_check' must be one of model, block, off; got 'modle' "
                                              r"\(did you mean 'model'\?\)"):
        Pipeline.parse("gptq{awq_check=modle}")


@pytest.mark.parametrize("options,match", [
    ({"awq_check": "layer"}, "awq_check"),
    ({"awq_check_samples": 0}, "awq_check_samples"),
])
def test_bad_check_options_are_refused(options, match):
    with pytest.raises((PassConfigError, ValueError), match=match):
        GptqConfig(**options)


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox", "phi3", "opt", "llama"])
def test_every_architecture_awq_maps_gets_the_check_and_the_float_function_where_it_undoes(arch):
    """On each family awq folds scales for, both bodies are rounded and scored; the kept one is a working model
    close to the float one."""
    from test_awq import ARCHS

    model = ARCHS[arch]()
    ids = held_out_ids()
    ref = logits(model, ids)
    opts = ",".join(f"{k}={v}" for k, v in GPTQ.items())
    out, result = copy.deepcopy(model), None
    for p in Pipeline.parse(f"awq{{quantize=false,n_grid=4,search_samples=4,{opts}}},gptq{{{opts}}}").passes:
        result = p.apply(out, CTX)
        out = result.model
    assert isinstance(result.info["awq_scales_kept"], bool), result.info.get("awq_check_skipped")
    assert result.info["layers_quantized"] > 0 and not hasattr(out, FOLDS_ATTR)
    err = float((logits(out, ids) - ref).pow(2).mean()) / float(ref.pow(2).mean())
    assert err < 0.05


@pytest.mark.parametrize("mode", ["model", "block"])
def test_undoing_scales_leaves_the_model_before_the_pass_untouched(mode):
    """gptq declares copy_on_write: the runner hands it a copy sharing the tensors of the model before it and
    discards its result if any of them changed. Undoing scales (here every block's) must write fresh tensors."""
    from optistack.core.pass_protocol import MODULE
    from optistack.core.run import check_guard, pass_input

    good, bad, ds = plain_and_wild()
    before = with_recorded_folds(bad, lambda i: ds[i])
    norm = before.model.layers[0].input_layernorm.weight.clone()
    (p,) = Pipeline.parse(f"gptq{{awq_check={mode},{','.join(f'{k}={v}' for k, v in GPTQ.items())}}}").passes
    model, guard = pass_input(p, before, MODULE)
    info = p.apply(model, CTX).info
    check_guard(p, guard)  # raises if a shared tensor was written
    assert info.get("awq_scales_kept") is False or info.get("awq_blocks_undone") == len(ds)
    assert torch.equal(before.model.layers[0].input_layernorm.weight, norm)


class _Scores:
    """A Reference stand-in that hands out preset (KL, cross-entropy) per window: first the scaled body's, then the
    unscaled one's."""

    def __init__(self, *scores):
        self.ids, self._scores = torch.zeros(4, 8), iter(scores)

    def scores(self, model):
        return next(self._scores)


class _NoSwap:
    def swap_in(self, model):
        return {}


@pytest.mark.parametrize("ce_shift, kl_gap, kept", [
    (-0.05, 0.1, True),  # both clearly better: kept
    (0.0, 0.1, False),  # clearly closer to the float model, the text no better: undone (SmolLM2 at g128)
    (0.05, 0.1, False),  # the text clearly worse: undone
    (-0.05, 0.0, False),  # a tie in KL: undone
])
def test_the_scales_stay_only_where_both_kl_and_the_texts_cross_entropy_are_clearly_lower(ce_shift, kl_gap, kept):
    from optistack.passes.quant.awq_model_check import choose_body

    t = torch.tensor
    base_kl, base_ce = t([0.10, 0.12, 0.09, 0.11], dtype=torch.float64), t([3.0, 3.2, 2.9, 3.1], dtype=torch.float64)
    noise = t([0.001, -0.001, 0.002, -0.002], dtype=torch.float64)
    ref = _Scores((base_kl + noise, base_ce + ce_shift + noise), (base_kl + kl_gap, base_ce))
    taken, info = choose_body(torch.nn.Linear(1, 1), ref, _NoSwap(), GptqConfig().awq_check_z)
    assert info["awq_scales_kept"] is kept and taken == {}
    assert info["awq_check_ce_with"] == pytest.approx(float((base_ce + ce_shift + noise).mean()), abs=1e-6)
