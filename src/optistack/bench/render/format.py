"""Wording and number formats shared by every renderer, so a report reads the same everywhere.

Every helper takes values straight from the report (any of which may be None or non-finite) and
returns plain text; the renderers only add layout, colour and escaping.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..report import Report, Step

DASH = "—"
HIGH_CV = 0.10  # same threshold as bench.stats.HIGH_CV; kept here so renderers don't import numpy
MANY_PAGE_FAULTS = 1000  # minor page faults per steady call (4 MB of fresh pages) worth a caveat
STATUS_STYLE = {"applied": "green", "rejected": "red", "skipped": "yellow", "failed": "bold red"}
STATUS_HTML = {"applied": "#1a7f37", "rejected": "#cf222e", "skipped": "#9a6700", "failed": "#cf222e"}
EXTRA_LABELS = {"ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "tokens_per_s": "tokens/s",
                "p99_token_ms": "p99 token ms"}


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_x(v: Any) -> str:
    """A speed ratio: 1.92x, 12.3x."""
    if not finite(v):
        return DASH
    return f"{v:.2f}x" if abs(v) < 10 else f"{v:.1f}x"


def fmt_speedup(median: Any, ci95: Any = None) -> str:
    """'1.92x [1.85, 2.01]', or '1.92x' without a CI."""
    if not finite(median):
        return DASH
    text = fmt_x(median)
    if isinstance(ci95, (list, tuple)) and len(ci95) == 2 and all(finite(c) for c in ci95):
        lo, hi = (fmt_x(c)[:-1] for c in ci95)
        text += f" [{lo}, {hi}]"
    return text


def fmt_sig3(v: Any) -> str:
    """Three significant figures without scientific notation for ordinary sizes: 0.123, 1.23, 12.3, 123, 1234."""
    if not finite(v):
        return DASH
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


fmt_ms = fmt_sig3


def fmt_bytes(n: Any) -> str:
    """Decimal units: 87.3 MB."""
    if not finite(n):
        return DASH
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_acc(v: Any, missing: str = DASH) -> str:
    """An accuracy value with enough digits to see a 0.001 change (0.9991, 12.534, 0.000123)."""
    if v is None:
        return missing
    if not finite(v):
        return "non-finite"
    a = abs(v)
    if a == 0:
        return "0"
    if a < 0.01:
        return f"{v:.3g}"
    return f"{v:.4f}" if a < 10 else f"{v:.3f}"


def fmt_delta(d: Any) -> str:
    """A signed change: +0.0012, -0.0031, ±0."""
    if not finite(d):
        return DASH
    if d == 0:
        return "±0"
    return ("+" if d > 0 else "-") + fmt_acc(abs(d))


def one_line(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def metric_name(report: Report) -> str:
    acc = (report.baseline or {}).get("accuracy") or {}
    if acc.get("metric"):
        return str(acc["metric"])
    for s in report.steps:
        if s.accuracy is not None and s.accuracy.metric:
            return s.accuracy.metric
    return "accuracy"


def higher_is_better(report: Report) -> bool | None:
    acc = (report.baseline or {}).get("accuracy") or {}
    if "higher_is_better" in acc:
        return bool(acc["higher_is_better"])
    for s in report.steps:
        if s.accuracy is not None:
            return bool(s.accuracy.higher_is_better)
    return None


def direction(report: Report) -> str:
    hib = higher_is_better(report)
    return "" if hib is None else ("higher is better" if hib else "lower is better")


def baseline_accuracy(report: Report) -> Any:
    acc = (report.baseline or {}).get("accuracy") or {}
    return acc.get(metric_name(report))


# --- header and baseline -------------------------------------------------------------------------

def title(report: Report) -> str:
    w = report.workload or {}
    name = w.get("name") or "workload"
    model = w.get("model") or w.get("model_id")
    return f"{name} ({model})" if model else str(name)


def machine_text(report: Report) -> str:
    m = report.machine or {}
    parts = []
    if m.get("gpu"):
        cc = m.get("compute_capability")
        parts.append(f"{m['gpu']}" + (f" (sm {cc[0]}.{cc[1]})" if isinstance(cc, list) and len(cc) == 2 else ""))
    if m.get("processor"):
        parts.append(str(m["processor"]))
    threads = []
    if m.get("torch_threads") is not None:
        threads.append(f"{m['torch_threads']} torch threads")
    if m.get("cpu_count") is not None:
        threads.append(f"{m['cpu_count']} CPUs")
    if threads:
        parts.append(", ".join(threads))
    torch_v = (report.versions or {}).get("torch")
    if torch_v:
        parts.append(f"torch {torch_v}")
    return " · ".join(parts) or "unknown machine"


def header_fields(report: Report) -> list[tuple[str, str]]:
    """(label, value) pairs shown under the title."""
    gate = (f"max drop {fmt_sig3(report.max_accuracy_drop)} in {metric_name(report)}"
            if finite(report.max_accuracy_drop) else "none")
    preset = getattr(report, "preset", None)
    named = [("preset", f"{preset} (the pipeline above is its expansion on this machine)")] if preset else []
    return [("pipeline", report.pipeline or DASH), *named, ("machine", machine_text(report)), ("accuracy gate", gate)]


def latency_text(lat: dict[str, Any] | None) -> str:
    """'12.3 / 14.1 / 20.5' (median / p90 / p99 in ms)."""
    if not lat:
        return DASH
    return " / ".join(fmt_ms(lat.get(k)) for k in ("median", "p90", "p99"))


def baseline_text(report: Report) -> str:
    b = report.baseline or {}
    parts = [f"latency {latency_text(b.get('latency_ms'))} ms (p50 / p90 / p99)"]
    acc = baseline_accuracy(report)
    if acc is not None:
        parts.append(f"{metric_name(report)} {fmt_acc(acc)}")
    if b.get("model_bytes") is not None:
        parts.append(f"size {fmt_bytes(b['model_bytes'])}")
    return " · ".join(parts)


# --- the step table ------------------------------------------------------------------------------

def columns(report: Report) -> list[str]:
    return ["#", "pass", "status", "speedup [95% CI]", "cumulative [95% CI]", "latency ms p50 / p90 / p99",
            f"{metric_name(report)} before → after", "Δ", "peak mem", "size", "first call ms"]


def accuracy_cells(step: Step) -> tuple[str, str]:
    acc = step.accuracy
    if acc is None:
        return DASH, DASH
    after = fmt_acc(acc.after, missing="non-finite")
    delta = acc.after - acc.before if finite(acc.after) and finite(acc.before) else None
    return f"{fmt_acc(acc.before)} → {after}", fmt_delta(delta)


def delta_worse(step: Step) -> bool | None:
    """True when the step made accuracy worse, False when better, None when unknown or unchanged."""
    acc = step.accuracy
    if acc is None:
        return None
    if not finite(acc.after):  # NaN in memory, null after a JSON round trip: a wrecked model
        return True
    if not finite(acc.before) or acc.after == acc.before:
        return None
    return (acc.after < acc.before) if acc.higher_is_better else (acc.after > acc.before)


def step_cells(index: int, step: Step) -> list[str]:
    sp = step.speedup or {}
    acc_text, delta = accuracy_cells(step)
    speed = fmt_speedup(sp.get("median"), sp.get("ci95"))
    if sp.get("verdict") == "no measurable change" and speed != DASH:  # inside the run's A/A noise floor
        speed += " (no measurable change)"
    return [str(index), step.text or step.pass_name, step.status,
            speed,
            fmt_speedup(step.cumulative_speedup, step.cumulative_ci95),
            latency_text(step.latency_ms), acc_text, delta,
            fmt_bytes(step.peak_memory_bytes), fmt_bytes(step.model_bytes), fmt_ms(step.first_call_ms)]


def rows(report: Report) -> list[list[str]]:
    return [step_cells(i, s) for i, s in enumerate(report.steps, 1)]


# --- notes under the table -----------------------------------------------------------------------

def reason_lines(report: Report) -> list[tuple[int, Step, str]]:
    """(index, step, reason) for every step that says why it was skipped/rejected/failed."""
    return [(i, s, one_line(s.reason)) for i, s in enumerate(report.steps, 1) if s.reason]


def _cv(lat: dict[str, Any] | None) -> float | None:
    if not lat:
        return None
    cv = lat.get("cv")
    if lat.get("noisy") or (finite(cv) and cv > HIGH_CV):
        return cv if finite(cv) else math.nan
    return None


def noisy_line(report: Report) -> str | None:
    """The timing caveats, one line: noisy timings, and models whose calls page-faulted fresh memory in."""
    flagged, faulted = [], []
    timed = [("baseline", (report.baseline or {}).get("latency_ms"))]
    timed += [(f"#{i} {s.text or s.pass_name}", s.latency_ms) for i, s in enumerate(report.steps, 1)]
    for name, lat in timed:
        cv = _cv(lat)
        if cv is not None:
            flagged.append(f"{name} (cv {cv:.2f})")
        faults = (lat or {}).get("page_faults_per_call")
        if finite(faults) and faults >= MANY_PAGE_FAULTS:
            faulted.append(f"{name} ({faults:,.0f})")
    parts = []
    if flagged:
        parts.append(f"noisy timings (cv > {HIGH_CV:.2f}): " + ", ".join(flagged)
                     + "; treat these speedups with care, or rerun on a quieter machine with more rounds")
    if faulted:
        parts.append("page faults a call: " + ", ".join(faulted) + "; part of that time is the kernel handing out "
                     "fresh memory, which depends on the process's allocation history (TimingConfig(allocator="
                     "\"steady\") keeps it out)")
    return "; ".join(parts) or None


def extras_table(report: Report) -> tuple[list[str], list[list[str]]] | None:
    """Workload extras (TTFT, tokens/s, ...): baseline row then one row per step that has any. Numbers
    only (raw `samples` stay in the JSON); where tokens/s or TTFT were measured, a column each for the
    step's decode and TTFT speedup vs the original, with a 95% CI when samples were recorded."""
    from ..headline import generation_ratio

    step_rows = [(f"#{i} {s.text or s.pass_name}", s.extra) for i, s in enumerate(report.steps, 1) if s.extra]
    if not step_rows:
        return None
    base = (report.baseline or {}).get("extra") or {}
    all_rows = ([("baseline", base)] if base else []) + step_rows
    keys: list[str] = []
    for _, extra in all_rows:
        keys += [k for k, v in extra.items() if k not in keys and isinstance(v, (int, float))]
    ratio_axes = [axis for axis in ("decode", "ttft") if any(generation_ratio(base, x, axis) for _, x in step_rows)]
    header = ["step"] + [EXTRA_LABELS.get(k, k) for k in keys] + [RATIO_LABELS[a] for a in ratio_axes]
    out = []
    for label, extra in all_rows:
        ratios = [generation_ratio(base, extra, a) if extra is not base else None for a in ratio_axes]
        out.append([label] + [fmt_sig3(extra.get(k)) for k in keys]
                   + [fmt_speedup(r["speedup"], r["ci95"]) if r else DASH for r in ratios])
    return header, out


