"""A user's Linux git tree (``--kernel=build:LINUX_TREE``, ``git bisect run``) built with holecheck's recipe.

Out of tree: the ``make O=`` output dir is ``build/trees/<path hash>-<recipe>/``, one per tree (not per commit),
so bisection steps rebuild incrementally; the artefacts are keyed by HEAD and ``git diff HEAD``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from suite import locks
from suite.errors import SetupError

from .kbuild import BUILD_TIMEOUT, build_root, configure_and_build, preflight, published
from .recipe import recipe_sha, recipe_text, tree_key

GIT_TIMEOUT = 60.0


def _git(tree: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SetupError("git not found: build:LINUX_TREE needs git") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"git -C {tree} {' '.join(args)}: no answer within {GIT_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SetupError(f"build:{tree}: git {' '.join(args)} failed: {err[-1] if err else proc.returncode}")
    return proc.stdout


def build_tree(tree: Path, jobs: int = os.cpu_count() or 1, *, timeout: float = BUILD_TIMEOUT,
               force: bool = False) -> Path:
    """Configure and build a user's kernel git tree out of tree; the bzImage path.

    Artefacts are keyed by HEAD and the hash of ``git diff HEAD`` (untracked files do not count). The output dir
    is one per tree, not per commit, so bisection steps rebuild incrementally (git checkout updates mtimes).
    """
    tree = tree.expanduser().resolve()
    if not (tree / "Makefile").is_file() or not (tree / "mm").is_dir():
        raise SetupError(f"build:{tree}: not a Linux source tree (no Makefile and mm/)")
    if (tree / ".config").exists() or (tree / "include/config").exists():
        raise SetupError(f"build:{tree}: the tree has an in-tree build (.config); out-of-tree builds need "
                         f"'make mrproper' there first")
    head = _git(tree, "rev-parse", "HEAD").decode().strip()
    diff = _git(tree, "diff", "HEAD", "--binary")
    fragment_text = recipe_text()
    cfg = recipe_sha(fragment_text)
    out = build_root() / tree_key(head, diff, cfg)
    if not force and (hit := published(out)):
        return hit
    preflight()
    obj = build_root() / "trees" / f"{hashlib.sha256(str(tree).encode()).hexdigest()[:12]}-cfg{cfg[:12]}"
    with locks.held(obj.with_name(obj.name + ".lock"), f"another holecheck run's build of {tree}", timeout):
        if not force and (hit := published(out)):
            return hit
        dirty = f" + diff {hashlib.sha256(diff).hexdigest()[:12]}" if diff else ""
        return configure_and_build(tree, obj, out, fragment_text, "tree", jobs, timeout, None,
                                   source=f"{tree} {head[:12]}{dirty}")
