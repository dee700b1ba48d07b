"""Quiet imports: torchao (pulled in by transformers too) logs missing CUDA libraries at import time.

In a notebook without ipywidgets, importing transformers imports `tqdm.autonotebook`, which warns
"IProgress not found. Please update jupyter and ipywidgets" (a TqdmWarning) in the first cell. That one
message is filtered for the whole process when this module is imported (before any pass or bundled
workload imports transformers): tqdm.auto is imported once, possibly outside `quiet_import`.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

# Loggers that print noise while torchao imports (missing optional CUDA libraries, pytree notices).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch.onnx", "onnxscript", "")  # "" = root (ORT quantization)
_TQDM_NO_IPYWIDGETS = r"IProgress not found\. Please update jupyter and ipywidgets"


def ignore_tqdm_ipywidgets() -> None:
    """Hide tqdm's "IProgress not found" TqdmWarning, and no other warning (message and category both
    match). Not narrowed by module: the warning is attributed to whoever imports tqdm.autonotebook
    (tqdm.auto for transformers, a user's module otherwise). Without tqdm it cannot occur."""
    try:
        from tqdm import TqdmWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", message=_TQDM_NO_IPYWIDGETS, category=TqdmWarning)


@contextlib.contextmanager
def quiet_import(hf_progress: bool = False) -> Iterator[None]:
    """Silence import-time log lines and warnings of heavy backends, restoring logger levels afterwards.

    `hf_progress=True` also hides transformers' "Loading weights" bars while a bundled model loads.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # inside the filter: this may be the first transformers (so tqdm.autonotebook) import
            bars = _hf_progress_bars(False) if hf_progress else False
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            _hf_progress_bars(True)


def _hf_progress_bars(enable: bool) -> bool:
    """Switch transformers' progress bars; returns whether they were on (and so need switching back)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    was_on = hf_logging.is_progress_bar_enabled()
    if enable:
        hf_logging.enable_progress_bar()
    elif was_on:
        hf_logging.disable_progress_bar()
    return was_on


ignore_tqdm_ipywidgets()
