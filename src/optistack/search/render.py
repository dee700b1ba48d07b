"""Rendering a search result: table cells, markdown / HTML / plain text, rich, and the Pareto PNG.

rich and matplotlib are imported only inside the functions that draw with them.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

from .objective import meets_budget


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def row_cells(result: Any, r: Any) -> list[str]:
    speed = result.speed(r)
    low, high = r.speedup_ci95
    ci = f" [{low:.2f}, {high:.2f}]" if result.objective in ("latency", "size") and low and high else ""
    mark = "best" if result.best is not None and r.pipeline == result.best.pipeline else ""
    size = r.model_bytes / 1e6 if isinstance(r.model_bytes, (int, float)) else None
    return [r.pipeline, f"{_num(speed, '.2f')}x{ci}", _num(r.accuracy_drop, '.4g'), _num(size, '.2f'),
            "yes" if meets_budget(r, result.max_accuracy_drop) else "no", mark]


def markdown_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    clean = lambda c: c.replace("|", "\\|")  # noqa: E731 - pipeline text holds regexes such as a|b
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def text_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows])


def print_search(result: Any, console: Any = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the `search` extra
        print(str(result))
        return
    console = console or Console()
    console.print(result.summary, markup=False, highlight=False)
    table = Table(title=f"Pareto front ({len(result.pareto)} of {len(result.records)} trials)")
    for col in result.pareto.COLUMNS:
        wide = col == "pipeline"  # the other cells are short: keep them on one line, fold the pipeline
        table.add_column(col, justify="left" if wide else "right", overflow="fold", no_wrap=not wide,
                         min_width=24 if wide else None)
    for row in result.pareto.rows():
        table.add_row(*[escape_rich(c) for c in row], style="bold green" if row[-1] == "best" else None)
    console.print(table)


def escape_rich(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def plot_search(result: Any, path: str | Path) -> Path:
    fig = pareto_figure(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_title(result: Any) -> str:
    """The workload's name (not the store key with its fingerprint), the objective and the budget."""
    return (f"{result.name}: {result.objective} search, max_accuracy_drop={result.max_accuracy_drop:g}\n"
            f"{len(result.measured)} measured trials; marker area ~ model size; numbers = Pareto front (key below)")


def pareto_figure(result: Any) -> Any:
    """The Pareto plot as a matplotlib Figure (Agg canvas, pyplot untouched). Front points carry numbers,
    staggered up and down, and a key under the axes names each pipeline: nearby points (int8-dynamic
    next to int8-weight) would otherwise print their names on top of each other."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is in the `search` extra
        raise ImportError("plotting a search needs matplotlib: pip install 'optistack[search]'") from None
    measured = result.measured
    front = result.pareto.records
    key_inches = 0.2 * (len(front) + 1)
    fig = Figure(figsize=(8.5, 5.0 + key_inches), dpi=120)
    FigureCanvasAgg(fig)
    ax, key_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [5.0, key_inches]})
    sizes = [r.model_bytes for r in measured if isinstance(r.model_bytes, (int, float))]
    biggest = max(sizes) if sizes else 1

    def area(r: Any) -> float:
        return 30 + 170 * (r.model_bytes / biggest) if isinstance(r.model_bytes, (int, float)) else 40

    def y(r: Any) -> float:
        return r.accuracy_drop if isinstance(r.accuracy_drop, (int, float)) else math.nan

    others = [r for r in measured if r not in front]
    ax.scatter([result.speed(r) for r in others], [y(r) for r in others], s=[area(r) for r in others],
               color="#999999", alpha=0.6, label="trial")
    ax.scatter([result.speed(r) for r in front], [y(r) for r in front], s=[area(r) for r in front],
               color="#1f6feb", label="Pareto front")
    key = []
    for i, r in enumerate(front, start=1):  # the front is sorted by speed: neighbours alternate above/below
        ax.annotate(str(i), (result.speed(r), y(r)), textcoords="offset points", xytext=(5, 6 if i % 2 else -12),
                    fontsize=8, fontweight="bold", color="#1f6feb")
        cells = row_cells(result, r)
        label = r.pipeline if len(r.pipeline) <= 60 else r.pipeline[:59] + "…"
        key.append(f"{i:>2}  {label}  ({cells[1]}, accuracy drop {cells[2]}, {cells[3]} MB)")
    if result.best is not None:
        ax.scatter([result.speed(result.best)], [y(result.best)], marker="*", s=300, color="#d29922", zorder=5,
                   label="best pipeline (within budget, beats the original)")
    ax.axhline(result.max_accuracy_drop, color="#cf222e", linestyle="--", linewidth=1,
               label=f"max_accuracy_drop={result.max_accuracy_drop:g}")
    ax.axvline(1.0, color="#333333", linewidth=0.8)
    speed_name = "speedup" if result.objective in ("latency", "size") else f"{result.objective} gain"
    ax.set_xlabel(f"{speed_name} vs the original (x, higher is better)")
    ax.set_ylabel("accuracy drop from the original (lower is better)")
    ax.set_title(plot_title(result), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key) or "no trial measured", va="top", ha="left", fontsize=8,
                family="monospace", transform=key_ax.transAxes)
    fig.tight_layout()
    return fig
