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
searches and folds its per-channel scales and leaves the layers float; GPTQ rounds the scaled weights, and
(`awq_check=model`, the default) a copy with the scales undone beside them, and keeps the model closer to
the float one on held-out calibration text (`awq_model_check.py`; `block`: judged block by block,
`awq_check.py`; `off`: the scales kept as they are).
A plain `awq` has already rounded every layer to int4 and the float weights it scaled are gone (an
`Int4Linear` keeps codes only), so `gptq` after it finds nothing to round and says so.

If anything fails, every layer already swapped is put back, so the model is never left half rounded.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

from ...core.config import check
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..linears import plan_linears, set_module, weight_rows
from .awq_check import FOLDS_ATTR
from .gptq_blocks import calibrate_and_round
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
    # after awq{quantize=false}: keep AWQ's scales only where GPTQ does better with them, judged on the whole model
    # (awq_model_check.py), block by block (awq_check.py; `true` means this), or not at all (`off`; `false`)
    awq_check: bool | Literal["model", "block", "off"] = "model"
    awq_check_z: float = 2.0  # ... by more than this many standard errors of the per-sequence difference
    awq_check_samples: int = 32  # held-out calibration windows the whole-model check scores on

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.calib_samples >= 1, f"option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check(self.calib_seq_len >= 2, f"option 'calib_seq_len' must be >= 2; got {self.calib_seq_len}")
        check(1 <= self.block_size <= 4096, f"option 'block_size' must be between 1 and 4096 (columns rounded "
                                            f"between two lazy updates); got {self.block_size}")
        check(math.isfinite(self.damp) and 0 < self.damp <= 1, f"option 'damp' must be in (0, 1] (a fraction of "
                                                                f"H's mean diagonal added to it); got {self.damp}")
        if isinstance(self.awq_check, bool):  # the older spelling: true judged blocks
            object.__setattr__(self, "awq_check", "block" if self.awq_check else "off")
        check(self.awq_check in ("model", "block", "off"),
              f"option 'awq_check' must be model, block or off; got {self.awq_check!r}")
        check(1 <= self.awq_check_samples <= 1024,
              f"option 'awq_check_samples' must be between 1 and 1024 (windows); got {self.awq_check_samples}")
        check(math.isfinite(self.awq_check_z) and 0.0 <= self.awq_check_z <= 100.0,
              f"option 'awq_check_z' must be between 0 and 100 (standard errors); got {self.awq_check_z}")


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
            layer, stats[name], reason = self._layer(layers[name], hsum, solve)
            for target in [name, *(a for a, p in plan.aliases.items() if p == name)]:
                originals.setdefault(target, model.get_submodule(target))
                set_module(model, target, layer)
            tally.add(name, layer, reason)

        head = find_head(model)
        checked: list[bool | None] = []
        taken: dict[str, Any] = {}  # the scaled blocks the whole-model check took out
        check_info: dict[str, Any] = {}
        before, after = None, None
        if cfg.awq_check == "block":
            before = self._awq_check(model, checked)
        elif cfg.awq_check == "model" and getattr(model, FOLDS_ATTR, None):
            before, after = self._model_check(model, ctx, stats, solve, taken, check_info)
        try:
            mode = calibrate_and_round(model, batches, layers, round_layer, self.name, before, after)
            head_info = quantize_head(model, cfg.head, lambda n, lin: swap_to_int4(model, n, lin, tally),
                                      plan.skipped)
        except BaseException:  # put every swapped layer back: the model is never left half rounded
            for name, module in [*taken.items(), *originals.items()]:
                set_module(model, name, module)
            if head is not None:
                set_module(model, *head)
            raise
        model.__dict__.pop(FOLDS_ATTR, None)  # awq's record is used up (awq_check.py)
        if cfg.awq_check == "model" and before is not None and "awq_scales_kept" not in check_info:
            check_info["awq_check_skipped"] = f"calibration ran {mode}, not block by block"
        info = {**tally.info(len(plan.skipped)), **plan.info(), **head_info, **calib_info, "calibration": mode,
                "block_size": cfg.block_size, "damp": cfg.damp, "act_order": cfg.act_order, "clip": cfg.clip,
                **error_summary(stats), "solve_seconds": round(solve[0], 2),
                **({"awq_blocks_kept": checked.count(True), "awq_blocks_undone": checked.count(False)}
                   if checked else {}), **check_info,
                "quantize_seconds": round(time.perf_counter() - start, 2)}
        return PassResult(model, modified=True, info=info)

    def _model_check(self, model: Any, ctx: PassContext, stats: dict, solve: list, taken: dict,
                     check_info: dict) -> tuple[Any, Any]:
        """(before_block, after_blocks) of the whole-model check (awq_model_check.py), or (None, None) with the
        reason in `check_info` where it cannot judge."""
        from .awq_model_check import Reference, UnscaledStream, choose_body, judge_windows

        cfg = self.config
        ids = judge_windows(ctx, cfg.calib_samples, cfg.calib_seq_len, cfg.awq_check_samples, self.name) \
            if _token_windows((ctx.calibration_inputs(1) or [None])[0]) else None
        if ids is None:
            check_info["awq_check_skipped"] = (f"no calibration windows of {cfg.calib_seq_len} tokens after the "
                                               f"{cfg.calib_samples} GPTQ calibrates on; AWQ's scales kept")
            return None, None
        from ...core.modeling import model_device

        try:
            ref = Reference(model, ids.to(model_device(model)))
        except ValueError as exc:
            check_info["awq_check_skipped"] = f"{exc}; AWQ's scales kept"
            return None, None
        stream = UnscaledStream(model, getattr(model, FOLDS_ATTR), lambda lin, hsum: self._layer(lin, hsum, solve)[:2])

        def after_blocks() -> None:
            out, info = choose_body(model, ref, stream, cfg.awq_check_z)
            taken.update(out)
            check_info.update(info)
            if out:
                stats.update(stream.stats)

        return stream.before_block, after_blocks

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

    def _layer(self, lin: Any, hsum: Any, solve: list[float]) -> tuple[Any, Any, str]:
        """(the Int4Linear GPTQ rounds `lin` to on H, its stats, why its kernel)."""
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
        return layer, st, reason


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
