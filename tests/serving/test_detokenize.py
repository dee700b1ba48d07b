"""Incremental detokenization never shows a broken character, and stop strings cut the text as OpenAI does."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402

from optistack.serving.detokenize import IncrementalDetokenizer, OutputText  # noqa: E402

TEXT = "naïve café — 日本語 ok 🙂! plain words, then more: 你好."


def test_pieces_never_end_in_a_broken_character_and_add_up_to_the_text():
    tok = tiny_serving.tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the BPE really splits characters over tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_a_character_that_never_completes_is_flushed_at_the_end():
    tok = tiny_serving.tokenizer()
    ids = tok("ok 日")["input_ids"][:-1]  # the last byte of 日 missing
    detok = IncrementalDetokenizer(tok)
    shown = "".join(detok.add(i) for i in ids)
    assert shown == "ok "
    assert detok.flush() == tok.decode(ids)[len("ok "):]


def _feed(out: OutputText, ids: list[int]) -> list[str]:
    pieces = []
    for i in ids:
        pieces.append(out.add(i))
        if out.stopped:
            return pieces
    return pieces + [out.finish()]


def test_stop_string_trims_the_output_and_is_never_shown_in_part():
    tok = tiny_serving.tokenizer()
    ids = tok("first line. END second line")["input_ids"]
    out = OutputText(tok, stop=["END", "never"])
    pieces = _feed(out, ids)
    assert out.stopped and "".join(pieces) == "first line. " == out.text
    assert not any("E" in p for p in pieces)
    assert out.tokens < len(ids)  # the tokens after the stop are not consumed


def test_text_held_back_for_a_possible_stop_is_released_when_it_is_not_one():
    tok = tiny_serving.tokenizer()
    ids = tok("alpha EN")["input_ids"]
    out = OutputText(tok, stop=["END"])
    pieces = _feed(out, ids)
    assert not out.stopped and "".join(pieces) == "alpha EN"
    assert "EN" in pieces[-1]  # held until the end: it could have become END


def test_stop_token_ids_count_but_are_not_shown():
    tok = tiny_serving.tokenizer()
    ids = tok("hello")["input_ids"] + [tok.eos_token_id]
    out = OutputText(tok, hidden_ids=[tok.eos_token_id])
    assert "".join(_feed(out, ids)) == "hello" and out.tokens == len(ids)
