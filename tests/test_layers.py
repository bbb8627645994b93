"""The house's structure: every import of allocator/ goes down (or sideways) its layers, and no module loop.

Read from the code's own imports (every ``import`` and ``from … import`` anywhere in a module, function-level
ones included), so a new back-up arrow fails here, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "allocator"

# bottom first; a module may import its own layer or any below it
LAYERS = [
    ("allocator.errors", "allocator.about", "allocator.io", "allocator.hub", "allocator.untrusted"),  # foundations
    ("allocator.levels",),  # level kinds: parts, names, storage, rounding
    ("allocator.formats",),  # deployment formats price and check levels
    (
        "allocator.model",
        "allocator.inventory",
        "allocator.moe",
        "allocator.data",
        "allocator.evaluate",
        "allocator.tasks",
        "allocator.reference",
    ),
    ("allocator.latency",),  # tables, kernels, measurement on the GPU
    ("allocator.budget",),  # budgets and the numeric Problem
    ("allocator.plan", "allocator.report", "allocator.export", "allocator.checkpoints"),  # the plan; what is written
    ("allocator.backends",),  # compressing weights; the level database
    ("allocator.sensitivity", "allocator.profile", "allocator.fitness"),  # measured sensitivities, KL fitness
    ("allocator.search",),  # searchers see numbers
    ("allocator.spec",),  # a run resolved once
    ("allocator.workspace",),  # cached measurements
    ("allocator.session",),  # a loaded model and its data
    ("allocator.pipeline", "allocator.apply"),
    ("allocator.compare",),
    ("allocator.cli", "allocator.__main__", "allocator"),  # the command line, and the package's face
]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The allocator modules ``name`` imports (a package's submodule where the import names one)."""
    tree = ast.parse(MODULES[name].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("allocator")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("allocator"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out - {name}


def _layer(name: str) -> int:
    best = max((len(prefix), i) for i, group in enumerate(LAYERS) for prefix in group
               if name == prefix or name.startswith(prefix + "."))  # fmt: skip
    return best[1]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_has_a_layer():
    assert all(_layer(name) >= 0 for name in MODULES)


def test_no_import_runs_back_up_a_layer():
    up = sorted(f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})" for a, deps in GRAPH.items() for b in deps
                if b in MODULES and _layer(b) > _layer(a))  # fmt: skip
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_module_imports_itself_through_a_loop():
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v] & set(MODULES):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    assert not loops, loops


def test_no_module_is_over_300_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long
