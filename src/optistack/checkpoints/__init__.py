"""Standard checkpoints out: `save_pretrained` writes a Hugging Face folder that transformers and vLLM load.

Quantized layers (int4, int8, fp8) are written in compressed-tensors' form with a
`quantization_config` (`quant_method: compressed-tensors`), see `compressed_tensors.py`; a model
with none (pruned, LoRA-merged, cast) becomes a plain transformers folder. Either way the tokenizer
goes beside it. Forms only optistack runs (fused kernels, ONNX, engines) are refused with a pointer
to `result.save(dir)` / `optistack.load_model`. The model is only read, never changed.
`save_gguf` writes one GGUF file for llama.cpp instead (gguf_out.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.modeling import unwrap_compiled

__all__ = ["CheckpointError", "DestinationError", "save_gguf", "save_pretrained"]


def __getattr__(attr: str) -> Any:
    if attr in ("CheckpointError", "DestinationError"):  # lazy: importing the package stays free of torch
        from . import compressed_tensors

        return getattr(compressed_tensors, attr)
    if attr == "save_gguf":  # lazy, like CheckpointError: gguf and torch load on first use
        from .gguf_out import save_gguf

        return save_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def save_pretrained(path: str | Path, model: Any, tokenizer: Any = None, max_shard_size: int | str = "5GB",
                    pipeline: str | None = None) -> Path:
    """Write `model` (or a RunResult's model) to `path` as a Hugging Face folder; returns the path.

    `tokenizer` defaults to the files of the folder the original model was loaded from.
    """
    import torch

    from .compressed_tensors import CheckpointError, quantization_config, quantized_tensors, scheme_key
    from .plain import (
        MARKER,
        commit_destination,
        config_dict,
        copy_companions,
        prepare_destination,
        source_folder,
        write_json,
        write_shards,
    )

    source_model = model
    if hasattr(model, "report") and hasattr(model, "original"):  # a RunResult
        pipeline = pipeline or str(model.pipeline)
        source_model, model = model.original, model.model
    model = unwrap_compiled(model)
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model.config, "to_dict")):
        raise CheckpointError(f"save_pretrained writes Hugging Face models; this model is a {type(model).__name__} "
                              "(a form only optistack runs, e.g. ONNX or an engine): use result.save(dir) and "
                              "optistack.load_model")
    expected = _skeleton_state(model)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, list[str]] = {}
    handled, dense = set(), []
    with torch.no_grad():
        for name, module in model.named_modules():
            made = quantized_tensors(name, module)
            if made is None:
                continue
            handled.add(name)
            if made == "dense":  # e.g. int4 with a ragged last group: float weights, listed in `ignore`
                dense.append(name)
                tensors[f"{name}.weight"] = module.dequantized_weight(torch.float32).cpu()
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach().cpu()
                continue
            layer_tensors, scheme = made
            _check_linear_in_architecture(expected, name)
            tensors.update(layer_tensors)
            schemes.setdefault(scheme_key(scheme), []).append(name)
        tensors.update(_plain_state(model, handled))
    _validate(tensors, expected, handled, model)
    ignore = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in handled] + dense
    quant = quantization_config(schemes, ignore) if schemes else None
    final, tmp = prepare_destination(path)
    try:
        files = write_shards(tmp, tensors, _parse_size(max_shard_size))
        write_json(tmp / "config.json", config_dict(model, quant))
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        companions = copy_companions(source_folder(source_model) or source_folder(model), tmp, tokenizer)
        write_json(tmp / MARKER, {
            "written_by": "optistack save_pretrained", "pipeline": pipeline,
            "format": quant["format"] if quant else "plain transformers (float weights)",
            "quantized_layers": {json_key: len(names) for json_key, names in schemes.items()},
            "dense_fallback": dense, "files": files, "companions": companions,
            "loads_with": "transformers.AutoModel*.from_pretrained" + (" + compressed-tensors; vLLM" if quant else ""),
        })
        commit_destination(tmp, final)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _skeleton_state(model: Any) -> dict[str, tuple[int, ...]] | None:
    """{key: shape} the architecture builds from config.json (on the meta device), or None if unbuildable."""
    import torch

    try:
        with torch.device("meta"):
            skeleton = type(model)(model.config)
    except Exception:
        return None
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def _check_linear_in_architecture(expected: dict | None, name: str) -> None:
    from .compressed_tensors import CheckpointError

    if expected is not None and f"{name}.weight" in expected and len(expected[f"{name}.weight"]) != 2:
        raise CheckpointError(f"{name}: quantized, but the architecture's layer there has a "
                              f"{len(expected[name + '.weight'])}-d weight; compressed-tensors stores Linear layers")


def _plain_state(model: Any, handled: set[str]) -> dict[str, Any]:
    """Every state-dict tensor outside the quantized layers, tied copies left out (transformers re-ties
    them from config.json); a tensor subclass we do not know how to store is refused."""
    from ..layers.int8_embedding import Int8Embedding
    from .compressed_tensors import CheckpointError

    out, seen = {}, {}
    rows = {name: m for name, m in model.named_modules() if isinstance(m, Int8Embedding)}
    for name, m in rows.items():  # int8 rows (embed-int8): the float table they stand for, a plain embedding
        out[f"{name}.weight"] = m.weight.detach().cpu()
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        if prefix in handled or prefix in rows:
            continue
        if type(t).__name__ not in ("Tensor", "Parameter"):
            raise CheckpointError(f"{key} is a {type(t).__name__}, which this format cannot store; "
                                  "use result.save(dir) and optistack.load_model")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen and t.numel():
            if tie:
                continue  # e.g. lm_head.weight is embed_tokens.weight
            t = t.clone()
        seen.setdefault(ptr, key)
        out[key] = t.detach().cpu()
    return out


def _validate(tensors: dict, expected: dict | None, handled: set[str], model: Any) -> None:
    """Every tensor the architecture expects is written with its shape, and nothing it would not load."""
    from .compressed_tensors import CheckpointError

    if expected is None:
        return
    quant_names = {f"{n}.{p}" for n in handled for p in ("weight_packed", "weight_scale", "weight_zero_point",
                                                          "weight_shape", "weight", "bias")}
    extra = [k for k in tensors if k not in expected and k not in quant_names]
    if extra:
        owner = extra[0].rsplit(".", 1)[0]
        kind = type(model.get_submodule(owner)).__name__ if owner else "model"
        raise CheckpointError(f"{owner or extra[0]} is a {kind} ({', '.join(extra[:3])}...): only optistack runs it "
                              "(fused kernels and the like); use result.save(dir) and optistack.load_model")
    for key, shape in expected.items():
        prefix = key.rsplit(".", 1)[0]
        if key not in tensors:
            if prefix in handled:
                continue
            if getattr(model.config, "tie_word_embeddings", False) and key.endswith("lm_head.weight"):
                continue
            raise CheckpointError(f"{key} is missing from the model: transformers would initialize it randomly")
        got = tuple(tensors[key].shape)
        if prefix not in handled and got != shape:
            raise CheckpointError(f"{key} has shape {list(got)}, but config.json builds {list(shape)} (structured "
                                  "pruning changes shapes); transformers could not load it: use result.save(dir)")
