"""PNG plot of a report: speed (x) against accuracy lost (y), one point per measured step.

The speed axis is the timed call's latency speedup, or for causal LMs decode tokens/s or TTFT
speedup (`axis`; by default decode when the report has it: `bench.headline.default_axis`).

Uses `matplotlib.figure.Figure` with the Agg canvas directly, so the user's pyplot backend and
global state are never touched.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ..headline import AXES, default_axis, step_speedup
from ..report import Report, Step
from . import format as f

APPLIED, REJECTED, BASE, BUDGET = "#1f6feb", "#cf222e", "#333333", "#cf222e"


def _figure_types():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is in the `report` extra
        raise ImportError("plotting a report needs matplotlib: pip install 'optistack[report]'") from None
    return Figure, FigureCanvasAgg


def _label(i: int, step: Step, width: int = 38) -> str:
    text = f"#{i} {f.one_line(step.text or step.pass_name)}"
    return text if len(text) <= width else text[: width - 1] + "…"


_XLABEL = {"latency": "cumulative speedup vs the original (x, 95% CI) → faster",
           "decode": "decode tokens/s vs the original (x, 95% CI) → faster",
           "ttft": "time-to-first-token speedup vs the original (x, 95% CI) → faster"}


def _points(report: Report, axis: str = "latency") -> tuple[list[dict[str, Any]], list[str]]:
    """Plottable steps (x, xerr, y or None, status, label) and the labels of the steps left out."""
    points, left_out, current = [], [], 1.0
    for i, s in enumerate(report.steps, 1):
        x, ci = step_speedup(report, s, axis, current)  # a rejected step without a cumulative: from its own
        if s.status not in ("applied", "rejected") or not f.finite(x):
            why = s.status if s.status not in ("applied", "rejected") else f"no {axis} measurement"
            left_out.append(f"{_label(i, s, 30)} ({why})")
            continue
        xerr = None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(f.finite(c) for c in ci):
            xerr = (max(x - ci[0], 0.0), max(ci[1] - x, 0.0))
        acc = s.accuracy
        y = acc.drop_from_original if acc is not None and f.finite(acc.drop_from_original) else None
        wrecked = (acc is None and s.status == "rejected") or (acc is not None and not f.finite(acc.after))
        points.append({"x": x, "xerr": xerr, "y": y, "status": s.status, "label": _label(i, s),
                       "why": "non-finite" if wrecked else "n/a"})
        if s.status == "applied":
            current = x
    return points, left_out


def _y_range(ys: list[float], budget: float | None) -> tuple[float, float]:
    hi = max([0.0] + ys + ([budget] if budget is not None else []))
    lo = min([0.0] + ys)
    span = (hi - lo) or (budget if budget else 0.01)
    return lo - 0.12 * span, hi + 0.30 * span


_OFFSETS = ((7, 5), (7, -13), (-7, 5), (-7, -13), (7, 17), (-7, 17), (7, -25), (-7, -25))


def _place_labels(fig: Any, ax: Any, anns: list[Any], fixed: list[Any]) -> None:
    """Move each point label to the first offset that stays inside the axes and overlaps no earlier label."""
    for ann in anns + fixed:
        ann.set_in_layout(False)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for _ in range(3):  # widen the x range (up to half again) until labels fit to the right of their points
        box = ax.get_window_extent(renderer)
        over = max([a.get_window_extent(renderer).x1 - box.x1 for a in anns] + [0.0])
        if over <= 0:
            break
        x0, x1 = ax.get_xlim()
        new_x1 = ax.transData.inverted().transform((box.x1 + min(over, box.width / 2) + 4, 0))[0]
        ax.set_xlim(x0, max(new_x1, x1))
    box = ax.get_window_extent(renderer)
    taken = [a.get_window_extent(renderer) for a in fixed]
    for ann in anns:
        for dx, dy in _OFFSETS:
            ann.set_position((dx, dy))
            ann.set_horizontalalignment("left" if dx > 0 else "right")
            ext = ann.get_window_extent(renderer)
            inside = box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1
            if inside and not any(ext.overlaps(t) for t in taken):
                break
        else:
            ann.set_position(_OFFSETS[0])
            ann.set_horizontalalignment("left")
        taken.append(ann.get_window_extent(renderer))


def plot_report(report: Report, path: str | Path, axis: str | None = None) -> Path:
    """Write the PNG; `axis`: "latency", "decode" or "ttft" (None: `default_axis`)."""
    axis = default_axis(report) if axis is None else axis
    if axis not in AXES:
        raise ValueError(f"unknown plot axis {axis!r}; choose one of {', '.join(AXES)}")
    Figure, FigureCanvasAgg = _figure_types()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(10, 5.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    metric, direction = f.metric_name(report), f.direction(report)
    budget = report.max_accuracy_drop if f.finite(report.max_accuracy_drop) else None
    points, left_out = _points(report, axis)

    finite_ys = [p["y"] for p in points if p["y"] is not None]
    lo, hi = _y_range(finite_ys, budget)
    top = hi - 0.08 * (hi - lo)  # the row where steps without a finite accuracy are drawn
    fixed: list[Any] = []  # texts the point labels must not cover
    for p in points:
        if p["y"] is None:
            p["y"], p["missing"] = top, True
    if any(p.get("missing") for p in points):  # a row above the data, not a measured value
        ax.axhline(top, color="#999999", ls=":", lw=0.8)
        fixed.append(ax.text(0.005, top, "no finite accuracy", transform=ax.get_yaxis_transform(),
                             fontsize=7, color="#666666", va="bottom"))

    # The accuracy budget: everything above the line fails the gate.
    if budget is not None:
        ax.axhspan(budget, hi, color=BUDGET, alpha=0.07, lw=0)
        ax.axhline(budget, color=BUDGET, ls="--", lw=1, label=f"accuracy budget (max drop {f.fmt_sig3(budget)})")
    ax.axhline(0, color="#999999", lw=0.8)
    ax.axvline(1.0, color="#999999", lw=0.8)

    # The path the pipeline took through applied steps.
    path_x = [1.0] + [p["x"] for p in points if p["status"] == "applied" and not p.get("missing")]
    path_y = [0.0] + [p["y"] for p in points if p["status"] == "applied" and not p.get("missing")]
    ax.plot(path_x, path_y, color=APPLIED, lw=1, alpha=0.35, zorder=1)

    ax.scatter([1.0], [0.0], marker="D", s=50, color=BASE, zorder=3, label="baseline (original model)")
    base_ann = ax.annotate("baseline", (1.0, 0.0), xytext=(6, -12), textcoords="offset points", fontsize=8,
                           color=BASE)
    seen: set[str] = set()
    for p in points:
        rejected, missing = p["status"] == "rejected", p.get("missing", False)
        color = REJECTED if rejected else APPLIED
        kind = ("rejected" if rejected else "applied") + (f" (accuracy {p['why']})" if missing else "")
        marker = "^" if missing else ("X" if rejected else "o")
        if p["xerr"] is not None:
            ax.errorbar([p["x"]], [p["y"]], xerr=[[p["xerr"][0]], [p["xerr"][1]]], fmt="none",
                        ecolor=color, elinewidth=1.2, capsize=3, zorder=2)
        ax.scatter([p["x"]], [p["y"]], marker=marker, s=70 if rejected else 50, color=color, zorder=4,
                   edgecolors="white", linewidths=0.6, label=None if kind in seen else kind)
        seen.add(kind)
        p["text"], p["color"] = p["label"] + (f" (accuracy {p['why']})" if missing else ""), color

    xs = [1.0] + [p["x"] for p in points] + [p["x"] + p["xerr"][1] for p in points if p["xerr"]]
    xs += [p["x"] - p["xerr"][0] for p in points if p["xerr"]]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi / max(x_lo, 1e-9) > 8:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlim(x_lo / 1.3, x_hi * 1.8)
    else:
        pad = 0.08 * ((x_hi - x_lo) or 0.5)
        ax.set_xlim(x_lo - pad, x_hi + 3 * pad)
    ax.set_ylim(lo, hi)
    anns = [ax.annotate(p["text"], (p["x"], p["y"]), xytext=(7, 5), textcoords="offset points", fontsize=8,
                        color=p["color"]) for p in points]

    ax.set_xlabel(_XLABEL[axis])
    ax.set_ylabel(f"accuracy drop from the original ({metric})\n(0 = unchanged, up = worse"
                  + (f"; {metric}: {direction})" if direction else ")"))
    ax.grid(True, color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    title = f"{f.title(report)}\n" + "\n".join(textwrap.wrap(report.pipeline or "", 120)[:2])
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    if left_out:
        note = "not plotted: " + ", ".join(left_out)
        fig.supxlabel("\n".join(textwrap.wrap(note, 160)[:2]), fontsize=7, color="#666666", x=0.01, ha="left")
    _place_labels(fig, ax, anns, [base_ann] + fixed)
    fig.savefig(path, format="png")
    return path
