"""Choosing tokens (serving/sampling.py): the batch's shared greedy pick equals each row's own."""
from __future__ import annotations

import pytest
import torch

from optistack.serving.backend import SamplingParams
from optistack.serving.sampling import TokenChooser, greedy_tokens

V = 50


def test_greedy_tokens_equal_each_rows_own_choice_ties_and_nans_included():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V + 3, generator=g)  # 3 padding columns past the vocabulary
    logits[:, V:] = 100.0  # never chosen: past vocab_size
    logits[1, 7] = logits[1, 30] = 9.0  # a tie: the first index
    logits[2, 4] = float("nan")  # max propagates NaN: its index, as choose() takes it
    logits[3] = 0.0  # all equal: index 0
    alone = [TokenChooser(SamplingParams(), [1, 2], V).choose(logits[i], 0) for i in range(6)]
    assert greedy_tokens(logits, list(range(6)), V) == alone
    assert alone[1] == 7 and alone[2] == 4 and alone[3] == 0
    assert greedy_tokens(logits, [5, 1, 3], V) == [alone[5], alone[1], alone[3]]


@pytest.mark.parametrize("params, generated, plain", [
    (SamplingParams(), 0, True),
    (SamplingParams(do_sample=True, seed=1), 0, False),
    (SamplingParams(repetition_penalty=1.3), 0, False),
    (SamplingParams(stop_token_ids=(3,), min_new_tokens=2), 1, False),  # stop ids still masked
    (SamplingParams(stop_token_ids=(3,), min_new_tokens=2), 2, True),
])
def test_only_rows_whose_choice_is_the_plain_arg_max_share_it(params, generated, plain):
    assert TokenChooser(params, [1], V).plain_greedy(generated) is plain
