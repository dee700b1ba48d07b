"""The demo's LLM part on a tiny model: both models answer through generate(), streamed, and are timed."""
from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_folders import tiny_tokenizer  # noqa: E402

from optistack.testing import tiny_llama  # noqa: E402


def test_llm_demo_streams_both_answers_and_compares_their_speed():
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.demo import llm_demo

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=0, max_position_embeddings=256)
    optimized = Pipeline.parse("rtn-int4{head=int8},fuse-kernels").apply(copy.deepcopy(model), PassContext()).model
    out = io.StringIO()
    got = llm_demo(model, optimized, tok, "hello there", tokens=12, out=out)
    text = out.getvalue()
    assert "[original]" in text and "[optimized]" in text and "tokens/s" in text
    for side in ("original", "optimized"):
        assert 2 <= got[side]["tokens"] <= 12 and got[side]["tokens_per_s"] > 0 and got[side]["ttft_ms"] > 0
    answers = [part.split("\n")[0] for part in text.split("] ")[1:3]]
    with torch.inference_mode():
        ids = tok("hello there", return_tensors="pt")
        own = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert answers[0].strip() == tok.decode(own[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_demo_refuses_too_few_tokens():
    from optistack.cli import main

    with pytest.raises(SystemExit, match="--tokens must be >= 2"):
        main(["demo", "--tokens", "1"])
