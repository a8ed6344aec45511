"""The uxnet packages have no import cycles between their modules (module-level imports only; package
``__init__`` files, which import their submodules by design, are left out)."""

import ast
import functools
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PACKAGES = ("uxnet", "uxnet_kernels")


def _modules():
    """{dotted module name: path} of every non-__init__ module in PACKAGES."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py") and name != "__init__.py":
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                    found[rel.replace(os.sep, ".")] = os.path.join(folder, name)
    return found


def _module_level_imports(path, module, known):
    """Dotted names in ``known`` that ``module`` imports at module level (not inside functions or classes)."""
    tree = ast.parse(open(path).read())
    package = module.rsplit(".", 1)[0]
    targets = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        targets.update(n for n in names if n in known)
    return targets


@functools.lru_cache(maxsize=None)
def _graph():
    known = _modules()
    return {m: _module_level_imports(p, m, known) for m, p in known.items()}


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_sees_known_edges():
    graph = _graph()
    assert "uxnet.rep_blocks" in graph["uxnet.model"]
    assert "uxnet.model" in graph["uxnet.reparam"]


@pytest.mark.parametrize("module", sorted(_graph()))
def test_no_import_cycle(module):
    graph = _graph()
    reachable = _reachable(graph, module)
    assert module not in reachable, f"{module} imports itself through {sorted(reachable)}"


def test_model_does_not_import_reparam():
    assert "uxnet.reparam" not in _reachable(_graph(), "uxnet.model")
