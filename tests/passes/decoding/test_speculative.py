"""`speculative`: prompt lookup and draft-model decoding give exactly the plain greedy tokens (tiny
random Llama), the pass refuses a strategy that does not, and non-causal-LM workloads."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_workload

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.hooks import DECODE_ATTR
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.passes.decoding import speculative
from optistack.passes.decoding.lookup import PromptLookup
from optistack.passes.decoding.speculative import SpeculativePass, layer_skip_draft

CTX = PassContext()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=128, num_hidden_layers=3)


def repetitive_prompt(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, 128, (1, 12), generator=g)
    return torch.cat([half, half[:, :6]], dim=1)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    seq = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7])
    assert lookup.propose(seq, 4) == [1, 2, 5, 6]  # the latest earlier "5 6 7" is followed by 1 2
    assert lookup.propose(seq, 1) == [1]
    assert lookup.propose(torch.tensor([1, 2, 3, 4]), 4) == []
    assert PromptLookup(2, 2).propose(torch.tensor([4, 9, 3, 9]), 3) == []  # only a 1-gram matches


@pytest.mark.parametrize("options", [{}, {"num_draft_tokens": 2, "max_ngram": 2},
                                     {"method": "draft", "draft_layers": 1},
                                     {"method": "draft", "draft_layers": 2, "num_draft_tokens": 3}])
def test_token_identical_to_greedy(model, options):
    result = SpeculativePass(check_tokens=12, **options).apply(copy.deepcopy(model), CTX)
    assert result.info["checked_tokens"] == 24 and result.info["method"] == options.get("method", "prompt-lookup")
    for prompt in (repetitive_prompt(), torch.randint(0, 128, (1, 9))):
        plain = greedy_decode(model, prompt, 20)
        spec = greedy_decode(result.model, prompt, 20)
        assert torch.equal(plain.tokens, spec.tokens)
        assert sum(spec.tokens_per_step) == 20 and len(spec.step_ms) == len(spec.tokens_per_step)
    spec = greedy_decode(result.model, repetitive_prompt(), 20)
    assert max(spec.tokens_per_step) > 1 and spec.metrics()["tokens_per_step"] > 1  # drafts were accepted


def test_draft_from_a_local_folder_and_vocab_mismatch(model, tmp_path):
    tiny_llama(vocab_size=128, num_hidden_layers=1, seed=5).save_pretrained(tmp_path / "draft")
    result = SpeculativePass(method="draft", draft=str(tmp_path / "draft"), check_tokens=8).apply(copy.deepcopy(model), CTX)
    assert result.info["draft_layers"] == 1
    prompt = repetitive_prompt()
    assert torch.equal(greedy_decode(model, prompt, 12).tokens, greedy_decode(result.model, prompt, 12).tokens)
    tiny_llama(vocab_size=96, num_hidden_layers=1).save_pretrained(tmp_path / "other")
    with pytest.raises(PassApplyError, match="draft's vocabulary \\(96 tokens\\) differs"):
        SpeculativePass(method="draft", draft=str(tmp_path / "other")).apply(copy.deepcopy(model), CTX)
    with pytest.raises(PassApplyError, match="cannot load the draft model"):
        SpeculativePass(method="draft", draft=str(tmp_path / "missing")).apply(copy.deepcopy(model), CTX)


def test_layer_skip_draft_shares_weights_and_leaves_the_target_whole(model):
    draft = layer_skip_draft(model, 1)
    assert len(draft.model.layers) == 1 and len(model.model.layers) == 3
    assert draft.lm_head.weight is model.lm_head.weight and model.config.num_hidden_layers == 3
    with pytest.raises(PassApplyError, match="'draft_layers' must be 1..2"):
        layer_skip_draft(model, 3)


def test_refuses_a_strategy_that_changes_the_output(model, monkeypatch):
    class Wrong:
        def __call__(self, m, ids, n):
            gen = greedy_decode(m, ids, n, use_strategy=False)
            gen.tokens[0, -1] += 1
            return gen

    # make the pass install a broken strategy: its check must catch it and leave no strategy behind
    monkeypatch.setattr(speculative, "SpeculativeDecoder", lambda proposer, k, base: Wrong())
    target = copy.deepcopy(model)
    with pytest.raises(PassApplyError, match="greedy output differs from plain decoding on check prompt 0 at new token 3"):
        SpeculativePass(check_tokens=4).apply(target, CTX)
    assert getattr(target, DECODE_ATTR, None) is None


def test_refuses_non_causal_lm_workloads_and_a_second_strategy(model):
    ctx = PassContext(workload=tiny_llama_workload(copy.deepcopy(model)))
    with pytest.raises(PassApplyError, match="speculative: needs a causal-LM workload.*'generic'"):
        SpeculativePass().apply(copy.deepcopy(model), ctx)
    once = SpeculativePass(check_prompts=1, check_tokens=4).apply(copy.deepcopy(model), CTX).model
    with pytest.raises(PassApplyError, match="already has a decode strategy"):
        SpeculativePass().apply(once, CTX)


def test_options_are_validated_and_round_trip():
    with pytest.raises(PassConfigError, match="min_ngram <= max_ngram"):
        SpeculativePass(min_ngram=3, max_ngram=2)
    with pytest.raises(PassConfigError, match="'draft' and 'draft_layers' need method=draft"):
        SpeculativePass(draft_layers=2)
    with pytest.raises(PassConfigError, match="method' must be one of prompt-lookup, draft"):
        SpeculativePass(method="medusa")
    p = Pipeline.parse("speculative{method=draft,draft_layers=4,num_draft_tokens=5}")
    assert str(p) == "speculative{method=draft,num_draft_tokens=5,draft_layers=4}"
