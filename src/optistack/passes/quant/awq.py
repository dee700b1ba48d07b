"""`awq`: Activation-aware Weight Quantization (Lin et al., MLSys 2024) to group-wise int4.

Our own implementation of the method (not AutoAWQ's code). For each decoder block in turn:

1. run the block on the calibration hidden states and record mean |x| per input channel of its
   Linear layers (`passes/calibration.py`) and the inputs of the attention / MLP / o_proj / down_proj;
2. per group of Linears sharing an input, grid-search alpha in [0, 1): s = mean|x|^alpha, quantize
   W diag(s), keep the s whose block output is closest (MSE) to the float block's;
3. fold 1/s into the RMSNorm weight (or the previous Linear's output rows) so the float function is
   unchanged, search a clipping range per group (`clip`), and swap in `Int4Linear` layers;
4. run the quantized block to get the next block's inputs.

Details of the search are in `awq_search.py`, storage and kernels in `int4.py`. Only Llama-style
models (`model.model.layers[i]` with `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`: Llama, SmolLM2, Mistral, Qwen2) are accepted.
Linear layers outside the blocks (e.g. `lm_head` when not skipped) get plain round-to-nearest.

Calibration: the workload's calibration text (never its evaluation text), re-cut into
`calib_samples` windows of `calib_seq_len` tokens and run as one batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator

from ...core.config import check
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..calibration import capture_block_inputs, with_hidden
from ..linears import choose_linears, float_linears
from .rtn import Int4Config, Int4Tally, swap_to_int4

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclasses.dataclass(frozen=True)
class AwqConfig(Int4Config):
    bits: int = 4
    calib_samples: int = 32
    calib_seq_len: int = 128
    n_grid: int = 20
    clip: bool = True
    search_samples: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.bits == 4, f"option 'bits' must be 4 (weights are stored in the int4 kernels' format); "
                              f"got {self.bits}")
        check(self.calib_samples >= 1, f"option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check(self.calib_seq_len >= 2, f"option 'calib_seq_len' must be >= 2; got {self.calib_seq_len}")
        check(self.search_samples >= 1, f"option 'search_samples' must be >= 1; got {self.search_samples}")
        check(1 <= self.n_grid <= 1000, f"option 'n_grid' must be between 1 and 1000; got {self.n_grid}")


def llama_blocks(model: Any, pass_name: str) -> Any:
    """model.model.layers, after checking every block has the Llama structure AWQ folds scales into."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    problem = None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        problem = "it has no model.model.layers"
    else:
        for i, layer in enumerate(layers):
            for name in _LINEARS + _NORMS:
                try:
                    m = layer.get_submodule(name)
                except AttributeError:
                    problem = f"model.model.layers[{i}] has no {name}"
                    break
                if name in _LINEARS and not (type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor):
                    problem = f"model.model.layers[{i}].{name} is a {type(m).__name__}, not a float nn.Linear"
                elif name in _NORMS and getattr(getattr(m, "weight", None), "ndim", 0) != 1:
                    problem = f"model.model.layers[{i}].{name} has no per-channel weight to fold scales into"
                if problem:
                    break
            if problem:
                break
    if problem:
        raise PassApplyError(
            f"{pass_name}: expected a Llama-style causal LM: model.model.layers[i] with self_attn.q_proj/k_proj/"
            f"v_proj/o_proj and mlp.gate_proj/up_proj/down_proj (float nn.Linear), input_layernorm and "
            f"post_attention_layernorm (RMSNorm with a weight); {problem} ({type(model).__name__})")
    return layers


