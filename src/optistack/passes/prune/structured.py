"""`prune-structured`: remove whole MLP neurons (and optionally attention heads) so Linear layers shrink.

Unlike `prune-magnitude`, the weight matrices really get smaller, so dense kernels do less work and
the model runs faster (roughly in proportion to the FLOPs removed) and uses less memory.

Recognized structures:

- HF BERT-style blocks: `<p>.intermediate.dense` -> `<p>.output.dense` (BERT, RoBERTa, MiniLM, ...);
  with `heads > 0` also attention heads: `<a>.self.{query,key,value}` -> `<a>.output.dense`, updating
  the self-attention module's `num_attention_heads` and `all_head_size`.
- Llama-style MLPs: `gate_proj`, `up_proj` -> `down_proj` (Llama, Mistral, Qwen2, SmolLM2, ...).
  Head pruning is not supported for these (grouped-query attention); `heads > 0` is refused.
- MLP modules holding only the two (or three) projections and elementwise activations/dropout:
  GPT-2 `c_fc -> c_proj` (transformers Conv1D), GPT-NeoX `dense_h_to_4h -> dense_4h_to_h`,
  T5 `wi -> wo` and `wi_0, wi_1 -> wo`, `fc1 -> fc2` (CLIP/Phi-style MLPs, and OPT's decoder layer),
  Phi-3's fused `gate_up_proj -> down_proj` (neuron j is rows j and j + width of gate_up_proj).
- `nn.Sequential(..., Linear, <elementwise activation/dropout>..., Linear, ...)`.

Importance of hidden neuron j = prod_i ||row j of first linear i|| * ||column j of the second linear||
(`l2` or `l1` norms). Importance of a head = ||its rows of query, key and value|| * ||its columns of
the output projection||. The least important `sparsity` fraction of neurons (`heads` fraction of
heads) is removed in every block; at least one neuron and one head always remain.

`model.config.intermediate_size` (or `d_ff`, `n_inner`, `ffn_dim`) is updated when every pruned MLP
ends at the same width, so
`save_pretrained`/`from_pretrained` round-trips. A head-pruned BERT cannot be described by a
BertConfig (head size is hidden_size / num_attention_heads), so its config is left unchanged and
`info["config_reloadable"]` is false: reload it from a pickled module, not `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..linears import features, is_conv1d, is_linear, weight_rows

# (first projections, second projection, kind) held by one MLP module; see the module docstring
_PAIRS = ((("c_fc",), "c_proj", "gpt2"), (("dense_h_to_4h",), "dense_4h_to_h", "neox"),
          (("wi",), "wo", "t5"), (("wi_0", "wi_1"), "wo", "t5"), (("fc1",), "fc2", "fc"),
          (("gate_up_proj",), "down_proj", "fused"))
_LAYERS_WITH_FC = ("OPTDecoderLayer",)  # decoder layers whose fc1 -> fc2 sit beside attention
_CONFIG_WIDTH = ("intermediate_size", "d_ff", "n_inner", "ffn_dim")


@dataclasses.dataclass(frozen=True)
class StructuredPruneConfig(PassConfig):
    sparsity: float = 0.25
    heads: float = 0.0
    importance: Literal["l2", "l1"] = "l2"

    def __post_init__(self) -> None:
        check(
            0.0 <= self.sparsity < 1.0,
            f"prune-structured: option 'sparsity' (fraction of MLP neurons removed) must be >= 0 and < 1; "
            f"got {self.sparsity}",
        )
        check(
            0.0 <= self.heads < 1.0,
            f"prune-structured: option 'heads' (fraction of attention heads removed) must be >= 0 and < 1; "
            f"got {self.heads}",
        )


@dataclasses.dataclass
class _Mlp:
    name: str
    kind: str  # "bert" | "llama" | "sequential" | a `_PAIRS` kind ("fused": one first, gate rows then up rows)
    firsts: list[Any]  # linears producing the hidden neurons (rows are neurons)
    second: Any  # linear consuming them (columns are neurons)


@dataclasses.dataclass
class _Attention:
    name: str
    attn: Any  # module holding num_attention_heads / attention_head_size / all_head_size
    qkv: list[Any]
    out: Any


def _elementwise_types() -> tuple[type, ...]:
    from torch import nn

    return (
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
        nn.CELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
        nn.Dropout, nn.Identity,
    )  # fmt: skip


def _plain_linear(m: Any) -> bool:
    import torch

    return isinstance(m, torch.nn.Linear) and type(m.weight.data) is torch.Tensor


def _elementwise(m: Any) -> bool:
    """An activation or dropout acting on each neuron alone (transformers' activations included)."""
    return isinstance(m, _elementwise_types()) or type(m).__name__.endswith("Activation")


def _pair(name: str, m: Any) -> _Mlp | None:
    """The `_PAIRS` MLP `m` holds, when nothing but elementwise modules sits beside its projections."""
    for firsts, second, kind in _PAIRS:
        mods = [getattr(m, a, None) for a in (*firsts, second)]
        if not all(is_linear(x) for x in mods):
            continue
        others = [c for n, c in m.named_children() if n not in (*firsts, second)]
        if type(m).__name__ in _LAYERS_WITH_FC and kind == "fc" or all(_elementwise(c) for c in others):
            return _Mlp(name, kind, mods[:-1], mods[-1])
    return None


def _width(g: _Mlp) -> int:
    """Hidden neurons of an MLP: the second projection's inputs."""
    return features(g.second)[0]


def _find_mlps(model: Any) -> list[_Mlp]:
    import torch

    mods = dict(model.named_modules())
    elementwise = _elementwise_types()
    found: list[_Mlp] = []
    for name, m in mods.items():
        gate, up, down = (getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
        pair = None if isinstance(m, torch.nn.Sequential) else _pair(name, m)
        if all(_plain_linear(x) for x in (gate, up, down)):
            found.append(_Mlp(name, "llama", [gate, up], down))
        elif pair is not None:
            found.append(pair)
        elif name.split(".")[-1] == "intermediate":
            prefix = name[: -len("intermediate")]
            first = getattr(m, "dense", None)
            second = getattr(mods.get(prefix + "output"), "dense", None)
            if _plain_linear(first) and _plain_linear(second):
                found.append(_Mlp(name, "bert", [first], second))
        elif isinstance(m, torch.nn.Sequential):
            children = list(m)
            for i, first in enumerate(children):
                j = i + 1
                while j < len(children) and isinstance(children[j], elementwise):
                    j += 1
                if j > i + 1 and j < len(children) and _plain_linear(first) and _plain_linear(children[j]):
                    found.append(_Mlp(f"{name}.{i}" if name else str(i), "sequential", [first], children[j]))
    def fits(g: _Mlp) -> bool:
        outs = [features(f)[1] for f in g.firsts]
        return all(o == (2 if g.kind == "fused" else 1) * _width(g) for o in outs)

    return [g for g in found if fits(g)]


def _find_attention(model: Any) -> list[_Attention]:
    found = []
    for name, m in model.named_modules():
        attn, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
        if attn is None or not _plain_linear(out):
            continue
        qkv = [getattr(attn, a, None) for a in ("query", "key", "value")]
        n, hd = getattr(attn, "num_attention_heads", None), getattr(attn, "attention_head_size", None)
        if not all(_plain_linear(x) for x in qkv) or not isinstance(n, int) or not isinstance(hd, int):
            continue
        if all(x.out_features == n * hd for x in qkv) and out.in_features == n * hd:
            found.append(_Attention(name, attn, qkv, out))
    return found


def _norms(w: Any, dim: int, kind: str) -> Any:
    import torch

    return torch.linalg.vector_norm(w.detach().float(), ord=2 if kind == "l2" else 1, dim=dim)


def _keep(lin: Any, idx: Any, dim: int) -> None:
    """Keep only outputs (dim=0) or inputs (dim=1) `idx` of a Linear or Conv1D, in place."""
    import torch

    w, conv = lin.weight, is_conv1d(lin)
    wdim = 1 - dim if conv else dim  # Conv1D stores [in, out]
    lin.weight = torch.nn.Parameter(w.data.index_select(wdim, idx).contiguous(), requires_grad=w.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            b = lin.bias
            lin.bias = torch.nn.Parameter(b.data.index_select(0, idx).contiguous(), requires_grad=b.requires_grad)
        if conv:
            lin.nf = idx.numel()
        else:
            lin.out_features = idx.numel()
    elif conv:
        lin.nx = idx.numel()
    else:
        lin.in_features = idx.numel()


def _n_remove(fraction: float, n: int) -> int:
    return max(0, min(n - 1, round(fraction * n)))


def _top(scores: Any, k: int) -> Any:
    import torch

    return torch.topk(scores, k).indices.sort().values.to(torch.long)


def _prune_mlp(g: _Mlp, fraction: float, kind: str) -> int:
    import torch

    n = _width(g)
    drop = _n_remove(fraction, n)
    if drop == 0:
        return 0
    score = _norms(weight_rows(g.second), 0, kind)
    for f in g.firsts:
        row_norms = _norms(weight_rows(f), 1, kind)
        score = score * (row_norms[:n] * row_norms[n:] if g.kind == "fused" else row_norms)
    keep = _top(score, n - drop).to(g.second.weight.device)
    rows = torch.cat([keep, keep + n]) if g.kind == "fused" else keep
    for f in g.firsts:
        _keep(f, rows, 0)
    _keep(g.second, keep, 1)
    return drop


def _prune_heads(a: _Attention, fraction: float, kind: str) -> int:
    import torch

    n, hd = a.attn.num_attention_heads, a.attn.attention_head_size
    drop = _n_remove(fraction, n)
    if drop == 0:
        return 0
    rows = torch.cat([x.weight.detach().float() for x in a.qkv], dim=1).reshape(n, -1)
    cols = a.out.weight.detach().float().t().reshape(n, -1)
    score = _norms(rows, 1, kind) * _norms(cols, 1, kind)
    heads = _top(score, n - drop)
    idx = (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1).to(a.out.weight.device)
    for x in a.qkv:
        _keep(x, idx, 0)
    _keep(a.out, idx, 1)
    a.attn.num_attention_heads = n - drop
    a.attn.all_head_size = (n - drop) * hd
    return drop


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


class StructuredPrunePass(ConfiguredPass):
    """Remove the least important MLP neurons (and attention heads) so layers really shrink."""

    name = "prune-structured"
    Config = StructuredPruneConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"{self.name}: expected a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config
        mlps = _find_mlps(model)
        attns = _find_attention(model) if cfg.heads > 0 else []
        if not mlps and not attns:
            return PassResult(model, modified=False, info={"mlps": 0, "reason": (
                "nothing to change: found no prunable structure; expected BERT-style MLPs "
                "(*.intermediate.dense -> *.output.dense), Llama-style MLPs (gate_proj, up_proj -> down_proj), an MLP "
                "module of two float projections and activations (GPT-2, GPT-NeoX, T5, Phi-3, OPT, CLIP) "
                "or nn.Sequential(Linear, activation, Linear)")})
        if cfg.heads > 0 and not attns:
            raise PassApplyError(
                f"{self.name}: heads={cfg.heads} asks for head pruning, which needs BERT-style attention "
                "(<attention>.self.query/key/value -> <attention>.output.dense); none found (Llama-style "
                "grouped-query attention is not supported). Use heads=0 to prune MLP neurons only"
            )
        before = _n_params(model)
        with torch.no_grad():
            neurons_before = sum(_width(g) for g in mlps)
            heads_before = sum(a.attn.num_attention_heads for a in attns)
            neurons = sum(_prune_mlp(g, cfg.sparsity, cfg.importance) for g in mlps)
            heads = sum(_prune_heads(a, cfg.heads, cfg.importance) for a in attns)
        info: dict[str, Any] = {
            "mlps": len(mlps),
            "neurons_removed": neurons,
            "neurons_before": neurons_before,
            "attention_layers": len(attns),
            "heads_removed": heads,
            "heads_before": heads_before,
            "params_before": before,
            "params_after": _n_params(model),
        }
        info.update(_update_config(model, mlps, heads > 0))
        if not (neurons or heads):
            info["reason"] = (f"nothing to change: sparsity={cfg.sparsity} and heads={cfg.heads} remove no neuron "
                              f"or head ({len(mlps)} MLPs, {len(attns)} attention layers found)")
        return PassResult(model, modified=bool(neurons or heads), info=info)


def _update_config(model: Any, mlps: list[_Mlp], heads_pruned: bool) -> dict[str, Any]:
    """Write the new intermediate size into `model.config` when the model has one and it is uniform."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    widths = {_width(g) for g in mlps if g.kind not in ("sequential",)}
    out: dict[str, Any] = {"config_reloadable": not heads_pruned}
    key = next((k for k in _CONFIG_WIDTH if hasattr(config, k)), None)
    if key is not None and len(widths) == 1:
        setattr(config, key, widths.pop())
        out[key] = getattr(config, key)
    elif widths:
        out["config_reloadable"] = False  # widths differ per block: no single intermediate_size
    return out
