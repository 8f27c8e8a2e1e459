"""The server package's import graph has no cycles: every module can be read, and
imported, on its own, and the layers stay in order (the readiness view and the
explanation methods below the runtime that uses them).

The graph counts every import that runs, lazy ones inside functions too (a cycle
through a lazy import is still a cycle, only one that fails later), and an import
of `a.b.c` from outside package `a.b` also counts `a.b`'s `__init__`, which Python
runs first. Imports under `if TYPE_CHECKING:` are left out: they never run, so
they cannot order or fail an import; they name, for the type checker, the runtime
that calls a module (the explanation methods type their `runtime` argument as
`ModelRuntime`, which calls them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import salience_server
from tests.unit.client.test_import_graph import find_cycle

PACKAGE = "salience_server"
ROOT = Path(salience_server.__file__).parent


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _running_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree but those only the type checker reads."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports when it runs."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _running_nodes(tree):
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
    edges = set()
    for target in targets:
        if target not in modules or name.startswith(target + "."):
            continue  # an enclosing package runs before any of its modules
        edges.add(target)
        parts = target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if not (name == parent or name.startswith(parent + ".")):
                edges.add(parent)
    edges.discard(name)
    return edges


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, modules) for name in modules}


def test_the_import_graph_sees_lazy_imports_and_leaves_out_type_checking_ones() -> None:
    edges = graph()
    # Read right: a module-level import, a lazy one inside a function (the
    # repository loads TensorFlow's runtime only when it loads a version), and a
    # package's __init__ run by importing one of its modules from outside.
    assert f"{PACKAGE}.readiness" in edges[f"{PACKAGE}.core"]
    assert f"{PACKAGE}.runtime" in edges[f"{PACKAGE}.repository"]
    assert f"{PACKAGE}.explain.methods" in edges[f"{PACKAGE}.runtime"]
    # Only under TYPE_CHECKING: the methods name the runtime for the type checker.
    source = (ROOT / "explain" / "methods" / "vanilla.py").read_text(encoding="utf-8")
    assert "from salience_server.runtime import ModelRuntime" in source
    assert f"{PACKAGE}.runtime" not in edges[f"{PACKAGE}.explain.methods.vanilla"]


def test_the_server_package_has_no_import_cycle() -> None:
    assert find_cycle(graph()) is None


def test_the_lower_modules_import_nothing_above_them() -> None:
    edges = graph()
    # Readiness is read by everyone and reads nothing of the server.
    assert edges[f"{PACKAGE}.readiness"] == set()
    # The shared helpers of the methods sit below the methods and the backprop rules.
    for lower in ("explain.common", "explain.backprop", "explain.randomize"):
        assert not {
            m for m in edges[f"{PACKAGE}.{lower}"] if m.startswith(f"{PACKAGE}.explain.methods")
        }
        assert f"{PACKAGE}.runtime" not in edges[f"{PACKAGE}.{lower}"]
