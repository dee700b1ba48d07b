"""GitHub-flavoured markdown: the README/docs form of a report."""
from __future__ import annotations

import re

from ..report import Report
from . import format as f

_SPECIAL = re.compile(r"([\\`*_<|])")  # enough for inline text; '>' and '[' alone are harmless
_NUMERIC = {0, 3, 4, 5, 7, 8, 9, 10}


def md_escape(text: str) -> str:
    """Escape markdown/HTML punctuation so pass reasons like '<b>', '*x*' or 'a|b' show literally."""
    return _SPECIAL.sub(r"\\\1", f.one_line(text))


def md_code(text: str) -> str:
    """Inline code; pipes still need escaping inside a GFM table cell."""
    text = f.one_line(text).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def md_cell(text: str) -> str:
    """A cell we generated ourselves (numbers, status words): only pipes could break the table."""
    return f.one_line(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> list[str]:
    align = ["---:" if i in numeric else ":---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(report: Report) -> str:
    out = [f"### {md_escape(f.title(report))}", ""]
    for label, value in f.header_fields(report):
        shown = md_code(value) if label == "pipeline" else md_escape(value)
        out.append(f"- **{label}:** {shown}")
    out.append(f"- **baseline:** {md_cell(f.baseline_text(report))}")
    out.append("")

    if report.steps:
        header = [md_escape(c) for c in f.columns(report)]
        direction = f.direction(report)
        if direction:
            header[6] += f" ({direction})"
        body = []
        for step, cells in zip(report.steps, f.rows(report)):
            row = [md_cell(c) for c in cells]
            row[1] = md_code(cells[1])
            if step.status == "failed":
                row[2] = f"**{row[2]}**"
            body.append(row)
        out += _table(header, body, _NUMERIC)
    else:
        out.append("_no passes were run_")
    out.append("")

    notes = [f"- #{i} {md_code(s.text or s.pass_name)} **{s.status}**: {md_escape(r)}"
             for i, s, r in f.reason_lines(report)]
    noisy = f.noisy_line(report)
    if noisy:
        notes.append(f"- ⚠ {md_escape(noisy)}")
    if notes:
        out += notes + [""]
    for block in f.traceback_blocks(report):  # a failed step's evidence, folded so the table stays first
        head, _, trace = block.partition("\n")
        out += [f"<details><summary>{md_escape(head.strip('- '))}</summary>", "", "```", trace, "```", "",
                "</details>", ""]

    extras = f.extras_table(report)
    if extras:
        header, rows = extras
        out.append("**Workload measurements**")
        out.append("")
        body = [[md_escape(r[0])] + [md_cell(c) for c in r[1:]] for r in rows]
        out += _table([md_escape(h) for h in header], body, set(range(1, len(header))))
        out.append("")

    out.append(f"**{md_cell(f.final_line(report))}**")
    return "\n".join(out) + "\n"
