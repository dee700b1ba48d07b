"""What `mixed-precision` learns from running the float model on its calibration batches: how much the
loss cares about each output channel of each layer (mean squared gradient), and which layers read
the same input (q/k/v, gate/up), so they can take one choice together.
"""
from __future__ import annotations

from typing import Any

import torch

ROWS_PER_BACKWARD = 4  # calibration windows per forward+backward (bounds the activations kept)


def _logits(out: Any) -> torch.Tensor | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    return logits if isinstance(logits, torch.Tensor) and logits.ndim == 3 else None


def loss_moments(model: Any, batches: list, layers: dict[str, Any]) -> tuple[dict[str, tuple] | None, str]:
    """({layer: (f [out], H [in, in])}, "") or (None, why not) for a model with no token loss.

    With g_t = dL/dy_t the gradient of the summed next-token cross-entropy at token t of the layer's
    output and x_t its input: f_i = mean_t g_ti^2, and H = sum_t a_t x_t x_t^T / sum_t a_t with
    a_t = |g_t|^2, the inputs' second moments weighted by how much the loss cares about each token
    (a token with huge activations but no say in the loss, like an attention sink, weighs little).
    Together they give sum_t g_ti^2 (x_t . d)^2 ~= n f_i d^T H d, exact when g_ti^2 factors as
    a_t * b_i. Gradients are taken with respect to the layers' outputs only (`autograd.grad`): no
    parameter's `.grad` is touched, and the input embeddings' output is made a graph leaf, so it works
    whatever the parameters' `requires_grad`."""
    import torch.nn.functional as F

    from ..linears import features

    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if not isinstance(embed, torch.nn.Module):
        return None, "the model has no input embeddings (no token loss to weigh the errors by)"
    if not batches or "input_ids" not in batches[0][1]:
        return None, "the calibration inputs are not token windows (no next-token loss)"
    dims = {n: features(m) for n, m in layers.items()}
    g2 = {n: torch.zeros(dims[n][1], dtype=torch.float64) for n in layers}
    hw = {n: torch.zeros(dims[n][0], dims[n][0]) for n in layers}
    weight = {n: 0.0 for n in layers}
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    tokens = 0

    def keep(name: str) -> Any:
        def hook(_m: Any, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                ins[name], outs[name] = args[0], out
        return hook

    def leaf(_m: Any, _args: Any, out: Any) -> Any:
        return out.detach().requires_grad_(True)

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    handles.append(embed.register_forward_hook(leaf))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for args, kwargs in batches:
                ids = kwargs["input_ids"]
                for i in range(0, ids.shape[0], ROWS_PER_BACKWARD):
                    part = ids[i:i + ROWS_PER_BACKWARD]
                    ins.clear()
                    outs.clear()
                    logits = _logits(model(*args, **{**kwargs, "input_ids": part}))
                    if logits is None:
                        return None, "the model's output has no [batch, tokens, vocab] logits"
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), part[:, 1:].flatten(), reduction="sum")
                    names = list(outs)
                    grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
                    with torch.no_grad():
                        for n, g in zip(names, grads):
                            if g is None:
                                continue
                            sq = g.detach().reshape(-1, g.shape[-1]).float().pow(2)
                            g2[n] += sq.sum(0).double().cpu()
                            a = sq.sum(1)
                            x = ins[n].detach().reshape(-1, ins[n].shape[-1]).float()
                            hw[n] += ((x * a[:, None]).t() @ x).cpu()
                            weight[n] += float(a.sum())
                    tokens += part.numel()
                    del logits, loss, grads
    finally:
        for h in handles:
            h.remove()
        ins.clear()
        outs.clear()
    return {n: (g2[n] / max(tokens, 1), hw[n] / max(weight[n], 1e-30)) for n in layers}, ""


def shared_inputs(model: Any, batch: tuple, layers: dict[str, Any]) -> list[list[str]]:
    """Groups of layer names (in model order) that read the very same input tensor in one forward call on
    the first calibration window; a layer never called is a group of its own."""
    seen: dict[str, tuple[int, torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def pre(_m: Any, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = (id(args[0]), args[0])  # the tensor is kept, so ids stay unique
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    args, kwargs = batch
    first = {k: (v[:1] if k == "input_ids" and isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            model(*args, **first)
    finally:
        for h in handles:
            h.remove()
    groups: dict[Any, list[str]] = {}
    for n in layers:
        groups.setdefault(seen[n][0] if n in seen else ("alone", n), []).append(n)
    seen.clear()
    return list(groups.values())
