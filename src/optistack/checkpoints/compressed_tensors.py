"""Our quantized layers as compressed-tensors tensors, and the `quantization_config` that names them.

Written by us from the format's spec (no compressed-tensors needed to save); transformers (with
compressed-tensors installed) and vLLM load the result. Per quantized Linear at `name`:

- int4 (`Int4Linear`, from `rtn-int4` / `awq`): format `pack-quantized`, strategy `group`.
  `name.weight_packed` int32 [N, ceil(K/8)]: code q+8 of column 8w+j in bits 4j..4j+3 of word w
  (q in -8..7); `name.weight_scale` [N, K/g]; asymmetric ones add `name.weight_zero_point` int32
  [ceil(N/8), K/g], the integer zero points zp+8 packed the same way down the rows; and
  `name.weight_shape` int64 [N, K]. Dequantized: w = (q - zp) * scale.
  Our layers store w = (c - 8) * scale + zero with c = q + 8, so zp = -zero / scale, which must be an
  integer: `int4.qparams` makes it one. K not a multiple of the group size cannot be stored (the
  format has no ragged groups); such a layer is written dense and ignored.
- int8 (torchao `Int8Tensor` weights), strategy `channel`, `name.weight_scale` [N, 1]: `int8-weight`
  (W8A16) as `pack-quantized` 8-bit (`weight_packed` int32 [N, ceil(K/4)], `weight_shape`), the
  form llm-compressor writes and vLLM loads; `int8-dynamic` (W8A8) as `int-quantized`
  (`name.weight` int8 [N, K]) with dynamic per-token symmetric int8 input activations.
- fp8 (`Fp8Linear`): format `float-quantized`: `name.weight` float8_e4m3fn, `name.weight_scale`
  [N, 1]; `mode=dynamic` adds dynamic per-token fp8 input activations.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from ..core.errors import OptistackError

INT4, INT8, FP8 = "pack-quantized", "int-quantized", "float-quantized"
_ZP_TOLERANCE = 0.05  # of one step: a bf16-stored zero (up to 8 steps, 8 mantissa bits) is off by <= 8/256 step


class CheckpointError(OptistackError, ValueError):
    """The model holds something this checkpoint format cannot store."""


class DestinationError(CheckpointError):
    """The path to write to cannot take the checkpoint (a file, or a folder of the user's): nothing about the model."""


def pack_bits(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Unsigned `bits`-bit values [R, C] (4: 0..15, 8: 0..255) -> int32 [R, ceil(C * bits / 32)]:
    value e of a word's 32/bits in bits e*bits.. of it (the format's dense packing, little end first)."""
    per = 32 // bits
    rows, cols = values.shape
    v = torch.nn.functional.pad(values.to(torch.int64), (0, (-cols) % per)).reshape(rows, -1, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_bits(packed: torch.Tensor, cols: int, bits: int = 4) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 [R, W] -> int64 [R, cols] unsigned values."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :cols]


def scheme_key(scheme: dict[str, Any]) -> str:
    return json.dumps(scheme, sort_keys=True)


def int4_tensors(name: str, layer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, scheme) of an Int4Linear, or None when its in_features is not a multiple of its group size."""
    n, k, g = layer.out_features, layer.in_features, layer.group_size
    if k % g:
        return None
    sz = layer.scales_and_zeros.detach().float().cpu()
    scale, zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()  # [N, G]
    try:
        codes = layer.codes()[:, :k].cpu()
    except NotImplementedError:  # the CUDA tile layout: recover the codes from the dequantized weight
        w = layer.dequantized_weight(torch.float32).cpu().reshape(n, -1, g)
        codes = ((w - zero[..., None]) / scale[..., None]).round().add(8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    symmetric = bool((zero == 0).all())
    tensors = {f"{name}.weight_packed": pack_bits(codes), f"{name}.weight_scale": scale,
               f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not symmetric:
        ratio = zero / scale
        zp = -ratio.round()
        off = (ratio + zp).abs().max().item()
        if off > _ZP_TOLERANCE or zp.min() < -8 or zp.max() > 7:
            raise CheckpointError(
                f"{name}: its int4 zero points are not whole quantization steps (off by up to {off:.3f} of a step), "
                "which compressed-tensors cannot store; it was quantized with zero_grid=float or by an optistack before "
                "integer zero points (re-run with zero_grid=integer, the default), or use result.save(dir), which "
                "keeps it exactly")
        tensors[f"{name}.weight_zero_point"] = pack_bits((zp + 8).to(torch.int64).t()).t().contiguous()
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().cpu()
    scheme = {"weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "group_size": g,
                          "strategy": "group", "dynamic": False}, "format": INT4}
    return tensors, scheme


def int8_tensors(name: str, linear: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scheme) of an nn.Linear whose weight is a torchao Int8Tensor (per-row symmetric)."""
    w = linear.weight
    qdata, scale = w.qdata.detach().cpu(), w.scale.detach().float().cpu()
    zp = getattr(w, "zero_point", None)
    if zp is not None and bool((zp != 0).any()):
        raise CheckpointError(f"{name}: asymmetric int8 weights (non-zero zero points) are not written; "
                              "use result.save(dir)")
    if scale.numel() != qdata.shape[0]:
        raise CheckpointError(f"{name}: int8 weights with {scale.numel()} scales for {qdata.shape[0]} rows "
                              "(only one scale per output row is written); use result.save(dir)")
    act = getattr(w, "act_quant_kwargs", None)
    if act is None:  # weight-only (W8A16): vLLM and llm-compressor keep it packed, like int4
        tensors = {f"{name}.weight_packed": pack_bits(qdata.to(torch.int64) + 128, bits=8),
                   f"{name}.weight_shape": torch.tensor(list(qdata.shape), dtype=torch.int64)}
    else:
        tensors = {f"{name}.weight": qdata.to(torch.int8).contiguous()}
    tensors[f"{name}.weight_scale"] = scale.reshape(-1, 1)
    if linear.bias is not None:
        tensors[f"{name}.bias"] = linear.bias.detach().cpu()
    scheme: dict[str, Any] = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                          "strategy": "channel", "dynamic": False},
                              "format": INT4 if act is None else INT8}
    if act is not None:
        symmetric = "ASYMMETRIC" not in str(getattr(act, "mapping_type", "SYMMETRIC")).upper()
        scheme["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": symmetric, "group_size": None,
                                       "strategy": "token", "dynamic": True}
    return tensors, scheme


def fp8_tensors(name: str, layer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scheme) of an Fp8Linear (e4m3 weights, one scale per output row)."""
    tensors = {f"{name}.weight": layer.weight_fp8.detach().cpu().contiguous(),
               f"{name}.weight_scale": layer.weight_scale.detach().float().cpu().reshape(-1, 1)}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().cpu()
    scheme: dict[str, Any] = {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                          "strategy": "channel", "dynamic": False}, "format": FP8}
    if layer.mode == "dynamic":
        scheme["input_activations"] = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                       "strategy": "token", "dynamic": True}
    return tensors, scheme


