"""Model-side utilities every layer needs: where a model lives, the module under a compile wrapper,
inputs in one calling convention, outputs as one flat tensor.

They sit in core so passes, workloads and the benchmark use the same answer (a pass must not import
a workload to learn which device a model is on). torch is imported inside the functions: importing
this module (and `optistack`) stays free of torch.
"""
from __future__ import annotations

from typing import Any

from .errors import WorkloadError

# One call's inputs in the workload's calling convention: model(*args, **kwargs).
Inputs = tuple[tuple[Any, ...], dict[str, Any]]

_WRAPPER_ATTRS = ("__self__", "_torchdynamo_orig_callable", "__wrapped__")


def unwrap_compiled(model: Any) -> Any:
    """The module under torch.compile wrappers (`_orig_mod`, nested up to 4 deep), else `model` itself.
    Compiling changes no weights, so whatever reads weights or a signature reads them here."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def model_device(model: Any, _depth: int = 0) -> Any:
    """The torch.device a model's weights live on (first parameter, else first buffer, else its
    `.device`); None when unknown (an exported runtime, a plain function), so inputs then stay put.

    Looks through wrappers that hide the module: torch.compile'd modules and functions, bound methods.
    """
    import torch

    for attr in ("parameters", "buffers"):
        tensors = getattr(model, attr, None)
        if callable(tensors):
            try:
                for t in tensors():
                    return t.device
            except Exception:  # some wrappers expose parameters() but cannot iterate it
                pass
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if _depth < 3:
        for attr in _WRAPPER_ATTRS:
            inner = getattr(model, attr, None)
            if inner is not None and inner is not model:
                found = model_device(inner, _depth + 1)
                if found is not None:
                    return found
    return None


def device_type(model: Any, default: str = "cpu") -> str:
    """`model_device(model).type` ("cpu", "cuda", ...), else the type of `default` ("cuda:1" -> "cuda")."""
    device = model_device(model)
    return device.type if device is not None else default.split(":")[0]


def to_device(obj: Any, device: Any) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device` (no-op for None)."""
    import torch

    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def normalize_inputs(example: Any) -> Inputs:
    """A tensor, a tuple/list of positional args, a dict of kwargs, or an (args, kwargs) pair -> (args, kwargs).

    A 2-item tuple/list counts as (args, kwargs) only when its first item is a tuple/list and its second a dict.
    """
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        if len(example) == 2 and isinstance(example[0], (tuple, list)) and isinstance(example[1], dict):
            return tuple(example[0]), dict(example[1])
        return tuple(example), {}
    return (example,), {}


def flatten_outputs(outputs: Any) -> Any:
    """Every tensor in a tensor/tuple/list/dict/ModelOutput, flattened and joined, as float32 on CPU.

    Other objects inside outputs (an HF KV cache, say) are state rather than results and are left out.
    """
    import torch

    parts: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, torch.Tensor):
            parts.append(obj.detach().reshape(-1).to("cpu", torch.float32))
        elif isinstance(obj, dict):  # ModelOutput is a dict too; keys in insertion order
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (tuple, list)):
            for value in obj:
                visit(value)
        elif isinstance(obj, (int, float, bool)):
            parts.append(torch.tensor([float(obj)]))
        elif hasattr(obj, "__array__"):  # numpy arrays from exported runtimes
            parts.append(torch.as_tensor(obj).reshape(-1).to(torch.float32))
        # anything else (e.g. an HF KV cache object) is state, not a result: not scored

    visit(outputs)
    if not parts:
        raise WorkloadError(f"generic: the model's outputs ({type(outputs).__name__}) hold no tensors to compare")
    return torch.cat(parts)


def output_field(outputs: Any, name: str, what: str, dims: int) -> Any:
    """`name` of a model's outputs as a tensor of `dims` dimensions (its own dtype): the attribute of a
    ModelOutput, the key of a dict (else its first value), the first item of a tuple or list (searched
    the same way), or the tensor (or array, from an exported runtime) itself. Raises WorkloadError
    naming `what` (e.g. "smollm2: logits") when it is none of these or has another shape."""
    import torch

    from .errors import WorkloadError

    if hasattr(outputs, name):
        outputs = getattr(outputs, name)
    elif isinstance(outputs, dict):
        outputs = outputs[name] if name in outputs else next(iter(outputs.values()))
    elif isinstance(outputs, (tuple, list)) and outputs:
        return output_field(outputs[0], name, what, dims)
    if not isinstance(outputs, torch.Tensor):
        try:
            outputs = torch.as_tensor(outputs)
        except Exception as exc:
            raise WorkloadError(f"{what}: cannot read it from a {type(outputs).__name__} output") from exc
    if outputs.dim() != dims:
        raise WorkloadError(f"{what}: expected {dims} dimensions, got shape {tuple(outputs.shape)}")
    return outputs

