"""The package's import graph (every ``src/medanomaly/**/*.py``, parsed with ``ast``; imports inside functions count):
no import cycles, no private name imported from another module, private modules used only inside their package.

An edge goes from a module to the module it names: ``import a.b`` and ``from a.b import x`` -> ``a.b``; ``from a
import b`` -> the module ``a.b`` when there is one, else ``a`` (its ``__init__``). Parent packages, which Python
initialises first anyway, are not edges. Mirrors :mod:`tests.test_data_imports` (the data package alone).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "medanomaly"
PKG = "medanomaly"

#: (importer, imported) edges allowed to close a cycle, each with its reason. Only imports inside functions may be
#: listed (checked below); keep it empty where the code can be arranged without one.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}

#: (file, private name) imports of a private name that are tolerated for now, each with its reason
ALLOWED_PRIVATE_IMPORTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # absolute
    names: tuple[str, ...]  # () for ``import module``
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path) -> list[Import]:
    """Every import statement of a file, relative ones made absolute, marked when inside a function."""
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, (), child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:  # relative: from the file's package
                    base = [*path.relative_to(SRC.parent).with_suffix("").parts][: -child.level]
                    mod = ".".join(base + ([mod] if mod else []))
                out.append(Import(mod, tuple(a.name for a in child.names), child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return out


def _owner(module: str) -> str | None:
    """The package module a dotted name lives in (the longest prefix that is one of ours)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def _targets(imp: Import) -> list[str]:
    if imp.names:
        found = [f"{imp.module}.{n}" if f"{imp.module}.{n}" in MODULES else _owner(imp.module) for n in imp.names]
    else:
        found = [_owner(imp.module)]
    return [t for t in found if t is not None]


def _edges() -> dict[tuple[str, str], bool]:
    """(importer, imported) -> True when every import making the edge is inside a function."""
    lazy: dict[tuple[str, str], bool] = {}
    for name, path in MODULES.items():
        for imp in _imports(path):
            for t in _targets(imp):
                if t != name:
                    lazy[(name, t)] = lazy.get((name, t), True) and imp.in_function
    return lazy


def _graph(edges: dict[tuple[str, str], bool], skip: set[tuple[str, str]] = frozenset()) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b in edges:
        if (a, b) not in skip:
            graph[a].add(b)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_graph_reader() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    edges = _edges()
    assert edges[("medanomaly.methods.multitask.detector", "medanomaly.methods.multitask.pool")] is False
    assert edges[("medanomaly.methods.mim_ood.method", "medanomaly.methods.mim_ood.restoration")] is False
    assert edges[("medanomaly.synth.tasks", "medanomaly.data.masks")] is True  # lazy, inside anatomy_mask
    assert {"medanomaly", "medanomaly.data", "medanomaly.methods.base", "medanomaly.evaluation._checks"} <= set(MODULES)


def test_no_import_cycles() -> None:
    assert _cycles(_graph(_edges(), set(ALLOWED_CYCLE_EDGES))) == []


def test_allowed_cycle_edges_are_lazy_and_still_needed() -> None:
    edges = _edges()
    for edge, why in ALLOWED_CYCLE_EDGES.items():
        assert why and edge in edges, f"stale allow-list entry {edge}: no such import"
        assert edges[edge], f"allow-listed {edge} is imported at module level: a real import cycle"
        others = set(ALLOWED_CYCLE_EDGES) - {edge}
        assert _cycles(_graph(edges, others)), f"allow-listed {edge} closes no cycle: remove it from the list"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_imported_across_modules() -> None:
    """``from medanomaly.x import _name`` anywhere (package, tests, benchmarks): a name used by another module is
    public in its module. A private module (``_checks``) is imported only from inside its own package."""
    files = [*SRC.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    bad = []
    for path in files:
        inside = _module_name(path) if path.is_relative_to(SRC) else ""
        for imp in _imports(path):
            if imp.module != PKG and not imp.module.startswith(PKG + "."):
                continue
            where = f"{path.relative_to(ROOT)}:{imp.line}"
            bad += [f"{where}: {imp.module}.{n}" for n in imp.names if _private(n) and f"{imp.module}.{n}" not in MODULES
                    and (str(path.relative_to(ROOT)), f"{imp.module}.{n}") not in ALLOWED_PRIVATE_IMPORTS]
            for t in _targets(imp):
                parts = t.split(".")
                for i, part in enumerate(parts):
                    package = ".".join(parts[:i])
                    if _private(part) and not (inside == package or inside.startswith(package + ".")):
                        bad.append(f"{where}: private module {t} from outside {package}")
    assert bad == []


def test_removed_modules_stay_gone() -> None:
    """The split files of the core redesign: nothing imports the old two-job modules any more."""
    removed = {"medanomaly.pipeline", "medanomaly.data.preprocess", "medanomaly.evaluation.report"}
    assert not any(m in MODULES for m in removed)
    root = SRC.parents[1]
    users = [f"{p.relative_to(root)}:{imp.lineno}" for d in ("src", "tests", "benchmarks") for p in (root / d).rglob("*.py")
             for imp in _imports(p) if imp.module in removed or any(f"{imp.module}.{n}" in removed for n in imp.names)]
    assert users == []
