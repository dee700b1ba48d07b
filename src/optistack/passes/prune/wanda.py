"""`prune-wanda`: Wanda pruning (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

Each weight is scored |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input channel j over
all calibration tokens (`passes/calibration.py`), and the lowest-scoring `sparsity` fraction of
every output row is zeroed. No weight update, no masks left: the zeros are written into the ordinary
dense weight tensors.

Statistics are gathered as in the paper, block by block, for models whose blocks sit in
`model.layers`, `model.model.layers` (Llama, Mistral, Qwen, Phi-3, SmolLM2, ...), `transformer.h`
(GPT-2), `gpt_neox.layers` or `model.decoder.layers` (OPT): the calibration inputs
of block 0 are captured once, then each block is measured, pruned, and run again to produce the
inputs of the next block, so every block sees what the already-pruned blocks before it produce. That
costs about two forward passes of the model over the calibration data. Linear layers outside those
blocks, and models without such blocks, get their statistics from one pass over the whole model
(`info["stats"]` says which: `sequential` or `single-pass`).

Layers are picked by `passes/linears.py` (nn.Linear and transformers Conv1D, whose [in, out] weight
is pruned through a [out, in] view); a tied weight is pruned once.

Speed: none on dense kernels (see `prune-magnitude`); `prune-2:4` uses the same scores in 2:4 groups.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ...core.config import PassConfig, check, check_regex
from ...core.errors import PassApplyError, PreconditionError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..calibration import capture_block_inputs, input_channel_stats, with_hidden
from ..linears import find_linears, weight_rows

# prune(name, linear, l2) edits linear.weight in place; l2 is None when the layer saw no tokens.
PruneFn = Callable[[str, torch.nn.Linear, "torch.Tensor | None"], None]


@dataclasses.dataclass(frozen=True)
class WandaConfig(PassConfig):
    sparsity: float = 0.5
    calib_samples: int = 16
    skip: str = "lm_head|embed"

    def __post_init__(self) -> None:
        check(0.0 < self.sparsity < 1.0, f"prune-wanda: option 'sparsity' must be between 0 and 1 (exclusive), "
                                         f"the fraction of each row's weights set to zero; got {self.sparsity}")
        check(self.calib_samples >= 1, f"prune-wanda: option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check_regex("prune-wanda", "skip", self.skip)


def wanda_scores(weight: torch.Tensor, l2: torch.Tensor | None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float32 (plain |W| when there are no statistics)."""
    score = weight.detach().abs().float()
    return score if l2 is None else score * l2.to(score.device)[None, :]


def zero_lowest_per_row(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """Zero the round(sparsity * in_features) lowest-scoring entries of every row, in place."""
    k = round(sparsity * weight.shape[1])
    if k <= 0:
        return
    idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
    weight.scatter_(1, idx, 0.0)


def calibration_batches(model: torch.nn.Module, ctx: PassContext, n: int, pass_name: str, hint: str = "") -> list:
    from ...core.modeling import model_device, to_device

    batches = ctx.calibration_inputs(n)
    if not batches:
        raise PreconditionError(
            f"{pass_name}: needs a workload with calibration inputs (activation statistics come from "
            f"running the model on them); got {'no workload' if ctx.workload is None else 'none'}{hint}"
        )
    device = model_device(model)
    out = []
    for b in batches:
        args, kwargs = b if isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], dict) else ((b,), {})
        kwargs = dict(kwargs)
        if hasattr(getattr(model, "config", None), "use_cache"):
            kwargs.setdefault("use_cache", False)  # HF: no KV cache to grow while blocks are re-run
        out.append(to_device((tuple(args), kwargs), device))
    return out


_BLOCK_PATHS = ("model.layers", "layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The ModuleList of decoder blocks (Llama/Mistral/Qwen/Phi-3, GPT-2, GPT-NeoX, OPT), if there is one."""
    for path in _BLOCK_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _block_inputs(model: torch.nn.Module, block: torch.nn.Module, batches: list) -> list | None:
    """(args, kwargs) that `block` is called with for each batch; None if it is not called once per batch."""
    seen = capture_block_inputs(model, block, batches)
    return seen if len(seen) == len(batches) else None


def _run_block(block: torch.nn.Module, inp: tuple[tuple, dict]) -> Any:
    return block(*inp[0], **inp[1])


def prune_with_stats(model: torch.nn.Module, batches: list, layers: dict[str, torch.nn.Linear],
                     prune: PruneFn) -> dict[str, Any]:
    """Gather ||X_j||_2 for `layers` (block by block where possible) and call `prune` on each layer."""
    done: set[str] = set()
    uncalibrated = 0

    def prune_all(group: dict[str, torch.nn.Linear], stats: dict) -> None:
        nonlocal uncalibrated
        with torch.no_grad():
            for name, m in group.items():
                s = stats[name]
                uncalibrated += s.tokens == 0
                prune(name, m, s.l2 if s.tokens else None)
                done.add(name)

    blocks = decoder_blocks(model)
    inputs = _block_inputs(model, blocks[0], batches) if blocks is not None else None
    mode = "sequential" if inputs is not None else "single-pass"
    if inputs is not None:
        for block in blocks:
            ids = {id(m) for m in block.modules()}
            group = {n: m for n, m in layers.items() if id(m) in ids}
            if group:
                prune_all(group, input_channel_stats(block, inputs, group, call=_run_block))
            with torch.inference_mode():  # the next block's inputs, from this block as pruned
                outs = [_run_block(block, inp) for inp in inputs]
            inputs = [with_hidden(inp, o[0] if isinstance(o, (tuple, list)) else o) for inp, o in zip(inputs, outs)]
        del inputs
    rest = {n: m for n, m in layers.items() if n not in done}
    if rest:
        prune_all(rest, input_channel_stats(model, batches, rest))
    return {"stats": mode, "linears_uncalibrated": int(uncalibrated)}


class WandaPrunePass(ConfiguredPass):
    """Unstructured pruning by |weight| x input-activation norm (Wanda); needs calibration inputs."""

    name = "prune-wanda"
    Config = WandaConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"{self.name}: expected a torch.nn.Module, got {type(model).__name__}")
        layers = find_linears(model, self.config.skip, one_per_weight=True)
        if not layers:
            return PassResult(model, modified=False, info={"linears_pruned": 0, "reason": (
                f"nothing to change: no nn.Linear or Conv1D layer with float weights outside skip={self.config.skip!r}")})
        batches = calibration_batches(model, ctx, self.config.calib_samples, self.name)
        sparsity = self.config.sparsity

        def prune(_name: str, m: torch.nn.Linear, l2: torch.Tensor | None) -> None:
            w = weight_rows(m)  # [out, in]; a view of a Conv1D's weight
            zero_lowest_per_row(w, wanda_scores(w, l2), sparsity)

        info = prune_with_stats(model, batches, layers, prune)
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        info = {"linears_pruned": len(layers), "sparsity": round(zeros / total, 6), "weights_zeroed": zeros,
                "weights_total": total, "calib_samples": len(batches), **info}
        return PassResult(model, modified=True, info=info)
