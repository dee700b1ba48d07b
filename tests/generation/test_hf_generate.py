"""generate() through a session equals transformers' own generate(): greedy token for token (batch 1 and a
left-padded batch, Llama and Qwen2, the model's own forward and kv-cache's static cache), sampling with a
seed, logits processors, EOS and padding, min_new_tokens, stop strings, streamers, return_dict scores."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from gen_fixtures import MODELS, Recorder, left_padded, ours, own_generate, prompt, tiny_tokenizer
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from optistack.core.pass_protocol import PassContext
from optistack.generation import install_generate
from optistack.passes.decoding.kv_cache import KvCachePass

CTX = PassContext()
PAD = {"pad_token_id": 0}


def decoding(kind: str, name: str = "llama"):
    """(the original model, a copy whose generate() runs on a session: `session` = the model's own forward
    on a DynamicCache (ModelSession), `static` = kv-cache{impl=static})."""
    base = MODELS[name]()
    m = copy.deepcopy(base)
    return base, (install_generate(m) if kind == "session" else KvCachePass().apply(m, CTX).model)


@pytest.fixture(scope="module")
def session_llama():
    return decoding("session")


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["session", "static"])
def test_greedy_equals_the_models_own_generate(name, kind):
    base, m = decoding(kind, name)
    ids = prompt()
    assert torch.equal(ours(m, ids, max_new_tokens=16, do_sample=False),
                       own_generate(base, ids, max_new_tokens=16, do_sample=False))
    ids, mask = left_padded()
    got = ours(m, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **PAD)
    assert torch.equal(got, own_generate(base, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **PAD))
    for row in range(3):  # each row as it would decode alone: padding never attended, positions from 0
        alone = own_generate(base, ids[row : row + 1, mask[row].bool()], max_new_tokens=12, do_sample=False, **PAD)
        assert torch.equal(got[row, ids.shape[1] :], alone[0, -12:])


def test_a_tokenized_batch_as_users_pass_it(session_llama):
    base, m = session_llama
    tok = tiny_tokenizer()
    batch = tok(["the quick brown fox", "a static cache", "stop"], padding=True, padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    assert torch.equal(ours(m, **batch, max_new_tokens=10, do_sample=False), own_generate(base, **batch, max_new_tokens=10))


@pytest.mark.parametrize("kind", ["session", "static"])
def test_sampling_with_a_seed_reproduces_the_models_own(kind):
    base, m = decoding(kind)
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=30, top_p=0.9, temperature=0.7,
              repetition_penalty=1.3, **PAD)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(ours(m, ids, **kw))
    torch.manual_seed(7)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], own_generate(base, ids, **kw))
    assert not torch.equal(runs[0], runs[2])  # it does sample
    kw = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3)  # rows expanded by transformers
    torch.manual_seed(5)
    got = ours(m, prompt(), **kw)
    torch.manual_seed(5)
    assert got.shape == (3, 17) and torch.equal(got, own_generate(base, prompt(), **kw))
    torch.manual_seed(3)  # top_k=1 leaves one candidate: sampling is then greedy, so top_k is applied
    assert torch.equal(ours(m, ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1, **PAD),
                       own_generate(base, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **PAD))


class Ban(LogitsProcessor):
    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores):
        scores[:, self.tokens] = float("-inf")  # in place, as many user processors do
        return scores


def test_a_users_logits_processor_and_repetition_penalty_are_applied(session_llama):
    base, m = session_llama
    ids = prompt()
    free = own_generate(base, ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    banned = free.unique()[:3].tolist()
    kw = dict(max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([Ban(banned)]),
              repetition_penalty=2.0)
    got = ours(m, ids, **kw)
    assert not set(got[0, ids.shape[1] :].tolist()) & set(banned) and not got.is_inference()
    assert torch.equal(got, own_generate(base, ids, **kw))


def test_eos_stops_a_row_and_pads_it_and_min_new_tokens_blocks_it(session_llama):
    base, m = session_llama
    ids, mask = left_padded()
    n = ids.shape[1]
    free = own_generate(base, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **PAD)
    eos = int(free[0, n + 3])  # the token row 0 picks at step 3 ends it there
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = ours(m, ids, **kw)
    assert torch.equal(got, own_generate(base, ids, **kw))
    first = int((got[0, n:] == eos).nonzero()[0])
    assert first <= 3 and (got[0, n + first + 1 :] == 0).all() and got.shape[1] > n + first + 1
    one = ids[1:2]
    eos = int(own_generate(base, one, max_new_tokens=4, do_sample=False)[0, -3])  # picked at step 1
    kw = dict(max_new_tokens=12, min_new_tokens=5, do_sample=False, eos_token_id=eos, **PAD)
    got = ours(m, one, **kw)
    assert eos not in got[0, n : n + 5].tolist() and torch.equal(got, own_generate(base, one, **kw))


def test_stop_strings_stop(session_llama):
    base, m = session_llama
    tok = tiny_tokenizer()
    ids = prompt()
    new = own_generate(base, ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    stop = next(t for j in range(4, 16) if (t := tok.decode(new[j - 1 : j + 1])).isascii() and t.strip()
                and t not in tok.decode(new[: j - 1]))
    kw = dict(max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok)
    got = ours(m, ids, **kw)
    assert got.shape[1] < ids.shape[1] + 20 and tok.decode(got[0, ids.shape[1] :]).endswith(stop)
    assert torch.equal(got, own_generate(base, ids, **kw))


def test_streamers_see_what_the_models_own_loop_shows_them(session_llama):
    base, m = session_llama
    tok = tiny_tokenizer()
    ids, mask = left_padded()
    ours_rec, own_rec = Recorder(), Recorder()
    ours(m, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, streamer=ours_rec, **PAD)
    own_generate(base, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, streamer=own_rec, **PAD)
    assert ours_rec.puts == own_rec.puts and ours_rec.ended == own_rec.ended == 1 and len(ours_rec.puts) == 7

    def text(model, gen):
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        worker = threading.Thread(target=gen, args=(model, prompt()),
                                  kwargs=dict(max_new_tokens=12, do_sample=False, streamer=streamer))
        worker.start()
        pieces = list(streamer)
        worker.join()
        return "".join(pieces)

    streamed = text(m, lambda model, *a, **k: model.generate(*a, **k))
    assert streamed == text(base, own_generate) and m.generate.last["path"] == "strategy"
    assert streamed == tok.decode(ours(m, prompt(), max_new_tokens=12, do_sample=False)[0, 9:])


@pytest.mark.parametrize("kind", ["session", "static"])
def test_return_dict_scores_and_logits_equal_the_models_own(kind):
    base, m = decoding(kind)
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
              output_scores=True, output_logits=True, repetition_penalty=1.5, **PAD)
    got, want = ours(m, ids, **kw), own_generate(base, ids, **kw)
    assert type(got) is type(want) is GenerateDecoderOnlyOutput and torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == len(got.logits) == 6
    tol = dict(atol=0, rtol=0) if kind == "session" else dict(atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(got.scores + got.logits, want.scores + want.logits):
        assert mine.shape == theirs.shape == (3, m.config.vocab_size)
        torch.testing.assert_close(mine, theirs, **tol)


def test_per_step_work_does_not_grow_with_python_inspection(session_llama, monkeypatch):
    """Signatures are read once per call (transformers' preparation, the session's opening), never per step:
    the number of inspect.signature calls does not depend on how many tokens are generated."""
    import inspect

    base, m = session_llama
    real, seen = inspect.signature, []
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: seen.append(1) or real(*a, **k))
    counts = []
    for tokens in (4, 24):
        seen.clear()
        m.generate(prompt(), max_new_tokens=tokens, do_sample=False)  # no processors: LogitsProcessorList
        # inspects each processor per step, in transformers' own loop as in ours
        counts.append(len(seen))
    assert counts[0] == counts[1] and m.generate.last["calls"] == 24, counts


def test_one_rows_plain_stops_are_checked_in_python_and_anything_else_by_the_criteria(session_llama, monkeypatch):
    """At batch 1, max_length and EOS alone are two Python checks a token (the criteria list is never called),
    with the tokens transformers' own loop gives; a criterion of the user's own goes through the list."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    from optistack.generation.hf_loop import _plain_stops

    assert _plain_stops([MaxLengthCriteria(9, 7), EosTokenCriteria([3, 5])]) == (9, frozenset({3, 5}), 7)
    assert _plain_stops([MaxLengthCriteria(9)])[1] == frozenset()

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= n + 2, dtype=torch.bool)

    assert _plain_stops([MaxLengthCriteria(9), AfterTwo()]) is None
    base, m = session_llama
    ids = prompt()
    n = ids.shape[1]
    eos = [int(t) for t in own_generate(base, ids, max_new_tokens=6, do_sample=False)[0, n + 3: n + 5]]
    calls = []
    real = StoppingCriteriaList.__call__
    monkeypatch.setattr(StoppingCriteriaList, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, **PAD)
    got = ours(m, ids, **kw)
    assert len(calls) == 0 and got.shape[1] <= n + 4
    assert torch.equal(got, own_generate(base, ids, **kw))
    custom = dict(max_new_tokens=12, do_sample=False, stopping_criteria=StoppingCriteriaList([AfterTwo()]), **PAD)
    calls.clear()
    got = ours(m, ids, **custom)
    assert got.shape[1] == n + 2 and len(calls) > 0
    assert torch.equal(got, own_generate(base, ids, **custom))
