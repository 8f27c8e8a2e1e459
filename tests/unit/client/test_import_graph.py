"""The client package's import graph has no cycles, and no module imports another's
private names: every module can be read, and imported, on its own.

The graph counts every import, lazy ones inside functions too (a cycle through a
lazy import is still a cycle, only one that fails later), and an import of
`a.b.c` from outside package `a.b` also counts `a.b`'s `__init__`, which Python runs
first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import salience_client

PACKAGE = "salience_client"
ROOT = Path(salience_client.__file__).parent


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The package's modules `name` imports, and the private names it imports from them."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    targets.add(f"{source}.{alias.name}")  # a module, not a name in one
                elif alias.name.startswith("_") and source.startswith(PACKAGE):
                    private.append(f"{source}.{alias.name}")
    edges = set()
    for target in targets:
        if target not in modules or name.startswith(target + "."):
            continue  # an enclosing package runs before any of its modules
        edges.add(target)
        # Importing a.b.c from outside a.b runs a.b's __init__ first.
        parts = target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if not (name == parent or name.startswith(parent + ".")):
                edges.add(parent)
    edges.discard(name)
    return edges, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_the_cli_package_and_its_commands() -> None:
    modules = module_names()
    graph = {name: imports_of(name, modules)[0] for name in modules}
    # The graph is read right: the entry point imports every command module, a
    # command its shared options, and the library module behind it.
    assert {f"{PACKAGE}.cli.{c}" for c in ("models", "predict", "explain", "bench")} <= graph[
        f"{PACKAGE}.cli.entry"
    ]
    assert {f"{PACKAGE}.cli.options", f"{PACKAGE}.audit"} <= graph[f"{PACKAGE}.cli.audit"]
    # The modules behind the commands never import the command line back.
    for library in ("audit", "review", "bench", "report", "overlay"):
        assert not {
            m
            for m in graph[f"{PACKAGE}.{library}"]
            if m.startswith(f"{PACKAGE}.cli.") or m == f"{PACKAGE}.cli"
        }


def test_the_client_package_has_no_import_cycle() -> None:
    modules = module_names()
    graph = {name: imports_of(name, modules)[0] for name in modules}
    assert find_cycle(graph) is None


def test_no_module_imports_another_modules_private_names() -> None:
    modules = module_names()
    private = {name: imports_of(name, modules)[1] for name in modules}
    assert {name: names for name, names in private.items() if names} == {}


def test_stream_and_client_do_not_import_each_other() -> None:
    modules = module_names()
    assert f"{PACKAGE}.client" not in imports_of(f"{PACKAGE}.stream", modules)[0]
    assert f"{PACKAGE}.stream" in imports_of(f"{PACKAGE}.client", modules)[0]
