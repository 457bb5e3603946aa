"""errors.py draws holecheck's whole error tree: every HolecheckError subclass is in it, under its parent."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

from suite import errors
from suite.errors import HolecheckError

ROOT = Path(__file__).resolve().parents[2]
NODE = re.compile(r"^(?P<indent>[ │├└─]*?)(?P<name>[A-Z]\w*(Error|Failed))\b")


def drawn_tree(doc: str) -> dict[str, str]:
    """class name → parent's name, from the tree in the docstring (4 columns per level)."""
    parents: dict[str, str] = {}
    path: list[str] = []
    for line in doc.splitlines():
        m = NODE.match(line)
        if not m or not line.startswith("    "):
            continue
        depth = (len(m["indent"]) - 4) // 4
        path[depth:] = [m["name"]]
        if depth:
            parents[m["name"]] = path[depth - 1]
    return parents


def subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]


def test_the_error_tree_in_errors_docstring_is_complete() -> None:
    for pkg in ("suite", "kernels", "images"):  # every module, so that every error class is defined
        for path in (ROOT / pkg).glob("*.py"):
            importlib.import_module(pkg if path.stem == "__init__" else f"{pkg}.{path.stem}")
    tree = drawn_tree(errors.__doc__ or "")
    assert tree["SetupError"] == "HolecheckError" and tree["LaunchError"] == "SetupError"
    for cls in subclasses(HolecheckError):
        assert cls.__name__ in tree, f"{cls.__module__}.{cls.__name__} is missing from the tree in suite/errors.py"
        assert tree[cls.__name__] == cls.__bases__[0].__name__, f"{cls.__name__} is drawn under the wrong parent"