def calibration_ids(ctx: PassContext, samples: int, seq_len: int, pass_name: str) -> Any:
    """[n, seq_len] token ids cut from the workload's calibration windows (n <= samples)."""
    import torch

    def ids_of(item: Any) -> torch.Tensor:
        args, kwargs = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) else ((item,), {})
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise PassApplyError(f"{pass_name}: calibration inputs must carry token ids (input_ids); "
                                 f"got {type(ids).__name__}")
        return ids.reshape(-1).cpu()

    items = ctx.calibration_inputs(samples)
    if not items:
        raise PassApplyError(f"{pass_name}: needs calibration text: run it with a workload that has "
                             f"calibration_inputs (got {'no workload' if ctx.workload is None else 'none'})")
    per = ids_of(items[0]).numel()
    needed = math.ceil(samples * seq_len / max(per, 1))
    if needed > len(items):
        items = ctx.calibration_inputs(needed) or items
    flat = torch.cat([ids_of(it) for it in items])
    n = min(samples, flat.numel() // seq_len)
    if n == 0:
        raise PassApplyError(f"{pass_name}: the calibration text has {flat.numel()} tokens, fewer than "
                             f"calib_seq_len={seq_len}")
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


class AwqPass(ConfiguredPass):
    """Activation-aware int4 weight quantization of Llama-style models; needs calibration text."""

    name = "awq"
    Config = AwqConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        from .awq_search import Quantizer, awq_layer
        from .int4 import choose_kernel, param_dtype_for

        start = time.perf_counter()
        cfg = self.config
        linears = float_linears(model, self.name)
        blocks = llama_blocks(model, self.name)
        chosen, skipped = choose_linears(linears, cfg.skip)
        tally = Int4Tally(cfg.group_size, cfg.zero_point)
        if not chosen:
            return PassResult(model, modified=False, info=tally.info(len(skipped)))
        ids = calibration_ids(ctx, cfg.calib_samples, cfg.calib_seq_len, self.name)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and cfg.calib_seq_len > limit:
            raise PassApplyError(f"{self.name}: calib_seq_len={cfg.calib_seq_len} exceeds the model's "
                                 f"max_position_embeddings={limit}")
        q0 = blocks[0].self_attn.q_proj.weight
        param_dtype = param_dtype_for(choose_kernel(q0.device, q0.shape[0], q0.shape[1], cfg.group_size)[0])
        quantizer = Quantizer(cfg.group_size, cfg.zero_point, param_dtype, cfg.clip)
        inp = first_block_inputs(model, blocks[0], ids.to(q0.device))
        name_of, chosen_set = {id(m): n for n, m in linears.items()}, set(chosen)
        in_blocks = {id(m) for m in blocks.modules()}
        outside = [n for n in chosen if id(linears[n]) not in in_blocks]
        alphas: dict[str, list[float]] = {}
        rtn_mse = awq_mse = 0.0
        with torch.no_grad(), progress_bar(len(blocks), f"{self.name}: calibrating blocks") as advance:
            for block in blocks:
                full = {rel: name_of[id(block.get_submodule(rel))] for rel in _LINEARS}
                mine = {rel for rel, name in full.items() if name in chosen_set}

                def swap(rel: str, lin: Any, wmin: Any, wmax: Any, block: Any = block, full: dict = full) -> None:
                    swap_to_int4(block, rel, lin, tally, wmin, wmax, label=full[rel])

                report = awq_layer(block, inp, mine, quantizer, cfg.n_grid, cfg.search_samples, swap)
                for label, alpha in report.alphas.items():
                    alphas.setdefault(label, []).append(alpha)
                rtn_mse += report.rtn_mse
                awq_mse += report.awq_mse
                out = block(*inp[0], **inp[1])
                inp = with_hidden(inp, out[0] if isinstance(out, (tuple, list)) else out)
                advance()
            del inp
            for name in outside:  # Linears outside the blocks (lm_head unless skipped): round-to-nearest
                swap_to_int4(model, name, linears[name], tally)
        info = tally.info(len(skipped))
        info.update({
            "calib_samples": int(ids.shape[0]), "calib_seq_len": int(ids.shape[1]), "n_grid": cfg.n_grid,
            "search_samples": min(cfg.search_samples, int(ids.shape[0])),
            "clip": cfg.clip, "block_mse_ratio": round(awq_mse / rtn_mse, 4) if rtn_mse > 0 else 1.0,
            **{f"alpha_{k}": round(sum(v) / len(v), 3) for k, v in alphas.items()},
            "quantize_seconds": round(time.perf_counter() - start, 2),
        })
        return PassResult(model, modified=True, info=info)
