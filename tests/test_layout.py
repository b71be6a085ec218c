"""The package's shape holds: common imports nothing else of ours, the merge engine (merging)
imports only common, the soup and proxy sides never import each other, and no module imports
itself back through a cycle."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "orchestrator")
SIDES = ("soup", "proxy")
LIBRARIES = ("common", "merging")  # imported by the sides, never importing them


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports_of(path: str) -> set[str]:
    """Every orchestrator module a file imports, at the top or inside a function."""
    found = set()
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from orchestrator.soup import merge`
    return {m for m in found if m == "orchestrator" or m.startswith("orchestrator.")}


def modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path) if m in known and m != name} for name, path in known.items()}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in (*LIBRARIES, *SIDES)) else "entry"


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = area(src), area(dst)
            if a == "common" and b != "common":
                bad.append(f"{src} (common) imports {dst} ({b})")
            elif a == "merging" and b not in LIBRARIES:
                bad.append(f"{src} (merging) imports {dst} ({b})")
            elif a in SIDES and b in SIDES and a != b:
                bad.append(f"{src} ({a}) imports {dst} ({b})")
            elif a != "entry" and b == "entry":
                bad.append(f"{src} imports the entry point {dst}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_the_three_parts():
    areas = {area(m) for m in modules()}
    assert {"common", "merging", "soup", "proxy", "entry"} <= areas


def test_imports_go_one_way():
    assert violations(graph()) == []


def test_no_import_cycles():
    # a package's __init__ importing its own submodules (a registry) is not a cycle between modules
    edges = {src: {d for d in dst if not src.startswith(d + ".")} for src, dst in graph().items()}
    assert cycles(edges) == []


@pytest.mark.parametrize("edges, expected", [
    ({"orchestrator.common.pool": {"orchestrator.soup.kitchen"}}, "(common) imports"),
    ({"orchestrator.merging.executor": {"orchestrator.soup.kitchen"}}, "(merging) imports"),
    ({"orchestrator.soup.kitchen": {"orchestrator.proxy.run"}}, "(soup) imports"),
    ({"orchestrator.proxy.trial": {"orchestrator.soup.train"}}, "(proxy) imports"),
    ({"orchestrator.soup.kitchen": {"orchestrator.soup_sweep"}}, "imports the entry point"),
])
def test_the_rule_catches_each_kind_of_violation(edges, expected):
    assert any(expected in v for v in violations(edges))


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
