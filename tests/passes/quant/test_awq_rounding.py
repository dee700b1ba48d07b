"""`awq{rounding=gptq}`: AWQ's scales judged by the rounding that follows them (one layer where the RTN
judge picks scales that leave GPTQ worse off than no scales; the pass's options and info)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_awq import CTX, FAST, held_out_ids, logits, tiny_llama
from torch import nn

from optistack.core.errors import PassConfigError
from optistack.core.pipeline import Pipeline
from optistack.passes.quant.awq import AwqPass
from optistack.passes.quant.awq_rounding import gptq_rounder, shortlist
from optistack.passes.quant.awq_search import Quantizer, ScaleGroup, clearly_lower, group_moments, search_scale


def low_rank_layer():
    """A linear layer whose inputs are low rank (strongly correlated channels) with six loud channels:
    RTN wants those channels scaled up, GPTQ can already move their error onto the correlated ones."""
    g = torch.Generator().manual_seed(0)
    width = 256
    mix = (torch.randn(width, 24, generator=g) @ torch.randn(24, width, generator=g)) / 5 + 0.1 * torch.eye(width)
    mix[:, :6] *= 8.0
    x = torch.randn(8, 64, width, generator=g) @ mix
    lin = nn.Linear(width, 64, bias=False)
    nn.init.normal_(lin.weight, generator=g)
    return lin, x


def error_under(rounder, lin: nn.Linear, x: torch.Tensor, s: torch.Tensor) -> float:
    """The layer's output MSE on `x` with its weight scaled by s, rounded by `rounder`, unscaled."""
    with torch.no_grad():
        wq = rounder("lin", lin.weight * s[None, :], s) / s[None, :]
        return float((x @ wq.t() - x @ lin.weight.t()).pow(2).mean())


def test_scales_judged_by_gptq_are_never_worse_than_none_under_gptq():
    lin, x = low_rank_layer()
    group = ScaleGroup("one", nn.LayerNorm(256), {"lin": lin}, lin)
    q = Quantizer(64, True, torch.float32, True)
    args = (group, x.abs().reshape(-1, 256).mean(0), group_moments(x, 64), ((x,), {}), 20, {"lin"}, q)
    rounder = gptq_rounder(x, 64, True, torch.float32)
    identity = error_under(rounder, lin, x, torch.ones(256))
    s_rtn, alpha_rtn, _, _ = search_scale(*args)
    assert alpha_rtn > 0 and error_under(rounder, lin, x, s_rtn) > identity  # the failure judging by RTN allows
    s, alpha, baseline, err = search_scale(*args, rounder=rounder, candidates=3)
    assert baseline == pytest.approx(identity, rel=1e-5)
    assert err <= identity and err < error_under(rounder, lin, x, s_rtn)
    assert err == pytest.approx(error_under(rounder, lin, x, s), rel=1e-5)


def test_a_scale_is_kept_over_none_only_when_clearly_lower_held_out():
    """judge_z: a candidate beats the identity only by `judge_z` standard errors of the per-sequence difference.
    Here the best GPTQ-judged alpha beats none by a consistent margin on every sequence: kept at z = 2 and at
    0; at z = 100 the identity stays."""
    lin, x = low_rank_layer()
    group = ScaleGroup("one", nn.LayerNorm(256), {"lin": lin}, lin)
    q = Quantizer(64, True, torch.float32, True)
    args = (group, x.abs().reshape(-1, 256).mean(0), group_moments(x, 64), ((x[:4],), {}), 20, {"lin"}, q)
    rounder = gptq_rounder(x[:4], 64, True, torch.float32)
    judged = {z: search_scale(*args, rounder=rounder, candidates=3, judge_inp=((x[4:],), {}), judge_z=z)
              for z in (0.0, 2.0, 100.0)}
    assert judged[0.0][1] > 0 and judged[0.0][3] < judged[0.0][2]  # some alpha is lower at all
    assert judged[2.0][1] == judged[0.0][1] and judged[2.0][3] == judged[0.0][3]  # and clearly: kept at z = 2
    assert judged[100.0][1] == 0.0 and torch.equal(judged[100.0][0], torch.ones(256))
    assert judged[100.0][3] == judged[100.0][2]  # kept error = the identity's
    for z in (2.0, 100.0):
        assert judged[z][2] == judged[0.0][2]  # the same baseline: the identity under GPTQ, held out


