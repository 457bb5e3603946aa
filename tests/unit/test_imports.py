"""Every module of suite/, kernels/ and images/ imports on its own, and no two modules import each other.

Why both: a module imported first in a fresh interpreter shows whether it needs some other module to have been
imported before it (the test session imports almost everything, which hides that). And a lazy import (inside a
function) keeps an import cycle from failing at start-up, so the cycle survives unnoticed until the day its
order changes: the graph below counts function-level imports (and TYPE_CHECKING ones) and must be acyclic.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("suite", "kernels", "images")


def modules() -> dict[str, Path]:
    """Dotted module name → source file, for every module of the packages (packages themselves included)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[dotted.removesuffix(".__init__")] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source (module level or not)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
            subs = {f"{source}.{a.name}" for a in node.names} & known
            out |= subs or {source}
    return (out & known) - {name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "suite.qemu.process" in graph["suite.qemu.machine"]  # the graph sees module-level imports …
    assert "suite.targets.guest" in graph["suite.targets.opening"]  # … and lazy ones
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_a_cycle_through_a_lazy_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("module", sorted(modules()))
def test_module_imports_in_a_fresh_interpreter(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_docstring_names_every_module(package: str) -> None:
    """The top package's reading order names every module below it (``qemu.machine`` for suite.qemu.machine), and
    each sub-package's docstring its own."""
    packages = [name for name, path in modules().items() if name.startswith(package) and path.stem == "__init__"]
    missing = []
    for pkg in packages:
        doc = (ROOT / pkg.replace(".", "/") / "__init__.py").read_text()
        below = [name.removeprefix(f"{pkg}.") for name in modules() if name.startswith(f"{pkg}.")]
        shown = below if pkg == package else [name for name in below if "." not in name]
        missing += [f"{pkg}: {name}" for name in shown if f"``{name}``" not in doc]
    assert not missing, f"package docstrings do not name {missing} in their reading order"
