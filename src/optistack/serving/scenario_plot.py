"""Latency against load: p50 and p99 TTFT and TPOT against offered QPS, one line per backend, limits drawn.

Same conventions as the report's plot (`bench.render.plot`): a `matplotlib.figure.Figure` on the Agg canvas,
so pyplot's backend and global state are never touched; the same colours for measured series.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from ..bench.render.plot import APPLIED, BUDGET, REJECTED, _figure_types
from .loadgen_scenario import ScenarioResult

_COLOURS = (REJECTED, APPLIED, "#8250df", "#1a7f37", "#bf8700")  # stock first: the reference, in red


def _series(backend: Any, metric: str) -> tuple[list[float], list[float], list[float], list[bool]]:
    runs = sorted((r for r in backend.server_runs if r.offered_qps), key=lambda r: r.offered_qps)
    qps = [r.offered_qps for r in runs]
    p50 = [getattr(r, metric).p50 * 1e3 for r in runs]
    p99 = [getattr(r, metric).p99 * 1e3 for r in runs]
    return qps, p50, p99, [bool(r.meets_limits) for r in runs]


def plot_scenario(result: ScenarioResult, path: str | Path, title: str | None = None) -> Path:
    """Write the PNG: two panels (TTFT, TPOT) in ms against offered QPS; filled markers: runs within the limits."""
    Figure, FigureCanvasAgg = _figure_types()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 5.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    limits = {"ttft_s": result.options.ttft_limit_s * 1e3, "tpot_s": result.options.tpot_limit_s * 1e3}
    names = {"ttft_s": "time to first token (ms)", "tpot_s": "time per output token (ms)"}
    all_qps: list[float] = []
    for ax, metric in zip(axes, ("ttft_s", "tpot_s")):
        for i, backend in enumerate(result.backends):
            colour = _COLOURS[i % len(_COLOURS)]
            qps, p50, p99, ok = _series(backend, metric)
            all_qps += qps
            name = backend.name if len(backend.name) <= 48 else backend.name[:47] + "…"
            ax.plot(qps, p99, color=colour, lw=1.6, label=f"{backend.role} p99 ({name})")
            ax.plot(qps, p50, color=colour, lw=1.0, ls="--", alpha=0.8, label=f"{backend.role} p50")
            for x, y, good in zip(qps, p99, ok):
                ax.scatter([x], [y], s=36, color=colour if good else "white", edgecolors=colour, linewidths=1.2, zorder=3)
            if backend.max_qps is not None:
                ax.axvline(backend.max_qps, color=colour, ls=":", lw=0.9, alpha=0.7)
        ax.axhline(limits[metric], color=BUDGET, ls="--", lw=1, label="limit on p99")
        ax.annotate(f"p99 limit {limits[metric]:g} ms", (0.01, limits[metric]), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8, color=BUDGET)
        ax.set_xlabel("offered load (queries/s, Poisson arrivals)")
        ax.set_ylabel(names[metric])
        ax.grid(True, color="#eeeeee", lw=0.6)
        ax.set_axisbelow(True)
    if all_qps and max(all_qps) / max(min(all_qps), 1e-9) > 8:
        from matplotlib.ticker import FuncFormatter, LogLocator

        for ax in axes:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in axes:
        lo, hi = ax.get_ylim()
        ax.set_ylim(0, max(hi, 1e-3))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    maxes = ", ".join(f"{b.role} {_fmt(b.max_qps)}" for b in result.backends)
    head = textwrap.shorten(title or "server scenario: latency against load", 140, placeholder="…")
    fig.suptitle(f"{head}\nmax QPS within limits: {maxes} (dotted lines); filled markers: runs that met both p99 limits",
                 fontsize=10, x=0.01, ha="left")
    fig.savefig(path, format="png")
    return path


def _fmt(qps: float | None) -> str:
    return "none" if qps is None or not math.isfinite(qps) else f"{qps:.3g}"
