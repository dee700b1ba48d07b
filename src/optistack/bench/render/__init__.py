"""Renderers for a `Report`: terminal (rich), markdown, HTML and a PNG plot.

They read only the report's data model; the shared wording and number formats live in `format`.
`render` is the one entry point for tools such as `optistack report out.json --format md`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FORMATS = ("text", "md", "html", "png")


def render(report: Any, fmt: str, path: str | Path | None = None) -> str | Path:
    """Render `report` as `fmt`; text formats return the string (and write it to `path` when given),
    "png" writes `path` (required) and returns it."""
    if fmt == "png":
        if path is None:
            raise ValueError("format 'png' needs an output path")
        return report.plot(path)
    if fmt == "text":
        text = str(report)
    elif fmt in ("md", "markdown"):
        text = report.to_markdown()
    elif fmt == "html":
        text = report._repr_html_()
    else:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path is not None:
        Path(path).write_text(text)
    return text
