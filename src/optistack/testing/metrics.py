"""SQNR: how far a lossy result is from its reference, in decibels (the floor a lossy-pass test asserts)."""
from __future__ import annotations

import math
from typing import Any


def sqnr(reference: Any, approximation: Any) -> float:
    """Signal-to-quantization-noise ratio in dB: `20 * log10(||reference|| / ||reference - approximation||)`.

    Higher is closer: identical tensors give `inf`, noise at 1% of the signal's RMS gives ~40 dB, and each
    bit of a uniform quantizer is worth ~6 dB. A NaN anywhere gives NaN, so `sqnr(...) >= floor` fails.
    Computed in float64 on detached copies, so bf16/fp8 outputs and tensors that need grad are fine."""
    import torch

    ref = torch.as_tensor(reference).detach().to(torch.float64)
    out = torch.as_tensor(approximation).detach().to(ref.device, torch.float64)
    if ref.shape != out.shape:
        raise ValueError(f"sqnr: reference has shape {tuple(ref.shape)} but approximation has {tuple(out.shape)}; "
                         "compare tensors of the same shape")
    noise = float(torch.linalg.vector_norm(ref - out))
    signal = float(torch.linalg.vector_norm(ref))
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)