def test_clearly_lower_is_a_paired_test_in_standard_errors():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert clearly_lower(base - 0.5, base, 2.0)  # the same drop on every sequence: no spread at all
    noisy = base + torch.tensor([-0.9, 0.7, -0.8, 0.6])  # lower on average (-0.1), by much less than its spread
    assert clearly_lower(noisy, base, 0.0) and not clearly_lower(noisy, base, 1.0)
    assert not clearly_lower(base + 0.1, base, 0.0)
    assert clearly_lower(torch.tensor([0.5]), torch.tensor([1.0]), 2.0)  # one sequence: lower at all


def test_shortlist_keeps_the_best_and_the_identity():
    ones = torch.ones(3)
    errors = [(5.0, 0.0, ones), (1.0, 0.5, ones * 2), (2.0, 0.25, ones * 3), (9.0, 0.75, ones * 4)]
    assert [a for a, _ in shortlist(errors, 2)] == [0.0, 0.25, 0.5]
    assert [a for a, _ in shortlist(errors, 1)] == [0.0, 0.5]


def test_rounding_gptq_is_the_default_without_quantize_and_is_judged_held_out(monkeypatch):
    from optistack.passes.quant import awq as awq_module

    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    opts = {**FAST, "calib_samples": 4, "quantize": False, "search_samples": 1, "n_grid": 3}
    seen = []  # the sequences each GPTQ judge's H is built from, against the calibration batch

    def recording(x, *args):
        seen.append(x.shape[0])
        return gptq_rounder(x, *args)

    monkeypatch.setattr(awq_module, "gptq_rounder", recording)
    scaled = AwqPass(**opts).apply(copy.deepcopy(model), CTX)  # rounding=auto: gptq, as quantize=false
    assert scaled.info["rounding"] == "gptq" and 0 < scaled.info["block_mse_ratio"] <= 1
    assert seen and set(seen) == {2}  # H from 2 of the 4 sequences; the other 2 judge
    assert torch.allclose(logits(scaled.model, ids), ref, atol=1e-4, rtol=1e-4)  # still only folded scales
    seen.clear()
    assert AwqPass(**opts, rounding="rtn").apply(copy.deepcopy(model), CTX).info["rounding"] == "rtn"
    assert AwqPass(**{**opts, "quantize": True}).apply(copy.deepcopy(model), CTX).info["rounding"] == "rtn"
    assert not seen


def test_row_range_cuts_the_batch_and_keeps_what_broadcasts():
    from optistack.passes.quant.awq_search import row_range

    x, mask, rope = torch.randn(4, 3, 8), torch.ones(4, 1, 3, 3), (torch.randn(1, 3, 8), torch.randn(4, 3, 8))
    args, kwargs = row_range(((x,), {"attention_mask": mask, "position_embeddings": rope, "flag": True}), 2, 4)
    assert torch.equal(args[0], x[2:]) and torch.equal(kwargs["attention_mask"], mask[2:])
    assert kwargs["position_embeddings"][0].shape[0] == 1 and torch.equal(kwargs["position_embeddings"][1], rope[1][2:])
    assert kwargs["flag"] is True


@pytest.mark.parametrize("text, match", [
    ("awq{rounding=gptq}", "needs quantize=false"),
    ("awq{quantize=false,rounding=exact}", "'rounding' must be one of auto, rtn, gptq"),
    ("awq{quantize=false,rounding_candidates=0}", "'rounding_candidates' must be between 1 and 1000"),
    ("awq{quantize=false,judge_z=-1}", "'judge_z' must be between 0 and 100"),
])
def test_bad_rounding_options_are_refused(text, match):
    with pytest.raises(PassConfigError, match=match):
        Pipeline.parse(text)
