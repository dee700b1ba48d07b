"""Layers point one way: core imports nothing above it, and there is one run loop, the core runner's."""
import ast
from pathlib import Path

import optistack

SRC = Path(optistack.__file__).parent
ABOVE_CORE = {"bench", "workloads", "passes", "search", "kernels", "integrations", "presets", "api", "cli",
              "wiring", "checks"}


def imported_packages(path: Path) -> set[str]:
    """The optistack top-level packages a module imports (absolute or relative, at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "optistack" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.startswith("optistack."):
                found.add(module.split(".")[1])
            elif node.level >= 2:  # from ..x import y inside optistack/core/
                found.add(module.split(".")[0] if module else node.names[0].name)
    return found


def test_core_imports_nothing_above_it():
    offenders = {p.name: sorted(imported_packages(p) & ABOVE_CORE) for p in (SRC / "core").glob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules import layers above core: {offenders}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..bench.report import Report\n    import optistack.workloads\n"
                 "    from .. import passes\n")
    assert imported_packages(f) == {"bench", "workloads", "passes"}


def test_one_run_loop_outside_core():
    """Nothing above core calls `apply` on passes in a loop of its own or imports the old step helper."""
    hits = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "core":
            continue
        text = path.read_text()
        if "run_step(" in text or "GatedBenchmark" in text:
            hits.append(str(path.relative_to(SRC)))
    assert not hits, f"a second run loop: {hits}"


def test_no_class_overrides_a_private_method_of_a_class_in_another_package():
    """A subclass in package A may not override `_name` of a base class defined in package B."""
    classes: dict[str, tuple[str, set[str], list[str]]] = {}  # name -> (package, private methods, bases)
    for path in SRC.rglob("*.py"):
        package = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                private = {n.name for n in node.body if isinstance(n, ast.FunctionDef)
                           and n.name.startswith("_") and not n.name.startswith("__")}
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes.setdefault(node.name, (package, private, bases))
    bad = []
    for name, (package, private, bases) in classes.items():
        for base in bases:
            if base in classes and classes[base][0] != package:
                overridden = private & classes[base][1]
                if overridden:
                    bad.append(f"{name} ({package}) overrides {sorted(overridden)} of {base} ({classes[base][0]})")
    assert not bad, bad
