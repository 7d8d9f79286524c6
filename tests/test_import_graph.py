"""The import graph of the four packages, read from the source (AST, every import statement, including the
ones inside functions): imports flow core <- spaces <- evaluators <- search, no module takes part in an import circle,
core knows nothing of Optuna or Ray, and exactly one search module imports Ray."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "spaces", "evaluators", "search")  # installed as slimsearch.<name>
LAYER = {name: i for i, name in enumerate(PACKAGES)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (``slimsearch.`` stripped from our own)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n.removeprefix("slimsearch.") for n in names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of our four packages it imports."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {m: {n for n in _imports(p) if n in files and n != m} for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_function_local_imports() -> None:
    g = import_graph()
    assert "search.ray_runner" in g["search.backend"]  # imported inside RayBackend's methods only
    assert "search.study" in g["search.cli"]


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_imports_flow_core_spaces_evaluators_search() -> None:
    bad = [
        (m, n) for m, deps in import_graph().items() for n in deps if LAYER[n.split(".")[0]] > LAYER[m.split(".")[0]]
    ]
    assert bad == []


def test_core_knows_nothing_of_optuna_or_ray() -> None:
    bad = {
        _module_name(p): sorted(n for n in _imports(p) if n.split(".")[0] in ("optuna", "ray"))
        for p in (REPO / "core").rglob("*.py")
    }
    assert {m: v for m, v in bad.items() if v} == {}


def test_exactly_one_search_module_imports_ray() -> None:
    users = sorted(
        _module_name(p) for p in (REPO / "search").rglob("*.py") if any(n.split(".")[0] == "ray" for n in _imports(p))
    )
    assert users == ["search.ray_runner"]


def test_no_file_in_search_over_500_lines() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "search").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 500} == {}
