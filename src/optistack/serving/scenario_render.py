"""The server scenario as rich tables, from its JSON form (`ScenarioResult.to_dict()`, the report's `scenario`).

Two tables: a summary (each backend side by side, and the gain of the last over the first, > 1 = better) and
every run (Offline and each Server run of the search), so latency against load can be read as numbers too.
"""
from __future__ import annotations

import io
from typing import Any

from ..bench.render.format import DASH, finite, fmt_sig3, fmt_x


def _ms(v: Any) -> str:
    return fmt_sig3(v * 1e3) if finite(v) else DASH


def _pair(stats: dict[str, Any] | None) -> str:
    stats = stats or {}
    return f"{_ms(stats.get('p50'))} / {_ms(stats.get('p99'))}"


def _best(backend: dict[str, Any]) -> dict[str, Any]:
    qps = backend.get("max_qps")
    return next((r for r in backend.get("server_runs", []) if qps is not None and r.get("offered_qps") == qps), {})


def _gain(a: Any, b: Any, lower_is_better: bool) -> str:
    if not (finite(a) and finite(b)) or a <= 0 or b <= 0:
        return DASH
    return fmt_x(a / b if lower_is_better else b / a)


def summary_rows(d: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one column per backend and a gain column (last over first) when there are two or more."""
    backends = d.get("backends", [])
    lim = d.get("limits", {})
    header = ["server scenario"] + [str(b.get("role")) for b in backends]
    two = len(backends) >= 2
    if two:
        header.append(f"{backends[-1].get('role')} vs {backends[0].get('role')} (>1 = better)")
    rows: list[list[str]] = []

    def row(label: str, get: Any, fmt: Any, lower_is_better: bool | None, key: Any = None) -> None:
        """`lower_is_better` None: no gain column for this row; `key` picks the compared number from the value."""
        values = [get(b) for b in backends]
        cells = [label] + [fmt(v) for v in values]
        if two:
            a, b = (key(v) if key and v else v for v in (values[0], values[-1]))
            cells.append(DASH if lower_is_better is None else _gain(a, b, lower_is_better))
        rows.append(cells)

    rows.append(["backend"] + [str(b.get("name")) for b in backends] + ([""] if two else []))

    limits = f"p99 TTFT <= {fmt_sig3(lim.get('ttft_s'))} s, p99 TPOT <= {fmt_sig3(1e3 * lim.get('tpot_s', 0))} ms"
    row(f"max QPS within limits ({limits})", lambda b: b, _max_qps, False, lambda b: b.get("max_qps"))
    if two:  # a max QPS at the top of its range is a lower bound, and so is the gain (both at the top: none)
        kind, gain = (d.get("ratio") or {}).get("max_qps_ratio_is"), rows[-1][-1]
        rows[-1][-1] = DASH if kind is None or gain == DASH else {"at_least": ">= ", "at_most": "<= "}.get(kind, "") + gain
    row("Offline tokens/s (LoadGen)", lambda b: b["offline"]["loadgen"].get("tokens_per_s"), fmt_sig3, False)
    row("Offline requests/s (LoadGen)", lambda b: b["offline"]["loadgen"].get("samples_per_s"), fmt_sig3, False)
    # at each one's own max QPS: capacities compare, latencies (at two different loads) do not
    row("at its max QPS: TTFT ms p50 / p99", lambda b: _best(b).get("ttft_s"), _pair, None)
    row("at its max QPS: TPOT ms p50 / p99", lambda b: _best(b).get("tpot_s"), _pair, None)
    row("at its max QPS: tokens/s", lambda b: _best(b).get("tokens_per_s"), fmt_sig3, False)
    row("at its max QPS: goodput requests/s", lambda b: _best(b).get("goodput_rps"), fmt_sig3, False)
    row("LoadGen vs harness: worst percentile gap", _worst_gap, lambda v: v or DASH, None)
    return header, rows


def _max_qps(backend: dict[str, Any]) -> str:
    qps, top = backend.get("max_qps"), (backend.get("qps_range") or [None, None])[1]
    if not finite(qps):
        return "none met"
    return f">= {fmt_sig3(qps)} (range top)" if qps == top else fmt_sig3(qps)


def _worst_gap(backend: dict[str, Any]) -> str | None:
    gaps = [m for r in [backend.get("offline", {})] + backend.get("server_runs", [])
            for m in (r.get("agreement") or {}).get("metrics", {}).values()]
    if not gaps:
        return None
    worst = max(gaps, key=lambda m: abs(m["diff_ms"]))
    return f"{worst['diff_ms']:+.2f} ms ({100 * worst['rel']:.1f}%)"


def run_rows(d: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["backend", "run", "offered QPS", "requests", "TTFT ms p50 / p90 / p99", "TPOT ms p50 / p90 / p99",
              "tokens/s", "goodput req/s", "within limits"]
    rows = []
    for b in d.get("backends", []):
        for r in [b["offline"]] + list(b.get("server_runs", [])):
            ttft, tpot = r.get("ttft_s") or {}, r.get("tpot_s") or {}
            meets = r.get("meets_limits")
            rows.append([b.get("role", ""), r.get("scenario", ""), fmt_sig3(r.get("offered_qps")),
                         f"{r.get('answered')}/{r.get('issued')}",
                         " / ".join(_ms(ttft.get(k)) for k in ("p50", "p90", "p99")),
                         " / ".join(_ms(tpot.get(k)) for k in ("p50", "p90", "p99")),
                         fmt_sig3(r.get("tokens_per_s")), fmt_sig3(r.get("goodput_rps")),
                         DASH if meets is None else ("yes" if meets else "no")])
    return header, rows


def build(d: dict[str, Any]) -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    for title, (header, rows) in (("server scenario (MLPerf LoadGen)", summary_rows(d)),
                                  ("every run (Offline: all at once; Server: Poisson arrivals)", run_rows(d))):
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 or (i == 1 and "run" in header) else "right",
                             overflow="fold", no_wrap=i == 0)
        for cells in rows:
            table.add_row(*(Text(c) for c in cells))
        parts += [table, Text("")]
    parts.append(Text(f"goodput: {d.get('goodput', '')}", style="dim"))
    return Group(*parts)


def print_scenario(d: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    console.print(build(d))


def render_text(d: dict[str, Any], width: int = 200) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, no_color=True, highlight=False).print(build(d))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
