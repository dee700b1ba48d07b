"""Several threads calling generate() on one engine model at once: every output equals what that call gives
alone, nobody crashes, and the engine's slots all come back. `OPTISTACK_CONCURRENCY_SECONDS` sets how long
the threads keep calling (default 4; benchmarks/generate_concurrency.py runs SmolLM2 for 60 s)."""
from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from gen_fixtures import ours, prompt, vocab
from tiny_models import tiny_llama

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def test_four_threads_get_their_single_caller_outputs():
    base = tiny_llama(vocab_size=vocab(), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2)
    model = Pipeline.parse("rtn-int4{head=int8},decode-engine{check_prompts=0}").apply(copy.deepcopy(base), PassContext()).model
    asks = [(prompt(1, 5 + 9 * i, seed=10 + i), 6 + 3 * i) for i in range(8)]  # prompts of 5..68 tokens
    alone = [ours(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0) for ids, n in asks]
    seconds = float(os.environ.get("OPTISTACK_CONCURRENCY_SECONDS", "4"))
    errors: list[str] = []
    calls = [0] * 4

    def caller(k: int) -> None:
        end, i = time.perf_counter() + seconds, k
        while time.perf_counter() < end and not errors:
            ids, n = asks[i % len(asks)]
            try:
                with torch.inference_mode():
                    got = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)
            except Exception as exc:  # a crash in any thread fails the test with its message
                errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return
            want = alone[i % len(asks)]
            if not torch.equal(got, want):
                errors.append(f"thread {k}, prompt {i % len(asks)}: {got[0, -n:].tolist()} != {want[0, -n:].tolist()}")
            calls[k] += 1
            i += 3

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    before = torch.get_num_threads()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert min(calls) >= 2, calls
    assert torch.get_num_threads() == before
    runtime = model.optistack_decode._runtime
    assert runtime is not None and runtime.free_slots == runtime.slots  # every session gave its slots back
