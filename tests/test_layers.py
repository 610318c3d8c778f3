"""The project's layers, read from its imports (an AST walk; nothing is imported).

    index.core <- index <- curation <- distill <- jobs <- the command-line modules

A module imports only modules of its own layer or of the layers below it; nothing in the library
imports jobs; no two modules import each other, directly or round a loop; an import inside a function
is there only to defer an optional heavy dependency, and says which with ``# lazy: <dependency>``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("index", "curation", "distill", "jobs")
LAYERS = ("index.core", "index", "curation", "distill", "jobs", "cli")
# entry points: they parse flags, build executors (jobs) and print the summary lines
CLI_MODULES = {"curation.cli", "curation.build_index", "distill.cli", "index.cli"}
# what a function-level import may defer: heavy to import, and not needed on every path (the GPU image has
# no faiss, the library runs without Ray, a family's package loads with its family)
HEAVY = {"faiss", "ray", "open_clip", "timm", "efficientnet_lite_pytorch", "huggingface_hub", "matplotlib",
         "img2dataset", "pyarrow", "pandas", "skimage"}
LAZY = re.compile(r"#\s*lazy:\s*([\w.]+)")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _target(name: str) -> str:
    """The project module an imported dotted name lives in (the longest existing prefix)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported project module, line, inside a function, source of the import) for each import."""
    path = MODULES[module]
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        source = "\n".join(lines[node.lineno - 1: node.end_lineno])
        for name in names:
            found.append((name, node.lineno, id(node) in in_function, source))
    return found


def _layer(module: str) -> str:
    if module in CLI_MODULES:
        return "cli"
    if module == "index.core" or module.startswith("index.core."):
        return "index.core"
    return module.split(".")[0]


def _project_edges() -> list[tuple[str, str, int]]:
    edges = []
    for module in MODULES:
        for name, line, _, _ in _imports(module):
            target = _target(name)
            if target and name.split(".")[0] in PACKAGES and target != module:
                edges.append((module, target, line))
    return edges


EDGES = _project_edges()


def test_the_walk_sees_the_project():
    assert {"index.core.contract", "index.search", "curation.pipeline", "distill.run", "jobs.executors"} <= set(MODULES)
    assert any(a == "index.build" and b == "index.core.contract" for a, b, _ in EDGES)
    assert any(a == "jobs.train_ray" and b == "distill.training" for a, b, _ in EDGES)


def test_each_module_imports_only_its_layer_and_those_below():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = [f"{a}:{line} imports {b} ({_layer(a)} may not import {_layer(b)})"
             for a, b, line in EDGES if rank[_layer(b)] > rank[_layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_nothing_else_of_the_project():
    outside = [f"{a}:{line} imports {b}" for a, b, line in EDGES
               if _layer(a) == "index.core" and _layer(b) != "index.core"]
    assert not outside, "\n".join(outside)


def test_no_library_module_imports_jobs():
    wrong = [f"{a}:{line} imports {b}" for a, b, line in EDGES
             if _layer(b) == "jobs" and _layer(a) not in ("jobs", "cli")]
    assert not wrong, "\n".join(wrong)


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_counting_imports_inside_functions():
    # a package's __init__ only documents it: importing a package is not a dependency on its modules
    edges = [(a, b, ln) for a, b, ln in EDGES if MODULES[b].name != "__init__.py"]
    assert not _cycles(edges), _cycles(edges)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles([("a", "b", 1), ("b", "c", 1), ("c", "a", 1), ("c", "d", 1)]) == [["a", "b", "c"]]


def test_imports_inside_functions_defer_a_named_heavy_dependency():
    wrong = []
    for module in MODULES:
        for name, line, inside, source in _imports(module):
            if not inside:
                continue
            m = LAZY.search(source)
            if not m or m.group(1) not in HEAVY:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {source.splitlines()[0].strip()}")
    assert not wrong, ("move these to the top of the module, or name the optional heavy dependency they defer "
                       f"with '# lazy: <one of {sorted(HEAVY)}>':\n" + "\n".join(sorted(set(wrong))))


@pytest.mark.parametrize("line, ok", [("import faiss  # lazy: faiss", True), ("import math", False),
                                      ("from jobs.ray_data import x  # lazy: ray", True),
                                      ("import numpy  # lazy: numpy", False)])
def test_the_lazy_rule_reads_the_comment(line, ok):
    m = LAZY.search(line)
    assert bool(m and m.group(1) in HEAVY) is ok
