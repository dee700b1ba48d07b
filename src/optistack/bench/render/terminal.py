"""Terminal rendering with rich: `report.print()` in colour, `str(report)` as plain text."""
from __future__ import annotations

import io
from typing import Any

from ..report import Report
from . import format as f

TEXT_WIDTH = 200  # the table is not expanded, so this is only an upper bound for str(report)
_NUMERIC = {0, 3, 4, 5, 7, 8, 9, 10}
_HEADERS = {"speedup [95% CI]": "speedup\n[95% CI]", "cumulative [95% CI]": "cumulative\n[95% CI]",
            "latency ms p50 / p90 / p99": "latency ms\np50 / p90 / p99", "peak mem": "peak\nmem",
            "first call ms": "first call\nms"}
# Too narrow for every column: speed and accuracy first, then latency, memory and size.
_SPLIT = ([0, 1, 2, 3, 4, 6, 7], [0, 1, 5, 8, 9, 10])


def _rich():
    try:
        from rich import box
        from rich.console import Console, Group
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # pragma: no cover - rich is in the `report` extra
        raise ImportError("printing a report needs rich: pip install 'optistack[report]'") from None
    return box, Console, Group, Table, Text


def _step_table(report: Report, keep: list[int], caption: str | None) -> Any:
    box, _, _, Table, Text = _rich()
    names = f.columns(report)
    headers = dict(_HEADERS, **{names[6]: names[6].replace(" before", "\nbefore")})
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, caption=caption, caption_justify="left")
    for i in keep:
        table.add_column(headers.get(names[i], names[i]), justify="right" if i in _NUMERIC else "left",
                         overflow="fold", no_wrap=i in (0, 2))
    for step, cells in zip(report.steps, f.rows(report)):
        styled: list[Any] = [Text(c) for c in cells]
        styled[2] = Text(cells[2], style=f.STATUS_STYLE.get(step.status, ""))
        worse = f.delta_worse(step)
        if worse is not None:
            styled[7] = Text(cells[7], style="red" if worse else "green")
        table.add_row(*(styled[i] for i in keep))
    return table


def build(report: Report, console: Any = None) -> Any:
    """The report as one rich renderable; tables are split in two when `console` is too narrow for one."""
    box, _, Group, Table, Text = _rich()
    parts: list[Any] = [Text(f.title(report), style="bold")]
    for label, value in f.header_fields(report):
        parts.append(Text.assemble((f"{label}: ", "dim"), value))
    parts.append(Text.assemble(("baseline: ", "dim"), f.baseline_text(report)))

    direction = f.direction(report)
    caption = f"{f.metric_name(report)}: {direction}" if direction else None
    if report.steps:
        table = _step_table(report, list(range(len(f.columns(report)))), caption)
        wide = console.options.update_width(10_000) if console is not None else None
        if console is not None and console.measure(table, options=wide).maximum > console.width:
            parts += [_step_table(report, _SPLIT[0], caption), _step_table(report, _SPLIT[1], None)]
        else:
            parts.append(table)
    else:
        parts.append(Text("no passes were run", style="dim"))

    for i, step, reason in f.reason_lines(report):
        parts.append(Text.assemble(f"#{i} {step.text or step.pass_name} ",
                                   (step.status, f.STATUS_STYLE.get(step.status, "")), f": {reason}"))
    noisy = f.noisy_line(report)
    if noisy:
        parts.append(Text(noisy, style="yellow"))

    extras = f.extras_table(report)
    if extras:
        header, rows = extras
        xt = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="workload measurements",
                   title_justify="left")
        for i, name in enumerate(header):
            xt.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            xt.add_row(*(Text(c) for c in row))
        parts += [Text(""), xt]

    parts.append(Text(f.final_line(report), style="bold"))
    return Group(*parts)


def print_report(report: Report, console: Any = None) -> None:
    _, Console, *_ = _rich()
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged (CI, make): rich would assume 80 columns
            console = Console(width=160)
    console.print(build(report, console))


def render_text(report: Report, width: int = TEXT_WIDTH) -> str:
    """Plain text: no colour, no ANSI escapes."""
    _, Console, *_ = _rich()
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False,
                      no_color=True, highlight=False, emoji=False, legacy_windows=False)
    console.print(build(report, console))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
