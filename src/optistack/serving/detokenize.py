"""Token ids to text as they arrive: never a broken UTF-8 character, and stop strings cut as OpenAI does.

`IncrementalDetokenizer` follows transformers' `TextStreamer` (and vLLM's offsets): it decodes a window
that starts a token or two back, so a tokenizer that drops a word's leading space at the start of a decode
(SentencePiece) still gives the space, and it holds text back while the window ends in U+FFFD (the bytes
of one character split over tokens). Every emitted piece, concatenated, is the decode of all the ids.

`OutputText` adds what the server needs on top: stop token ids counted but never shown, stop strings
searched in the decoded text (the output is trimmed before the first one), and text held back while it
could still be the start of a stop string, so a stream never shows text that a stop later removes.
"""
from __future__ import annotations

from typing import Any, Iterable

_BROKEN = "\ufffd"


class IncrementalDetokenizer:
    """Feed ids one by one with `add`; each call returns the text that is now safe to show."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (text before it is already out)
        self._read = 0  # ids before this one have been emitted

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _step(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and (final or not now.endswith(_BROKEN)):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """At the end: whatever is still held (a character that never completed shows as U+FFFD)."""
        return self._step(final=True) if self._read < len(self.ids) else ""


class OutputText:
    """The text of one completion: detokenized, stop-token ids hidden, stop strings applied.

    `add(token)` and `finish()` return the text to send now; `stopped` turns True when a stop string
    appeared (the output then ends before it, and later tokens are ignored).
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str] = (), hidden_ids: Iterable[int] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.hidden_ids = frozenset(int(t) for t in hidden_ids)
        self.text = ""
        self.sent = 0  # characters of `text` already returned
        self.tokens = 0  # tokens consumed (hidden ones included): the completion's token count
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.tokens += 1
        if int(token_id) not in self.hidden_ids:
            self.text += self._detok.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.text += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            start = max(0, self.sent - self._longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:max(min(hits), self.sent)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        for k in range(min(self._longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
