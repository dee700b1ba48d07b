"""generate() on the speculative strategy: greedy batch 1 verifies drafts in one forward of k+1 positions
(fewer model calls than tokens) and still equals transformers' own greedy token for token, with logits
processors on the right prefix, EOS mid-draft, streamers per token; sampling and padded batches decode
one token a step on the session."""
from __future__ import annotations

import copy

import pytest
import torch
from gen_fixtures import Recorder, left_padded, llama, ours, own_generate, prompt, vocab

from optistack.core.pass_protocol import PassContext
from optistack.passes.decoding.speculative import SpeculativePass

CTX = PassContext()


@pytest.fixture(scope="module", params=["prompt-lookup", "draft"])
def spec(request):
    base = llama()
    options = {"method": "draft", "draft_layers": 1, "num_draft_tokens": 3} if request.param == "draft" else {}
    return base, SpeculativePass(check_tokens=8, **options).apply(copy.deepcopy(base), CTX).model


def repetitive(length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    half = torch.randint(3, vocab(), (1, length // 2), generator=g)
    return torch.cat([half, half], dim=1)


def counted(model):
    """Target forward calls: its last decoder layer runs once per call (a layer-skip draft shares the
    target's modules but never runs that layer)."""
    calls = []
    handle = model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_greedy_verifies_drafts_in_one_call_and_equals_plain_greedy(spec):
    base, m = spec
    ids = repetitive()
    # the model's own generate and our greedy_decode (no strategy) agree on what comes next
    want = own_generate(base, ids, max_new_tokens=24, do_sample=False)
    calls, handle = counted(m)
    try:
        got = ours(m, ids, max_new_tokens=24, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(got, want)
    assert m.generate.last["session"] == "SpeculativeSession" and len(calls) == m.generate.last["calls"]
    if m.optistack_decode.proposer.__class__.__name__ == "PromptLookup":
        assert len(calls) < 24, f"{len(calls)} model calls for 24 tokens: drafts were not verified in one call"


def test_processors_on_the_right_prefix_and_eos_mid_draft(spec):
    base, m = spec
    ids = repetitive()
    kw = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.2, min_new_tokens=3,
              return_dict_in_generate=True, output_scores=True)
    got, want = ours(m, ids, **kw), own_generate(base, ids, **kw)
    assert torch.equal(got.sequences, want.sequences) and len(got.scores) == len(want.scores) == 20
    for mine, theirs in zip(got.scores, want.scores):  # k+1 positions at once vs one: last float bits may differ
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    plain = own_generate(base, ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    eos = int(plain[9])
    stop = int((plain == eos).nonzero()[0])
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = ours(m, ids, **kw)
    assert torch.equal(got, own_generate(base, ids, **kw)) and got.shape[1] == ids.shape[1] + stop + 1


def test_the_streamer_gets_each_token_once(spec):
    base, m = spec
    ids = repetitive()
    mine, theirs = Recorder(), Recorder()
    ours(m, ids, max_new_tokens=16, do_sample=False, streamer=mine)
    own_generate(base, ids, max_new_tokens=16, do_sample=False, streamer=theirs)
    assert mine.puts == theirs.puts and len(mine.puts) == 17 and mine.ended == 1


def test_sampling_and_padded_batches_decode_a_token_a_step(spec):
    base, m = spec
    ids = repetitive()
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(11)
    got = ours(m, ids, **kw)
    assert m.generate.last["calls"] == 12
    torch.manual_seed(11)
    assert torch.equal(got, own_generate(base, ids, **kw))
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours(m, ids, **kw), own_generate(base, ids, **kw))
    one = prompt(1, 9)
    assert torch.equal(ours(m, one, max_new_tokens=10), own_generate(base, one, max_new_tokens=10))
