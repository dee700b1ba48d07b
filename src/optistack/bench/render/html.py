"""HTML for Jupyter (`Report._repr_html_`): one self-contained <div>, inline styles only, all text escaped."""
from __future__ import annotations

from html import escape

from ..report import Report
from . import format as f

_NUMERIC = {0, 3, 4, 5, 7, 8, 9, 10}
_FONT = "font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:13px;line-height:1.4"
_TABLE = "border-collapse:collapse;margin:6px 0;font-variant-numeric:tabular-nums"
_TH = "padding:4px 8px;border-bottom:2px solid #888;text-align:{align};white-space:nowrap;font-weight:600"
_TD = "padding:3px 8px;border-bottom:1px solid #ddd;text-align:{align};vertical-align:top"
_MONO = "font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12px"


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric: set[int], raw_cells: bool = False) -> str:
    """`rows` are escaped here unless `raw_cells` (then the caller has already escaped them)."""
    def align(i: int) -> str:
        return "right" if i in numeric else "left"

    head = "".join(f'<th style="{_TH.format(align=align(i))}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td style="{_TD.format(align=align(i))}">{c if raw_cells else _e(c)}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _status(status: str) -> str:
    color = f.STATUS_HTML.get(status, "inherit")
    weight = "700" if status == "failed" else "600"
    return f'<span style="color:{color};font-weight:{weight}">{_e(status)}</span>'


def _delta(step, text: str) -> str:
    worse = f.delta_worse(step)
    if worse is None:
        return _e(text)
    return f'<span style="color:{"#cf222e" if worse else "#1a7f37"}">{_e(text)}</span>'


def render_html(report: Report) -> str:
    parts = [f'<div class="optistack-report" style="{_FONT}">',
             f'<div style="font-weight:700;font-size:15px">{_e(f.title(report))}</div>']
    lines = []
    for label, value in f.header_fields(report):
        shown = f'<code style="{_MONO}">{_e(value)}</code>' if label == "pipeline" else _e(value)
        lines.append(f'<span style="color:#666">{_e(label)}:</span> {shown}')
    lines.append(f'<span style="color:#666">baseline:</span> {_e(f.baseline_text(report))}')
    parts.append(f'<div>{"<br>".join(lines)}</div>')

    if report.steps:
        header = f.columns(report)
        direction = f.direction(report)
        if direction:
            header[6] += f" ({direction})"
        rows = []
        for step, cells in zip(report.steps, f.rows(report)):
            row = [_e(c) for c in cells]
            row[1] = f'<code style="{_MONO}">{row[1]}</code>'
            row[2] = _status(step.status)
            row[7] = _delta(step, cells[7])
            rows.append(row)
        parts.append(_table(header, rows, _NUMERIC, raw_cells=True))
    else:
        parts.append('<div style="color:#666">no passes were run</div>')

    notes = [f'#{i} <code style="{_MONO}">{_e(s.text or s.pass_name)}</code> {_status(s.status)}: {_e(r)}'
             for i, s, r in f.reason_lines(report)]
    noisy = f.noisy_line(report)
    if noisy:
        notes.append(f'<span style="color:#9a6700">&#9888; {_e(noisy)}</span>')
    if notes:
        items = "".join(f"<li>{n}</li>" for n in notes)
        parts.append(f'<ul style="margin:4px 0;padding-left:20px">{items}</ul>')

    extras = f.extras_table(report)
    if extras:
        header, rows = extras
        parts.append('<div style="font-weight:600;margin-top:6px">workload measurements</div>')
        parts.append(_table(header, rows, set(range(1, len(header)))))

    parts.append(f'<div style="font-weight:700;margin-top:4px">{_e(f.final_line(report))}</div>')
    parts.append("</div>")
    return "\n".join(parts)
