"""Decode sessions: a left-padded row decodes as it would alone, rewind forgets exactly the dropped positions,
pooled static caches are lent to one session at a time, and requests a session cannot hold are refused."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from gen_fixtures import left_padded, llama, prompt

from optistack.core.errors import WorkloadError
from optistack.core.hooks import CACHE_ATTR
from optistack.core.pass_protocol import PassContext
from optistack.generation import DecodeSession, ModelSession, SessionUnavailable, greedy_decode, open_session
from optistack.passes.decoding.kv_cache import KvCachePass

CTX = PassContext()


@pytest.fixture(scope="module")
def model():
    return llama()


def static(model, **options):
    return KvCachePass(**options).apply(copy.deepcopy(model), CTX).model


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_left_padded_rows_decode_as_they_would_alone(model, kind):
    m = model if kind == "dynamic" else static(model)
    ids, mask = left_padded()
    feed = prompt(3, 4, seed=9)
    with torch.no_grad():
        batch = ModelSession(m, 3, 32)
        assert isinstance(batch, DecodeSession)
        first = batch.prefill(ids, mask)
        steps = [batch.extend(feed[:, i : i + 1]) for i in range(2)] + [batch.extend(feed[:, 2:])]  # 1, 1, then 2 at once
        batch.close()
        for row in range(3):
            alone = ModelSession(m, 1, 32)
            own = ids[row : row + 1, mask[row].bool()]
            torch.testing.assert_close(alone.prefill(own, None), first[row : row + 1], atol=1e-5, rtol=1e-5)
            for i, got in enumerate(steps):
                n = got.shape[1]
                want = alone.extend(feed[row : row + 1, i : i + n]) if i < 2 else alone.extend(feed[row : row + 1, 2:])
                assert got.shape == (3, n, m.config.vocab_size) and got.dtype == torch.float32
                torch.testing.assert_close(want, got[row : row + 1], atol=1e-5, rtol=1e-5)
            alone.close()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_rewind_forgets_exactly_the_dropped_positions(model, kind):
    m = model if kind == "dynamic" else static(model)
    ids, extra = prompt(1, 7), prompt(1, 5, seed=4)
    with torch.no_grad():
        s = ModelSession(m, 1, 40)
        s.prefill(ids, None)
        s.extend(extra)  # 5 speculative positions ...
        s.rewind(7 + 2)  # ... of which 2 are kept
        again = s.extend(extra[:, 2:3])
        ref = ModelSession(m, 1, 40)
        ref.prefill(ids, None)
        ref.extend(extra[:, :2])
        torch.testing.assert_close(again, ref.extend(extra[:, 2:3]), atol=1e-5, rtol=1e-5)
        with pytest.raises(WorkloadError, match="cannot rewind to 20 positions: the session holds 10"):
            s.rewind(20)
        s.close()
        s.close()  # idempotent
        ref.close()


def test_a_pooled_static_cache_is_lent_to_one_session_at_a_time(model):
    m = static(model)
    factory = getattr(m, CACHE_ATTR)
    first, second = ModelSession(m, 1, 20), ModelSession(m, 1, 20)
    assert first.cache is not second.cache  # concurrent sessions never share a cache
    cache = first.cache
    first.close(), second.close()
    third = ModelSession(m, 1, 20)
    assert third.cache is cache and len(factory._caches[256]) == 2  # sequential sessions reuse one (no recompiles)
    third.close()
    ids = prompt(1, 6)
    outs = {}

    def run(i):
        outs[i] = greedy_decode(m, ids, 12).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ref = greedy_decode(model, ids, 12).tokens
    assert all(torch.equal(outs[i], ref) for i in range(3))


def test_a_request_the_session_cannot_hold_is_refused_with_the_reason(model):
    m = static(model, max_cache_len=16)
    with pytest.raises(SessionUnavailable, match="needs 40 cache slots but max_cache_len=16"):
        open_session(m, 1, 40)
    s = open_session(m, 1, 16)
    with pytest.raises(WorkloadError, match="holds 1 rows of <= 16 positions; the prompt is 2 x 5"):
        s.prefill(prompt(2, 5), None)
    s.close()
    with pytest.raises(WorkloadError, match=">= 1 row"):
        ModelSession(model, 0, 8)
