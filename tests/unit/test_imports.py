"""The package's layers: no import circle, static imports and the registries' lazy imports both, and
no library module imports a command-line module (docs/DESIGN.md, "Layers")."""

import ast
import pathlib

from dpdmd_jax import backbones, data
from dpdmd_jax import eval as eval_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dpdmd_jax"
COMMANDS = {"dpdmd_jax.main", "dpdmd_jax.sample", "dpdmd_jax.evaluate", "dpdmd_jax.export", "dpdmd_jax.plan",
            "dpdmd_jax.review"}
# Registries that import a module by name when one is asked for: their module -> the names.
REGISTRIES = {
    "dpdmd_jax.backbones": backbones._BUILTIN.values(),
    "dpdmd_jax.data": data.SOURCES.values(),
    "dpdmd_jax.eval": eval_lib.EVALUATORS.values(),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module of ours `name` imports anywhere in its file (top level or inside a function),
    plus the modules its registry names."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names}
    out |= {target.split(":")[0] for target in REGISTRIES.get(name, ())}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_and_registry_imports():
    assert "dpdmd_jax.backbones.sd3" in GRAPH["dpdmd_jax.backbones"]  # a registry's name
    assert "dpdmd_jax.eval.toy" in GRAPH["dpdmd_jax.eval"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(GRAPH) == []


def test_no_module_imports_a_command():
    assert {name: GRAPH[name] & COMMANDS for name in MODULES if GRAPH[name] & COMMANDS} == {}


def test_core_imports_nothing_of_ours():
    assert GRAPH["dpdmd_jax.core"] == set()
