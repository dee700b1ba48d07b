"""`optistack.search` is both the package and the search function; importing optistack stays lean."""
import subprocess
import sys

LEAN = """
import sys, optistack
heavy = {"optuna", "ray", "matplotlib", "rich", "torch"} & {m.split(".")[0] for m in sys.modules}
assert not heavy, heavy
import optistack.search.store
assert callable(optistack.search), type(optistack.search)
from optistack.search import search
assert callable(search) and optistack.search.search is search
heavy = {"optuna", "ray", "matplotlib", "rich"} & {m.split(".")[0] for m in sys.modules}
assert not heavy, heavy
print("ok")
"""


def test_lean_import_and_callable_module():
    out = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_callable_module_in_process():
    import optistack
    import optistack.search.store  # noqa: F401

    assert callable(optistack.search) and optistack.search.__name__ == "optistack.search"
    assert optistack.SearchResult.__name__ == "SearchResult"