RATIO_LABELS = {"decode": "decode vs original", "ttft": "TTFT vs original"}


def _generation_headline(report: Report) -> list[str]:
    """'decode 1.60x [1.52, 1.68] (28.3 → 45.3 tokens/s)', 'TTFT 1.40x [...] (175 → 125 ms)' for causal LMs."""
    head = report.headline
    parts = []
    for axis, label, unit in (("decode", "decode", "tokens/s"), ("ttft", "TTFT", "ms")):
        h = head.get(axis)
        if h:
            parts.append(f"{label} {fmt_speedup(h['speedup'], h['ci95'])} "
                         f"({fmt_sig3(h['before'])} → {fmt_sig3(h['after'])} {unit})")
    return parts


def final_line(report: Report) -> str:
    """The headline: speed vs the original (for causal LMs decode and TTFT first, then the timed
    prefill), the final accuracy, and how many passes applied."""
    applied = [s for s in report.steps if s.status == "applied"]
    last = next((s for s in reversed(applied) if s.cumulative_speedup is not None), None)
    speed = fmt_speedup(last.cumulative_speedup, last.cumulative_ci95) if last else "1.00x"
    generation = _generation_headline(report)
    if generation:
        speed = " · ".join(generation) + f" · prefill latency {speed}"
    name, base = metric_name(report), baseline_accuracy(report)
    last_acc = next((s.accuracy for s in reversed(applied) if s.accuracy is not None), None)
    final = last_acc.after if last_acc is not None else base
    acc = f"{name} {fmt_acc(final, missing='non-finite')}"
    if last_acc is not None and finite(final) and finite(base):
        acc += f" (original {fmt_acc(base)}, Δ {fmt_delta(final - base)})"
    return (f"final: {speed} vs the original · {acc} · "
            f"{len(applied)} of {len(report.steps)} passes applied")


def traceback_blocks(report: Report) -> list[str]:
    """One block per failed step that kept its traceback: a header line naming the step, then the trace."""
    return [f"--- #{i} {s.text or s.pass_name} failed: {one_line(s.reason)}\n{s.traceback.rstrip()}"
            for i, s in enumerate(report.steps, 1) if s.status == "failed" and getattr(s, "traceback", None)]
