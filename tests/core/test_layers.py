"""Layers point one way: core imports nothing above it, passes never import workloads, and there is one
run loop, the core runner's. The checks read the real source files, so a new import across a layer fails here."""
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


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute dotted names a module imports (at any depth in the file), relative imports resolved
    against `package` (the module's own package, e.g. "optistack.passes.decoding")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from .. import workloads`
    return found


def package_of(path: Path) -> str:
    """The package a module's relative imports start from (for `__init__.py`, its own folder)."""
    return ".".join(path.relative_to(SRC.parent).parts[:-1])


def crosses(modules: set[str], layers: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f"optistack.{x}" or m.startswith(f"optistack.{x}.") for x in layers))


def test_passes_never_import_workloads():
    offenders = {}
    for path in (SRC / "passes").rglob("*.py"):
        bad = crosses(imported_modules(path, package_of(path)), {"workloads"})
        if bad:
            offenders[path.relative_to(SRC).as_posix()] = bad
    assert not offenders, f"passes import workloads (use optistack.core.modeling / optistack.generation): {offenders}"


def test_generation_stands_on_core_below_passes():
    """optistack.generation (greedy_decode, sessions, generate()) is imported by passes and workloads, so it
    imports none of the layers above it."""
    above = {"passes", "workloads", "bench", "serving", "search", "cli", "wiring", "api", "presets", "checkpoints"}
    offenders = {}
    for path in (SRC / "generation").rglob("*.py"):
        bad = crosses(imported_modules(path, package_of(path)), above)
        if bad:
            offenders[path.relative_to(SRC).as_posix()] = bad
    assert (SRC / "generation" / "__init__.py").is_file() and not offenders, offenders


def test_core_imports_nothing_above_it_resolved():
    """The same rule as below, with relative imports resolved exactly (`from .. import x` included)."""
    offenders = {}
    for path in (SRC / "core").rglob("*.py"):
        bad = crosses(imported_modules(path, package_of(path)), ABOVE_CORE | {"generation", "bundled_models"})
        if bad:
            offenders[path.relative_to(SRC).as_posix()] = bad
    assert not offenders, f"core modules import layers above core: {offenders}"


def test_the_resolver_sees_every_spelling_of_an_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ...workloads.generic import normalize_inputs\nfrom ... import workloads\n"
                 "import optistack.workloads.loaders\ndef f():\n    from ..linears import is_linear\n")
    found = imported_modules(f, "optistack.passes.quant")
    assert crosses(found, {"workloads"}) == ["optistack.workloads", "optistack.workloads.generic",
                                             "optistack.workloads.generic.normalize_inputs",
                                             "optistack.workloads.loaders"]
    assert "optistack.passes.linears.is_linear" in found
    assert not crosses(found, {"bench"})


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
