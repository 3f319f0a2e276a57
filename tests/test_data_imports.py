"""The data package's import graph (parsed with ``ast``, imports inside functions included): no circles, no private
names imported across modules, and the removed ``preprocess`` module is gone from every import."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medanomaly"
DATA = SRC / "data"
PKG = "medanomaly.data"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement of a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: from the file's package
                base = [*path.relative_to(SRC.parent).with_suffix("").parts][: -node.level]
                mod = ".".join(base + ([mod] if mod else []))
            out.append((mod, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    mods = {p.stem for p in DATA.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for p in DATA.glob("*.py"):
        for mod, names in _imports(p):
            if mod == PKG:  # from medanomaly.data import x: the submodule x, or the package (__init__)
                graph[p.stem] |= {n if n in mods else "__init__" for n in names}
            elif mod.startswith(PKG + "."):
                graph[p.stem].add(mod.split(".")[2])
    for m in graph:
        graph[m].discard(m)
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


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_data():
    g = _graph()
    assert {"masks", "intensity", "geometry", "presets", "roots", "io", "samples", "manifest"} <= set(g)
    assert _cycles(g) == []


def test_no_private_imports_from_data_modules():
    bad = []
    for p in SRC.rglob("*.py"):
        for mod, names in _imports(p):
            if mod == PKG or mod.startswith(PKG + "."):
                bad += [f"{p.relative_to(SRC)}: {mod}.{n}" for n in names if n.startswith("_")]
    assert bad == []


def test_preprocess_module_is_gone():
    root = SRC.parents[1]
    users = [str(p.relative_to(root)) for d in ("src", "tests", "benchmarks") for p in (root / d).rglob("*.py")
             if any(m == PKG + ".preprocess" or (m == PKG and "preprocess" in n) for m, n in _imports(p))]
    assert not (DATA / "preprocess.py").exists() and users == []