def quantization_config(schemes: dict[str, list[str]], ignore: list[str]) -> dict[str, Any]:
    """`quantization_config` for config.json: one config group per scheme (scheme_key -> layer names).

    One scheme: it targets every `Linear` and `ignore` lists the Linears left in float (lm_head...).
    Several: each group targets its layers by name, and the format is `mixed-precision`.
    """
    groups, formats = {}, set()
    for i, (key, names) in enumerate(sorted(schemes.items())):
        scheme = json.loads(key)
        fmt = scheme.pop("format")
        formats.add(fmt)
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": scheme["weights"],
                                "input_activations": scheme.get("input_activations"),
                                "output_activations": None, "format": fmt}
    out = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
           "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(ignore),
           "kv_cache_scheme": None, "global_compression_ratio": None}
    if any(g["format"] == INT4 and not g["weights"]["symmetric"] for g in groups.values()):
        # transformers 5.2x sizes the packed zero points wrongly on its compressed route (they load as
        # random values, with only a warning); its dequantize-at-load route reads them right. vLLM and
        # compressed-tensors ignore this key.
        out["dequantize"] = True
    return out


def quantized_tensors(name: str, module: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None | str:
    """Tensors + scheme for a quantized layer; "dense" for an Int4Linear the format cannot hold;
    None for a module that is not one of ours (plain layers are handled by the caller)."""
    from ..layers.fp8 import Fp8Linear
    from ..layers.int4 import Int4Linear

    if isinstance(module, Int4Linear):
        return int4_tensors(name, module) or "dense"
    if isinstance(module, Fp8Linear):
        return fp8_tensors(name, module)
    if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor":
        return int8_tensors(name, module)
    return None
