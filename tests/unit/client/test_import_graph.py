"""The client package's modules import one another without cycles, and none imports
another's private names (a `_name` is a module's own business).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "clients" / "salience_client"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("salience_client", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports() -> tuple[dict[str, set[str]], list[str]]:
    """Every module's imports of the package's modules (function-level ones too), and
    the private names imported across modules.
    """
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in known else node.module
                    if target in known and target != name:
                        edges[name].add(target)
                    if alias.name.startswith("_") and node.module in known:
                        private.append(f"{name} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.name != name:
                        edges[name].add(alias.name)
    return edges, private


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules in order), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return []
        path.append(name)
        for target in sorted(edges[name]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(name)
        return []

    for name in sorted(edges):
        found = visit(name)
        if found:
            return found
    return []


def test_the_client_modules_import_one_another_without_cycles() -> None:
    edges, _ = imports()
    assert "salience_client.cli.main" in edges  # the walk saw the command line
    assert cycle(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycle(edges) == ["a", "b", "c", "a"]


def test_no_module_imports_another_modules_private_names() -> None:
    _, private = imports()
    assert private == []


def test_the_streams_and_the_client_do_not_import_each_other() -> None:
    edges, _ = imports()
    assert "salience_client.client" not in edges["salience_client.stream"]
    assert "salience_client.cli.main" not in edges["salience_client.audit"]
    assert "salience_client.cli.main" not in edges["salience_client.review"]
