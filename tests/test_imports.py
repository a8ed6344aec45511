"""The uxnet packages have no import cycles between their modules.

Two graphs: module-level imports of both packages (package ``__init__`` files, which import their submodules by
design, are left out); and for ``uxnet`` every import, lazy ones inside functions included, with the package
``__init__`` files as nodes, so that a lazy import cannot hide a cycle. On the second graph the wings of ``uxnet``
depend one way: commands on everything, bench on memory, inference on io, io on the networks, never back."""

import ast
import functools
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PACKAGES = ("uxnet", "uxnet_kernels")


def _modules(packages, with_inits=False):
    """{dotted module name: path} of every module in ``packages``; ``__init__.py`` files under their package's name
    with ``with_inits``, otherwise left out."""
    found = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py") or (name == "__init__.py" and not with_inits):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                dotted = rel.replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if name == "__init__.py" else dotted] = os.path.join(folder, name)
    return found


def _imports(path, module, known, lazy=False):
    """Dotted names in ``known`` that ``module`` imports: at module level, or anywhere in the file with ``lazy``."""
    tree = ast.parse(open(path).read())
    package = module if os.path.basename(path) == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in (ast.walk(tree) if lazy else tree.body):
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
        targets.update(n for n in names if n in known and n != module)
    return targets


@functools.lru_cache(maxsize=None)
def _graph():
    known = _modules(PACKAGES)
    return {m: _imports(p, m, known) for m, p in known.items()}


@functools.lru_cache(maxsize=None)
def _uxnet_graph():
    known = _modules(("uxnet",), with_inits=True)
    return {m: _imports(p, m, known, lazy=True) for m, p in known.items()}


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
    assert "uxnet.networks.blocks.rep_branches" in graph["uxnet.networks.blocks.ux_block"]
    assert "uxnet.networks.nets.uxnet" in graph["uxnet.networks.reparam"]
    lazy = _uxnet_graph()
    assert "uxnet.inference.segment" in lazy["uxnet.commands.segment"]  # imported inside run()
    assert "uxnet.networks.nets.uxnet" in lazy["uxnet"]


@pytest.mark.parametrize("module", sorted(_graph()))
def test_no_import_cycle(module):
    graph = _graph()
    reachable = _reachable(graph, module)
    assert module not in reachable, f"{module} imports itself through {sorted(reachable)}"


@pytest.mark.parametrize("module", sorted(_uxnet_graph()))
def test_no_import_cycle_through_lazy_imports(module):
    graph = _uxnet_graph()
    reachable = _reachable(graph, module)
    assert module not in reachable, f"{module} imports itself through {sorted(reachable)}"


def test_model_does_not_import_reparam():
    assert "uxnet.networks.reparam" not in _reachable(_graph(), "uxnet.networks.nets.uxnet")


# wing -> the wings it must never reach, lazy imports included
NEVER = {
    "uxnet.networks": ("uxnet.io", "uxnet.inference", "uxnet.memory", "uxnet.bench", "uxnet.commands", "uxnet.cli"),
    "uxnet.io": ("uxnet.inference", "uxnet.memory", "uxnet.bench", "uxnet.commands", "uxnet.cli"),
    "uxnet.inference": ("uxnet.memory", "uxnet.bench", "uxnet.commands", "uxnet.cli"),
    "uxnet.memory": ("uxnet.io", "uxnet.inference", "uxnet.bench", "uxnet.commands", "uxnet.cli"),
    "uxnet.bench": ("uxnet.io", "uxnet.inference", "uxnet.commands", "uxnet.cli"),
}


@pytest.mark.parametrize("wing", sorted(NEVER))
def test_wings_depend_one_way(wing):
    graph = _uxnet_graph()
    members = [m for m in graph if m == wing or m.startswith(wing + ".")]
    reached = set().union(*(_reachable(graph, m) for m in members))
    wrong = sorted(m for m in reached if any(m == w or m.startswith(w + ".") for w in NEVER[wing]))
    assert not wrong, f"{wing} reaches {wrong}"


def test_timing_stands_alone():
    """benchmarks/scripts load uxnet/timing.py by path, next to the uxnet_kernels build they measure."""
    tree = ast.parse(open(os.path.join(ROOT, "uxnet", "timing.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {"." if node.level else node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"uxnet", "uxnet_kernels", "."}, sorted(imported)
