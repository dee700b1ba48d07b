"""Pipeline text: `name{key=value,...}` items joined by commas (MLIR `--pass-pipeline` style).

Values are bare words or double-quoted strings (with `\\"` and `\\\\` escapes) when they hold
`, { } = "` or spaces. Parsing gives `[(name, {key: raw_text})]`; typing happens in `core.config`. An item `@name` is a
preset (see `optistack.presets`): the caller's `expand` turns it into pass text, parsed in its place.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

from .errors import PipelineParseError

_NAME = re.compile(r"[a-z0-9][a-z0-9:_\-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def printable(text: str) -> str:
    """`text` with control and bidirectional characters escaped, so an error message cannot reorder or
    hide what the terminal shows (a NUL, U+202E RIGHT-TO-LEFT OVERRIDE, an ANSI escape)."""
    return "".join(ch if ch.isprintable() and not unicodedata.category(ch).startswith("C")
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> PipelineParseError:
        # one line: the text with a caret where reading stopped (`awq{^`), control characters escaped
        marked = printable(self.text[:self.pos]) + "^" + printable(self.text[self.pos:])
        return PipelineParseError(f"{printable(message)} at position {self.pos}: {marked}")

    def next_item(self) -> bool:
        """After a pass or a preset: False at the end of the text, else step over the ',' before the next."""
        nxt = self.peek()
        if nxt == "":
            return False
        if nxt != ",":
            raise self.error(f"expected ',' between passes, found {nxt!r}")
        self.pos += 1
        return True

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected '{ch}', found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        if self.peek() == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text):
                ch = self.text[self.pos]
                if ch == "\\" and self.pos + 1 < len(self.text):
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                    continue
                if ch == '"':
                    self.pos += 1
                    return "".join(out)
                out.append(ch)
                self.pos += 1
            raise self.error("unterminated quoted value")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ',{}="':
            self.pos += 1
        raw = self.text[start:self.pos].strip()
        if not raw:
            raise self.error("expected a value")
        return raw


def parse_pipeline_text(text: str, expand: Callable[[str], str] | None = None) -> list[tuple[str, dict[str, str]]]:
    """Split pipeline text into (pass name, raw options). Empty text is an empty pipeline.

    `@name` items are replaced by the items of `expand("@name")` (presets never nest); without
    `expand` they are refused."""
    if not isinstance(text, str):
        raise PipelineParseError(f"pipeline text must be a string, got {type(text).__name__}")
    reader = _Reader(text)
    items: list[tuple[str, dict[str, str]]] = []
    if reader.peek() == "":
        return items
    while True:
        if reader.peek() == "@":
            reader.pos += 1
            preset = "@" + reader.match(_NAME, "a preset name after '@' (see `optistack presets`)")
            if reader.peek() == "{":
                raise reader.error(f"preset {preset} takes no options; write out its expansion "
                                   "(`optistack presets`) and change the options there")
            if expand is None:
                raise reader.error(f"presets ({preset}) are not accepted here")
            items.extend(parse_pipeline_text(expand(preset)))
            if not reader.next_item():
                return items
            continue
        name = reader.match(_NAME, "a pass name (lowercase letters, digits, '-')")
        options: dict[str, str] = {}
        if reader.peek() == "{":
            reader.pos += 1
            if reader.peek() != "}":
                while True:
                    key = reader.match(_KEY, "an option name")
                    if key in options:
                        raise reader.error(f"{name}: option '{key}' given twice")
                    reader.expect("=")
                    options[key] = reader.value()
                    if reader.peek() == ",":
                        reader.pos += 1
                        continue
                    break
            reader.expect("}")
        items.append((name, options))
        if not reader.next_item():
            return items
