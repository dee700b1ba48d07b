"""Layers point one way. One rank table says where every top-level module of optistack stands; the test
reads every import in src/optistack with `ast` (top-level and inside functions, relative ones resolved,
`importlib.import_module("optistack...")` and any other string that is exactly an optistack module path)
and fails on an import from a module to one of a higher rank, or to another package of its own rank.
There is one run loop, the core runner's, and one `resolve_workload`."""
import ast
import re
from pathlib import Path

import optistack

SRC = Path(optistack.__file__).parent

# Lowest first. A module may import its own package and packages of lower ranks, nothing else.
RANKS: list[tuple[str, ...]] = [
    ("core",),  # protocol, configs, pipeline, runner, hooks, load registry, errors: the ground
    ("layers", "generation", "bundled_models"),  # quantized module types; the decode loop; bundled files
    ("kernels",),  # C++/Triton/CUDA kernels and the modules that call them
    ("passes",),
    ("bench", "workloads", "checkpoints"),  # instruments and reports; workloads; save/load formats
    ("serving", "integrations", "checks", "presets"),
    ("wiring",),  # the default wiring: workload by name, default instruments, report
    ("search",),
    ("api", "demo"),
    ("cli", "testing", "__init__"),  # the command line; test helpers; the package root
]
RANK = {name: i for i, names in enumerate(RANKS) for name in names}
_MODULE_PATH = re.compile(r"^optistack(\.[A-Za-z_]\w*)+(:[A-Za-z_][\w.]*)?$")


def top_level(dotted: str) -> str | None:
    """The optistack package or module a dotted name is in ("optistack.passes.quant" -> "passes")."""
    parts = dotted.split(":")[0].split(".")
    if parts[0] != "optistack":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything a module imports, at any depth, relative imports
    resolved against `package`; `import_module("optistack.x")` and module-path strings included."""
    found: list[tuple[int, str]] = []
    skip: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module != "optistack":  # the root package runs before any of its modules anyway
                found.append((node.lineno, module))
            found += [(node.lineno, _from(module, a.name)) for a in node.names]  # `from .. import workloads`
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.endswith("_GROUP")
                                                  for t in node.targets):
            skip.add(id(node.value))  # entry-point group names ("optistack.passes") are not imports
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value)
              and id(node) not in skip):
            found.append((node.lineno, node.value))  # import_module("optistack.x"), tables of module paths
    return found


def _from(module: str, name: str) -> str:
    """`from optistack import x`: x is a top-level module, or a name of the package root itself."""
    if module == "optistack" and name not in RANK:
        return "optistack"
    return f"{module}.{name}"


def package_of(path: Path) -> str:
    """The package a module's relative imports start from (for `__init__.py`, its own folder)."""
    return ".".join(path.relative_to(SRC.parent).parts[:-1])


def own_top_level(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return "__init__" if rel == ("__init__.py",) else rel[0].removesuffix(".py")


def violations(path: Path) -> list[str]:
    me = own_top_level(path)
    out = []
    for line, name in imports(path, package_of(path)):
        other = top_level(name)
        if other is None or other == me or other not in RANK:
            continue
        if RANK[other] > RANK[me]:
            out.append(f"line {line}: {name} (rank {RANK[other]} above {me}'s {RANK[me]})")
        elif RANK[other] == RANK[me]:
            out.append(f"line {line}: {name} ({other} is a peer of {me}: peers stay independent)")
    return out


def test_every_top_level_module_has_a_rank():
    found = {p.name.removesuffix(".py") for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert found - set(RANK) == set(), f"place these in RANKS: {sorted(found - set(RANK))}"
    assert set(RANK) - found == set(), f"RANKS names modules that do not exist: {sorted(set(RANK) - found)}"


def test_no_import_runs_up_the_ranks():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        bad = violations(path)
        if bad:
            offenders[path.relative_to(SRC).as_posix()] = bad
    assert not offenders, "imports against the layer ranks (tests/core/test_layers.py RANKS): " + "; ".join(
        f"{k}: {v}" for k, v in offenders.items())


def test_the_reader_sees_every_spelling_of_an_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ...workloads.generic import normalize_inputs\nfrom ... import workloads\n"
                 "import optistack.workloads.loaders\ndef f():\n    from ..linears import is_linear\n"
                 "    import importlib\n    importlib.import_module('optistack.search.trial')\n"
                 "TABLE = {'x': 'optistack.bench.report:Report'}\nNOT = 'optistack is great'\n")
    found = {name for _, name in imports(f, "optistack.passes.quant")}
    assert {"optistack.workloads.generic", "optistack.workloads", "optistack.workloads.loaders",
            "optistack.passes.linears.is_linear", "optistack.search.trial", "optistack.bench.report:Report"} <= found
    assert "optistack is great" not in found


def test_the_checker_flags_lazy_upward_and_peer_imports(tmp_path):
    pkg = tmp_path / "optistack"
    (pkg / "core").mkdir(parents=True)
    (pkg / "bench").mkdir()
    lazy = pkg / "core" / "run.py"
    lazy.write_text("def save():\n    from ..checkpoints import save_pretrained\n")
    peer = pkg / "bench" / "ab.py"
    peer.write_text("import importlib\nW = importlib.import_module('optistack.workloads')\n")
    global SRC
    saved, SRC = SRC, pkg
    try:
        assert violations(lazy) and "rank" in violations(lazy)[0]
        assert violations(peer) and "peer" in violations(peer)[0]
    finally:
        SRC = saved


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


def test_one_resolve_workload():
    defined = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.FunctionDef) and node.name == "resolve_workload"]
    assert defined == ["wiring.py"], defined


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


def test_no_source_file_is_over_400_lines():
    """Small files (DESIGN.md: aim for 300 lines a file); 400 is the bar no file may cross."""
    long = {p.relative_to(SRC).as_posix(): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these: {long}"
