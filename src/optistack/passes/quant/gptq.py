"""`gptq`: error-correcting group-wise int4 rounding (GPTQ, Frantar et al., ICLR 2023).

Our own implementation of the method. Each chosen linear layer is rounded column by column so that
its output on the calibration inputs stays as close as possible to the float layer's: the rounding
error of a column is spread over the columns not yet rounded, through the inverse of the inputs'
second moments H = 2 X^T X / n (the math is in `gptq_solver.py`). The result is the same `Int4Linear`
layers and grid that `rtn-int4` and `awq` produce (`optistack.layers.int4`), so `fuse-kernels`,
`decode-engine` and saving work unchanged; only the codes and the group scales differ.

Calibration is sequential, as in the paper, so memory stays at one block's activations: the inputs of
the first decoder block are captured (`passes/calibration.py`), then for each block in turn H is summed
for its linear layers by forward pre-hooks while the block runs on the calibration batches, the layers
are rounded, and the rounded block is run again to give the next block its inputs. Blocks are found as
`prune-wanda` finds them (`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`);
a model without such a list (or whose first block is not called once per batch) gets one forward pass
over the whole model with hooks on every chosen layer (`info["calibration"] = "single-pass"`). Layers
outside the blocks (`lm_head` when `skip` lets it through) get H from a pass over the whole model
after the blocks are done. Layers reading the same tensor (q/k/v, gate/up) share one X^T X product.

Token models are calibrated on `calib_samples` windows of `calib_seq_len` tokens re-cut from the
workload's calibration text (as `awq` does); other models (and inputs with padding masks or token
types) on `calib_samples` calibration inputs as the workload gives them.

`awq` then `gptq`: run `awq{quantize=false},gptq` (same `group_size` and `zero_grid` in both). AWQ
searches and folds its per-channel scales and leaves the layers float; GPTQ rounds the scaled weights.
A plain `awq` has already rounded every layer to int4 and the float weights it scaled are gone (an
`Int4Linear` keeps codes only), so `gptq` after it finds nothing to round and says so.

If anything fails, every layer already swapped is put back, so the model is never left half rounded.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from ...core.config import check
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..calibration import capture_block_inputs, with_hidden
from ..linears import plan_linears, set_module, weight_rows
from .awq_check import FOLDS_ATTR
from .rtn import Int4Config, Int4Tally, swap_to_int4

CHUNK_TOKENS = 2048  # calibration tokens per forward call (windows are batched up to this)


@dataclasses.dataclass(frozen=True)
class GptqConfig(Int4Config):
    calib_samples: int = 32
    calib_seq_len: int = 128
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    clip: bool = True  # search each group's range (AWQ's clipping search, judged by the group's H block)
    awq_check: bool = False  # after awq{quantize=false}: keep a block's scales only where they help (awq_check.py)
    awq_check_z: float = 0.0  # ... by more than this many standard errors of the per-sequence difference

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.calib_samples >= 1, f"option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check(self.calib_seq_len >= 2, f"option 'calib_seq_len' must be >= 2; got {self.calib_seq_len}")
        check(1 <= self.block_size <= 4096, f"option 'block_size' must be between 1 and 4096 (columns rounded "
                                            f"between two lazy updates); got {self.block_size}")
        check(math.isfinite(self.damp) and 0 < self.damp <= 1, f"option 'damp' must be in (0, 1] (a fraction of "
                                                                f"H's mean diagonal added to it); got {self.damp}")
        check(math.isfinite(self.awq_check_z) and 0.0 <= self.awq_check_z <= 100.0,
              f"option 'awq_check_z' must be between 0 and 100 (standard errors); got {self.awq_check_z}")


class Hessians:
    """Forward pre-hooks that sum X^T X of each layer's inputs; a tensor read by several layers in one
    call is multiplied once. Call `next_call()` after each forward so cached products are dropped."""

    def __init__(self, layers: dict[str, Any]) -> None:
        from .gptq_solver import HessianSum

        self.layers = layers
        self.sums = {n: HessianSum(weight_rows(m).shape[1], m.weight.device) for n, m in layers.items()}
        self._cache: dict[int, tuple[Any, Any]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "Hessians":
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def _hook(self, name: str) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            x = args[0]
            seen = self._cache.get(id(x))
            product = seen[1] if seen is not None and seen[0] is x else None
            self._cache[id(x)] = (x, self.sums[name].add(x, product))  # keeps x alive: ids stay unique
        return hook

    def next_call(self) -> None:
        self._cache.clear()


def _token_windows(item: Any) -> bool:
    """Whether calibration inputs like `item` are plain token ids that may be re-cut into windows: integer
    `input_ids` and no other tensor but an all-ones attention mask (padded batches, token types and
    encoder-decoder inputs are used as the workload gives them)."""
    import torch

    args, kwargs = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) else ((item,), {})
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        return False
    others = [v for v in (*args[1:], *(v for k, v in kwargs.items() if k != "input_ids")) if isinstance(v, torch.Tensor)]
    mask = kwargs.get("attention_mask")
    return all(v is mask and bool((v == 1).all()) for v in others)


def calibration(model: Any, ctx: PassContext, cfg: GptqConfig, name: str) -> tuple[list, dict[str, Any]]:
    """(batches as (args, kwargs) on the model's device, info about them)."""
    from ...core.modeling import model_device
    from ..prune.wanda import calibration_batches
    from .awq import calibration_ids

    first = ctx.calibration_inputs(1)
    if not first or not _token_windows(first[0]):
        batches = calibration_batches(model, ctx, cfg.calib_samples, name)
        return batches, {"calib_samples": len(batches)}
    ids = calibration_ids(ctx, cfg.calib_samples, cfg.calib_seq_len, name)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and ids.shape[1] > limit:
        raise PassApplyError(f"{name}: calib_seq_len={ids.shape[1]} exceeds the model's max_position_embeddings={limit}")
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    rows, device = max(1, CHUNK_TOKENS // ids.shape[1]), model_device(model)
    batches = [((), {"input_ids": ids[i:i + rows].to(device), **extra}) for i in range(0, ids.shape[0], rows)]
    return batches, {"calib_samples": int(ids.shape[0]), "calib_seq_len": int(ids.shape[1])}


def _output(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def calibrate_and_round(model: Any, batches: list, layers: dict[str, Any], round_layer: Any, label: str,
                        before_block: Any = None) -> str:
    """Sum H for `layers` block by block (or in one pass) and call `round_layer(name, H)` on each;
    returns "sequential" or "single-pass". `before_block(block, inputs, layers of it)`: called with each
    block's inputs before its H is summed."""
    import torch

    from ..prune.wanda import decoder_blocks
    from .awq import progress_bar

    done: set[str] = set()
    mode = "single-pass"
    with torch.no_grad():
        blocks = decoder_blocks(model)
        inputs = capture_block_inputs(model, blocks[0], batches) if blocks is not None else []
        if blocks is not None and len(inputs) == len(batches):
            mode = "sequential"
            with progress_bar(len(blocks), f"{label}: calibrating blocks") as advance:
                for block in blocks:
                    inside = {id(m) for m in block.modules()}
                    mine = {n: m for n, m in layers.items() if id(m) in inside}
                    if mine and before_block is not None:
                        before_block(block, inputs, mine)
                    if mine:
                        with Hessians(mine) as hs:
                            for args, kwargs in inputs:
                                block(*args, **kwargs)
                                hs.next_call()
                        for n in mine:
                            round_layer(n, hs.sums[n])
                            done.add(n)
                    if block is not blocks[-1]:  # the rounded block gives the next one its inputs
                        inputs = [with_hidden(inp, _output(block(*inp[0], **inp[1]))) for inp in inputs]
                    advance()
        del inputs
        rest = {n: m for n, m in layers.items() if n not in done}
        if rest:
            with Hessians(rest) as hs:
                for args, kwargs in batches:
                    model(*args, **kwargs)
                    hs.next_call()
            for n in rest:
                round_layer(n, hs.sums[n])
    return mode


def _int4_hint(model: Any) -> str:
    from ...layers.int4 import Int4Linear

    if any(isinstance(m, Int4Linear) for m in model.modules()):
        return ("; its linear layers are already int4 (an Int4Linear keeps codes, not the float weight): to "
                "round AWQ's scaled weights with GPTQ run `awq{quantize=false},gptq`")
    return ""


class GptqPass(ConfiguredPass):
    """Hessian-based error-correcting int4 rounding (GPTQ) to Int4Linear layers; needs calibration data."""

    name = "gptq"
    Config = GptqConfig
    takes = frozenset({MODULE})
    lossy = True
    copy_on_write = True  # swaps in new layers, never writes into its input's tensors

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        from .head import find_head, quantize_head

        start = time.perf_counter()
        cfg = self.config
        plan = plan_linears(model, self.name, cfg.skip)
        tally = Int4Tally(cfg.group_size, cfg.zero_mode)
        if not plan.chosen:
            result = plan.unchanged(model, tally.info(len(plan.skipped)))
            result.info["reason"] += _int4_hint(model)
            return result
        batches, calib_info = calibration(model, ctx, cfg, self.name)
        layers = {n: plan.layers[n] for n in plan.chosen}
        originals: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        solve = [0.0]

        def round_layer(name: str, hsum: Any) -> None:
            stats[name] = self._round(model, name, layers[name], hsum, tally, plan, originals, solve)

        head = find_head(model)
        checked: list[bool | None] = []
        try:
            mode = calibrate_and_round(model, batches, layers, round_layer, self.name,
                                       self._awq_check(model, checked) if cfg.awq_check else None)
            head_info = quantize_head(model, cfg.head, lambda n, lin: swap_to_int4(model, n, lin, tally),
                                      plan.skipped)
        except BaseException:  # put every swapped layer back: the model is never left half rounded
            for name, module in originals.items():
                set_module(model, name, module)
            if head is not None:
                set_module(model, *head)
            raise
        model.__dict__.pop(FOLDS_ATTR, None)  # awq's record is used up (awq_check.py)
        info = {**tally.info(len(plan.skipped)), **plan.info(), **head_info, **calib_info, "calibration": mode,
                "block_size": cfg.block_size, "damp": cfg.damp, "act_order": cfg.act_order, "clip": cfg.clip,
                **error_summary(stats), "solve_seconds": round(solve[0], 2),
                **({"awq_blocks_kept": checked.count(True), "awq_blocks_undone": checked.count(False)}
                   if checked else {}),
                "quantize_seconds": round(time.perf_counter() - start, 2)}
        return PassResult(model, modified=True, info=info)

    def _awq_check(self, model: Any, checked: list) -> Any:
        """The block callback that undoes AWQ's scales where GPTQ does better without them (None: no scales
        recorded on the model)."""
        from .awq_check import keep_scales

        folds = getattr(model, FOLDS_ATTR, None)
        if not folds:
            return None
        by_block: dict[int, list] = {}
        for f in folds:
            by_block.setdefault(id(model.get_submodule(f.block)), []).append(f)

        def round_weight(w: Any, h: Any) -> Any:
            from ...layers.int4_grid import dequantize

            return dequantize(self._solve(w, h)[0])

        def before_block(block: Any, inputs: list, mine: dict[str, Any]) -> None:
            if id(block) not in by_block:
                return
            rel = {id(m): n for n, m in block.named_modules()}
            checked.append(keep_scales(block, by_block[id(block)], [rel[id(m)] for m in mine.values()], inputs,
                                       round_weight, self.config.awq_check_z))

        return before_block

    def _solve(self, w: Any, h: Any) -> tuple[Any, Any, Any, str]:
        """GPTQ's rounding of w [out, in] given H, on the grid of the kernel that will run it: (quantized
        weight, stats, kernel, why that kernel)."""
        from ...layers.int4 import choose_kernel, param_dtype_for
        from .gptq_solver import gptq_quantize

        cfg = self.config
        kernel, reason = choose_kernel(w.device, w.shape[0], w.shape[1], cfg.group_size)
        gq, st = gptq_quantize(w, h, cfg.group_size, cfg.zero_mode, param_dtype_for(kernel), cfg.block_size,
                               cfg.damp, cfg.act_order, cfg.clip)
        return gq, st, kernel, reason

    def _round(self, model: Any, name: str, lin: Any, hsum: Any, tally: Int4Tally, plan: Any,
               originals: dict[str, Any], solve: list[float]) -> Any:
        from ...layers.int4 import Int4Linear, param_dtype_for
        from .gptq_solver import error_vs_rtn

        cfg = self.config
        w = weight_rows(lin).detach()
        started = time.perf_counter()
        h = hsum.hessian()
        gq, st, kernel, reason = self._solve(w, h)
        solve[0] += time.perf_counter() - started
        st = error_vs_rtn(w, gq, h, cfg.zero_mode, param_dtype_for(kernel), st)
        st.tokens = hsum.tokens
        layer = Int4Linear.from_quantized(gq, lin.bias, kernel, w.device)
        layer.weight_dtype = w.dtype
        for target in [name, *(a for a, p in plan.aliases.items() if p == name)]:
            originals.setdefault(target, model.get_submodule(target))
            set_module(model, target, layer)
        tally.add(name, layer, reason)
        return st


def error_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Info keys: GPTQ's output error on the calibration inputs over round-to-nearest's on the same grid
    (mean over layers, per layer kind, and the worst layer), damping raised, layers never called."""
    ratios = {n: s.error / s.rtn_error for n, s in stats.items() if s.rtn_error > 0}
    out: dict[str, Any] = {"layers_uncalibrated": sum(1 for s in stats.values() if s.tokens == 0),
                           "damp_raised": sum(1 for s in stats.values() if s.retries)}
    if not ratios:
        return out
    out["output_error_ratio"] = round(sum(ratios.values()) / len(ratios), 4)
    kinds: dict[str, list[float]] = {}
    for n, r in ratios.items():
        kinds.setdefault(n.rsplit(".", 1)[-1], []).append(r)
    if len(kinds) <= 12:
        out.update({f"output_error_ratio_{k}": round(sum(v) / len(v), 4) for k, v in kinds.items()})
    worst = max(ratios, key=ratios.get)
    out["worst_layer"] = f"{worst} ({ratios[worst]:.3f})"
    return out
