"""Every renderer runs on a hand-built report that has one step of each kind, and the JSON round-trips."""
from __future__ import annotations

import json
import math
import re

import pytest

from optistack.bench.report import Accuracy, Report, Step

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[")


def _lat(median: float, cv: float = 0.03) -> dict:
    return {"median": median, "p90": median * 1.1, "p99": median * 1.3, "mean": median * 1.02,
            "std": median * cv, "cv": cv, "n": 50, "noisy": cv > 0.10}


def make_report() -> Report:
    steps = [
        Step(pass_name="int8-dynamic", config={}, text="int8-dynamic", status="applied", modified=True,
             speedup={"median": 1.92, "ci95": [1.85, 2.01]}, cumulative_speedup=1.92,
             cumulative_ci95=[1.85, 2.01], latency_ms=_lat(6.41),
             accuracy=Accuracy(metric="cosine", before=0.99990, after=0.99870, higher_is_better=True,
                               drop=0.0012, drop_from_original=0.0012, extra={"retrieval_agreement": 0.98}),
             peak_memory_bytes=123_400_000, model_bytes=23_100_000, apply_seconds=0.8, first_call_ms=9.7,
             info={"layers": 36}),
        Step(pass_name="prune-magnitude", config={"sparsity": 0.9}, text="prune-magnitude{sparsity=0.9}",
             status="rejected", reason="accuracy drop inf > budget 0.01: outputs are non-finite",
             modified=True, speedup={"median": 1.01, "ci95": [0.97, 1.05]}, cumulative_speedup=1.94,
             cumulative_ci95=[1.80, 2.09], latency_ms=_lat(6.35, cv=0.14),
             accuracy=Accuracy(metric="cosine", before=0.99870, after=math.nan, higher_is_better=True,
                               drop=math.inf, drop_from_original=math.inf),
             model_bytes=23_100_000),
        Step(pass_name="cast", config={"dtype": "fp16"}, text="cast{dtype=fp16}", status="skipped",
             reason="fp16 matmul is slow on <b>this CPU</b>; needs CUDA"),
        Step(pass_name="fp8", config={}, text="fp8", status="failed",
             reason="RuntimeError: fp8 needs compute capability >= 8.9\n(got none)"),
        Step(pass_name="compile", config={"mode": "max-autotune"}, text="compile{mode=max-autotune}",
             status="applied", modified=True, speedup={"median": 1.31, "ci95": [1.22, 1.40]},
             cumulative_speedup=2.51, cumulative_ci95=[2.30, 2.74], latency_ms=_lat(4.90),
             accuracy=Accuracy(metric="cosine", before=0.99870, after=0.99860, higher_is_better=True,
                               drop=0.0001, drop_from_original=0.0013),
             peak_memory_bytes=130_000_000, model_bytes=23_100_000, first_call_ms=41_200.0,
             extra={"ttft_ms": 31.2, "tpot_ms": 8.45, "tokens_per_s": 118.3, "p99_token_ms": 12.9}),
    ]
    return Report(
        workload={"name": "minilm", "model": "sentence-transformers/all-MiniLM-L6-v2", "batch": [8, 128]},
        pipeline="int8-dynamic,prune-magnitude{sparsity=0.9},cast{dtype=fp16},fp8,compile{mode=max-autotune}",
        machine={"processor": "Intel Xeon", "cpu_count": 2, "torch_threads": 2, "cuda": False},
        versions={"optistack": "0.1.0", "torch": "2.5.1"},
        baseline={"latency_ms": _lat(12.3), "model_bytes": 87_300_000,
                  "accuracy": {"cosine": 0.99990, "metric": "cosine", "higher_is_better": True},
                  "extra": {"ttft_ms": 55.0, "tpot_ms": 16.1, "tokens_per_s": 62.0, "p99_token_ms": 20.3}},
        steps=steps, max_accuracy_drop=0.01, git_commit="abc123", created="2025-01-01T00:00:00Z",
    )


@pytest.fixture
def report() -> Report:
    return make_report()


def test_markdown_has_one_row_per_step_and_the_reasons(report: Report) -> None:
    md = report.to_markdown()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    step_rows = [ln for ln in table if re.match(r"\| \d+ \|", ln)]
    assert len(step_rows) == len(report.steps)
    assert "accuracy drop inf > budget 0.01: outputs are non-finite" in md
    assert "RuntimeError: fp8 needs compute capability >= 8.9 (got none)" in md  # newline folded
    assert "fp16 matmul is slow on \\<b>this CPU\\</b>" in md  # shown literally, not as bold HTML
    assert "1.92x [1.85, 2.01]" in md


def test_html_escapes_and_colors(report: Report) -> None:
    html = report._repr_html_()
    assert html.startswith("<div") and html.rstrip().endswith("</div>")
    assert "&lt;b&gt;this CPU&lt;/b&gt;" in html and "<b>" not in html
    assert "<link" not in html and "<script" not in html and "<style" not in html
    for status in ("applied", "rejected", "skipped", "failed"):
        assert f">{status}</span>" in html


def test_plain_text_has_every_pass_and_status_and_no_ansi(report: Report) -> None:
    text = str(report)
    assert not ANSI.search(text)
    for step in report.steps:
        assert step.text in text
        assert step.status in text
    assert "1.92x [1.85, 2.01]" in text
    assert "0.9999 → 0.9987" in text and "-0.0012" in text
    assert "noisy" in text and "tokens/s" in text
    assert text.rstrip().splitlines()[-1].startswith("final: 2.51x [2.30, 2.74]")


def test_print_goes_to_the_given_console(report: Report) -> None:
    import io

    from rich.console import Console

    buf = io.StringIO()
    report.print(Console(file=buf, width=220, force_terminal=True, color_system="standard"))
    assert "compile{mode=max-autotune}" in buf.getvalue()
    assert ANSI.search(buf.getvalue())  # colour when the console asks for it


def test_narrow_console_splits_the_table_without_losing_cells(report: Report) -> None:
    import io

    from rich.console import Console

    buf = io.StringIO()
    report.print(Console(file=buf, width=100, color_system=None))
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 100
    for cell in ("41200", "130.0 MB", "2.51x [2.30, 2.74]", "0.9987 → 0.9986"):
        assert cell in out


def test_render_entry_point(report: Report, tmp_path) -> None:
    from optistack.bench.render import render

    assert render(report, "md") == report.to_markdown()
    assert render(report, "text", tmp_path / "r.txt") == (tmp_path / "r.txt").read_text()
    assert render(report, "png", tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="unknown report format"):
        render(report, "pdf")


def test_png(report: Report, tmp_path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    path = report.plot(tmp_path / "sub" / "report.png")
    assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000
    assert matplotlib.get_backend() == backend  # the user's backend is left alone


def test_renderers_handle_an_empty_report(tmp_path) -> None:
    r = Report(workload={}, pipeline="", machine={}, versions={}, baseline={})
    assert "final: 1.00x" in str(r)
    assert r.to_markdown() and r._repr_html_()
    assert r.plot(tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_json_writes_nan_as_null(report: Report) -> None:
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    acc = json.loads(text)["steps"][1]["accuracy"]
    assert acc["after"] is None and acc["drop"] is None and acc["drop_from_original"] is None
    assert acc["delta"] is None


def test_json_round_trip(report: Report) -> None:
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    # ...and the round-tripped report (null accuracy) still renders
    assert "non-finite" in str(again) and again.to_markdown() and again._repr_html_()


def test_every_rendering_names_a_model_whose_calls_page_faulted(report: Report) -> None:
    """A model timed with the allocator as-is can spend its calls faulting in fresh memory: say so."""
    assert "page faults a call" not in report.to_markdown()  # no counts: no caveat
    report.baseline["latency_ms"] = {**report.baseline["latency_ms"], "page_faults_per_call": 12560.0}
    report.steps[0].latency_ms = {**report.steps[0].latency_ms, "page_faults_per_call": 3.0}  # a few: no caveat
    for text in (report.to_markdown(), report._repr_html_(), str(report)):
        assert "page faults a call: baseline (12,560)" in text
        assert "int8-dynamic (3)" not in text
    assert "allocator" in report.to_markdown()
