"""`awq`: Activation-aware Weight Quantization (Lin et al., MLSys 2024) to group-wise int4.

Our own implementation of the method (not AutoAWQ's code). For each decoder block in turn:

1. run the block on the calibration hidden states and record mean |x| per input channel of its
   Linear layers (`passes/calibration.py`) and the inputs of the attention / MLP / o_proj / down_proj;
2. per group of Linears sharing an input, grid-search alpha in [0, 1): s = mean|x|^alpha, quantize
   W diag(s), keep the s whose block output is closest (MSE) to the float block's;
3. fold 1/s into the RMSNorm weight (or the previous Linear's output rows) so the float function is
   unchanged, search a clipping range per group (`clip`), and swap in `Int4Linear` layers;
4. run the quantized block to get the next block's inputs.

Details of the search are in `awq_search.py`, storage and kernels in `optistack.layers.int4`. Which layers share
an input, per architecture, is the table in `awq_mappings.py` (Llama/Mistral/Qwen2/SmolLM2, Phi-3
with fused qkv_proj/gate_up_proj, GPT-NeoX, GPT-2 with Conv1D layers, OPT); any other model is left
unchanged with the reason (`rtn-int4` needs no such table). Linear layers outside the groups (e.g.
`lm_head` when not skipped) get plain round-to-nearest.

Calibration: the workload's calibration text (never its evaluation text), re-cut into
`calib_samples` windows of `calib_seq_len` tokens and run as one batch, block by block: only one
block's inputs are held at a time, so calibration memory does not grow with depth. Each block is
deep-copied before its scales are folded in (`own_block`), so the pass is copy-on-write: the runner
hands it a copy that shares the model's tensors, and only the blocks it rewrites are new memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator

from ...core.config import check
from ...core.errors import PassApplyError, PreconditionError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..calibration import capture_block_inputs, with_hidden
from ..linears import as_linear, is_conv1d, plan_linears, set_module
from .awq_check import FOLDS_ATTR, AwqFold, Originals
from .awq_rounding import ROUNDINGS, gptq_rounder
from .rtn import Int4Config, Int4Tally, swap_to_int4


@dataclasses.dataclass(frozen=True)
class AwqConfig(Int4Config):
    bits: int = 4
    calib_samples: int = 32
    calib_seq_len: int = 128
    n_grid: int = 20
    clip: bool = True
    search_samples: int = 8
    # false: search and fold the scales only, leaving the layers float for a rounding pass after it
    # (`awq{quantize=false},gptq`: AWQ's scales, GPTQ's rounding)
    quantize: bool = True
    # the rounding candidate scales are judged by: `gptq` re-judges the best ones by GPTQ's rounding on
    # calibration sequences its H did not see (awq_rounding.py); `auto`: gptq with quantize=false (the scales
    # are for a rounding pass after it, `gptq` in the recipe), rtn otherwise
    rounding: str = "auto"
    rounding_candidates: int = 3  # the best alphas by RTN judged again by GPTQ (with the identity)
    # ... and one of them is kept over the identity only where its held-out error is lower by this many
    # standard errors of the per-sequence difference (0: wherever it is lower at all)
    judge_z: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rounding in ROUNDINGS, f"option 'rounding' must be one of {', '.join(ROUNDINGS)}; "
                                          f"got {self.rounding!r}")
        check(self.quantize is False or self.rounding != "gptq",
              "option 'rounding=gptq' needs quantize=false: awq rounds to nearest itself; for GPTQ's "
              "rounding run awq{quantize=false},gptq")
        check(1 <= self.rounding_candidates <= 1000, f"option 'rounding_candidates' must be between 1 and 1000; "
                                                     f"got {self.rounding_candidates}")
        check(0.0 <= self.judge_z <= 100.0, f"option 'judge_z' must be between 0 and 100 (standard errors); "
                                            f"got {self.judge_z}")
        check(self.bits == 4, f"option 'bits' must be 4 (weights are stored in the int4 kernels' format); "
                              f"got {self.bits}")
        check(self.calib_samples >= 1, f"option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check(self.calib_seq_len >= 2, f"option 'calib_seq_len' must be >= 2; got {self.calib_seq_len}")
        check(self.search_samples >= 1, f"option 'search_samples' must be >= 1; got {self.search_samples}")
        check(1 <= self.n_grid <= 1000, f"option 'n_grid' must be between 1 and 1000; got {self.n_grid}")


def calibration_ids(ctx: PassContext, samples: int, seq_len: int, pass_name: str) -> Any:
    """[n, seq_len] token ids cut from the workload's calibration windows (n <= samples)."""
    import torch

    def ids_of(item: Any) -> torch.Tensor:
        args, kwargs = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) else ((item,), {})
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise PreconditionError(f"{pass_name}: calibration inputs must carry token ids (input_ids); "
                                 f"got {type(ids).__name__}")
        return ids.reshape(-1).cpu()

    items = ctx.calibration_inputs(samples)
    if not items:
        raise PreconditionError(f"{pass_name}: needs calibration text: run it with a workload that has "
                             f"calibration_inputs (got {'no workload' if ctx.workload is None else 'none'})")
    per = ids_of(items[0]).numel()
    needed = math.ceil(samples * seq_len / max(per, 1))
    if needed > len(items):
        items = ctx.calibration_inputs(needed) or items
    flat = torch.cat([ids_of(it) for it in items])
    if flat.numel() < 2:
        raise PreconditionError(f"{pass_name}: the calibration text has {flat.numel()} tokens; it needs at least 2")
    seq_len = min(seq_len, flat.numel())  # short calibration text: one shorter window (info reports its length)
    n = min(samples, flat.numel() // seq_len)
    return flat[: n * seq_len].view(n, seq_len)


def first_block_inputs(model: Any, block: Any, ids: Any) -> tuple[tuple, dict]:
    """(args, kwargs) the first decoder block is called with for `ids` (the model stops there)."""
    seen = capture_block_inputs(model, block, [((), {"input_ids": ids, "use_cache": False})])
    if not seen:
        raise PassApplyError("awq: the model never called its first decoder block")
    return seen[0]


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when rich is installed; otherwise silent."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def own_block(blocks: Any, i: int, prefix: str, name_of: dict[int, str]) -> Any:
    """Put a deep copy of block `i` in its place and return it: the scales fold into the copy's norms and
    linears, so the model AWQ was given shares its tensors and keeps them (copy-on-write, one block at a
    time: the extra memory is one float block, not the model)."""
    import copy

    block = copy.deepcopy(blocks[i])
    blocks[i] = block
    name_of.update({id(m): n for n, m in block.named_modules(prefix=prefix)})
    return block


class AwqPass(ConfiguredPass):
    """Activation-aware int4 weight quantization of decoder LMs in `awq_mappings.py`; needs calibration text."""

    name = "awq"
    Config = AwqConfig
    takes = frozenset({MODULE})
    lossy = True
    copy_on_write = True  # edits a deep copy of each block (`own_block`), never its input's tensors

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        from ...layers.int4 import choose_kernel, param_dtype_for
        from .awq_mappings import find_mapping, resolve_groups
        from .awq_search import Quantizer, ScaleGroup, awq_layer
        from .head import quantize_head

        start = time.perf_counter()
        cfg = self.config
        plan = plan_linears(model, self.name, cfg.skip)  # checks the model is a torch module
        tally = Int4Tally(cfg.group_size, cfg.zero_mode)
        mapping, why = find_mapping(model)
        if mapping is None:
            return PassResult(model, modified=False, info={"reason": f"not supported: {why}"})
        if not plan.chosen:
            return plan.unchanged(model, tally.info(len(plan.skipped)))
        ids = calibration_ids(ctx, cfg.calib_samples, cfg.calib_seq_len, self.name)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and cfg.calib_seq_len > limit:
            raise PassApplyError(f"{self.name}: calib_seq_len={cfg.calib_seq_len} exceeds the model's "
                                 f"max_position_embeddings={limit}")
        blocks = model.get_submodule(mapping.blocks)
        for name, m in list(blocks.named_modules(prefix=mapping.blocks)):  # Conv1D -> nn.Linear: scales fold into rows
            if is_conv1d(m):
                set_module(model, name, as_linear(m))
        model_cfg = getattr(model, "config", None)
        chosen = set(plan.chosen)
        name_of = {id(m): n for n, m in model.named_modules()}
        first = next(iter(resolve_groups(mapping, blocks[0], model_cfg)[0].linears.values())).weight
        param_dtype = param_dtype_for(choose_kernel(first.device, first.shape[0], first.shape[1], cfg.group_size)[0])
        quantizer = Quantizer(cfg.group_size, cfg.zero_mode, param_dtype, cfg.clip)
        rounding = (lambda x: gptq_rounder(x, cfg.group_size, cfg.zero_mode, param_dtype)) \
            if self._rounding() == "gptq" else None
        inp = first_block_inputs(model, blocks[0], ids.to(first.device))
        grouped: set[str] = set()
        alphas: dict[str, list[float]] = {}
        rtn_mse = awq_mse = 0.0
        scaled = 0
        folds: list[AwqFold] = []
        with torch.no_grad(), progress_bar(len(blocks), f"{self.name}: calibrating blocks") as advance:
            for i in range(len(blocks)):
                before = blocks[i]  # the input model's block: its tensors stay as they are (exact undo)
                block = own_block(blocks, i, f"{mapping.blocks}.{i}", name_of)
                groups = [ScaleGroup(g.label, g.prev, g.linears, g.inspect, g.prev_rows)
                          for g in resolve_groups(mapping, block, model_cfg)]
                full = {rel: name_of[id(m)] for g in groups for rel, m in g.linears.items()}
                grouped.update(full.values())
                mine = {rel for rel, name in full.items() if name in chosen}
                no_clip = {rel: (rows(block, model_cfg) if rows is not None else None)
                           for rel, rows in mapping.no_clip.items()}

                def swap(rel: str, lin: Any, wmin: Any, wmax: Any, block: Any = block, full: dict = full) -> None:
                    swap_to_int4(block, rel, lin, tally, wmin, wmax, label=full[rel])

                report = awq_layer(block, inp, mine, quantizer, cfg.n_grid, cfg.search_samples,
                                   swap if cfg.quantize else None, groups, no_clip, rounding, cfg.rounding_candidates,
                                   cfg.judge_z)
                scaled += sum(1 for g in groups if g.prev is not None for rel in g.linears if rel in mine)
                for label, alpha in report.alphas.items():
                    alphas.setdefault(label, []).append(alpha)
                rtn_mse += report.rtn_mse
                awq_mse += report.awq_mse
                if not cfg.quantize:  # the layers stay float: a rounding pass after it may undo a block's scales
                    rel_of = {id(m): n for n, m in block.named_modules()}
                    folds.extend(AwqFold(f"{mapping.blocks}.{i}", rel_of[id(prev)], [rel_of[id(lin)] for lin in lins],
                                         s.detach().cpu(), None if rows is None else rows.detach().cpu(),
                                         Originals.of(before, [rel_of[id(m)] for m in (prev, *lins)]))
                                 for prev, lins, s, rows in report.folds
                                 if id(prev) in rel_of and all(id(lin) in rel_of for lin in lins))
                out = block(*inp[0], **inp[1])
                inp = with_hidden(inp, out[0] if isinstance(out, (tuple, list)) else out)
                advance()
            del inp
            if not cfg.quantize:  # the rounding pass after it may undo a block's scales (awq_check.py)
                setattr(model, FOLDS_ATTR, folds)
                return PassResult(model, modified=True, info=self._scales_info(
                    scaled, plan, mapping, ids, alphas, rtn_mse, awq_mse, start))
            modules = dict(model.named_modules())
            for name in [n for n in plan.chosen if n not in grouped]:  # outside the groups: round-to-nearest
                layer = swap_to_int4(model, name, modules[name], tally)
                for alias in (a for a, p in plan.aliases.items() if p == name):
                    set_module(model, alias, layer)
            head = quantize_head(model, cfg.head, lambda n, lin: swap_to_int4(model, n, lin, tally),
                                 plan.skipped)
        info = {**tally.info(len(plan.skipped)), **plan.info(), **head,
                **self._search_info(mapping, ids, alphas, rtn_mse, awq_mse, start)}
        return PassResult(model, modified=True, info=info)

    def _search_info(self, mapping: Any, ids: Any, alphas: dict[str, list[float]], rtn_mse: float, awq_mse: float,
                     start: float) -> dict[str, Any]:
        cfg = self.config
        return {
            "architecture": mapping.name,
            "calib_samples": int(ids.shape[0]), "calib_seq_len": int(ids.shape[1]), "n_grid": cfg.n_grid,
            "search_samples": min(cfg.search_samples, int(ids.shape[0])),
            "clip": cfg.clip, "block_mse_ratio": round(awq_mse / rtn_mse, 4) if rtn_mse > 0 else 1.0,
            "rounding": self._rounding(), "groups_unscaled": sum(a == 0 for v in alphas.values() for a in v),
            **{f"alpha_{k}": round(sum(v) / len(v), 3) for k, v in alphas.items()},
            "quantize_seconds": round(time.perf_counter() - start, 2),
        }

    def _rounding(self) -> str:
        cfg = self.config
        if cfg.rounding == "auto":
            return "rtn" if cfg.quantize else "gptq"
        return cfg.rounding

    def _scales_info(self, scaled: int, plan: Any, mapping: Any, ids: Any, alphas: dict[str, list[float]],
                     rtn_mse: float, awq_mse: float, start: float) -> dict[str, Any]:
        """`quantize=false`: scales folded, every layer still float (`head` is the rounding pass's to apply)."""
        return {"quantize": False, "layers_scaled": scaled, "layers_skipped": len(plan.skipped),
                "group_size": self.config.group_size, "zero_point": self.config.zero_mode, **plan.info(),
                **self._search_info(mapping, ids, alphas, rtn_mse, awq_mse, start)}
