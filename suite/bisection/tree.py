"""Bisect your kernel tree: ``python -m suite.bisect run-tree`` is one step of ``git bisect run``::

    cd linux
    git bisect start BAD GOOD
    git bisect run /path/to/holecheck/.venv/bin/python -m suite.bisect run-tree . -k postcopy_style

Each step builds the checked-out tree with holecheck's config (``kernels.git_tree.build_tree``: out of tree, in
``~/.cache/holecheck/build/trees/``, incremental between steps; the tree must have no in-tree ``.config``),
boots the bzImage and runs the selected tests. Exit 0: every selected test passed; 1: a test failed; 125: the
tree does not build, the kernel does not boot or the session cannot set up (git skips the commit); 128: the
suite itself is broken (a -k that selects nothing, a collection error, a usage error): git aborts the
bisection. For a fix (old commits fail, new ones pass) add ``--first-good``, which swaps exits 0 and 1, and let
git's own terms say so::

    git bisect start --term-old=broken --term-new=fixed FIXED BROKEN
    git bisect run /path/to/holecheck/.venv/bin/python -m suite.bisect run-tree . -k snapshot_style --first-good

Every step is appended to ``.holecheck/bisect/run-tree.jsonl``.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from suite.errors import SetupError

from .step import Runner, StepVerdict, failure_report

GIT_TIMEOUT = 60.0
EXIT_GOOD, EXIT_BAD, EXIT_SKIP, EXIT_ABORT = 0, 1, 125, 128  # git bisect run's meanings


def exit_status(verdict: StepVerdict, first_good: bool = False) -> int:
    """git bisect run's exit code for a step (``first_good``: passing tests mean "bad" to git, i.e. new)."""
    if verdict is StepVerdict.GOOD:
        return EXIT_BAD if first_good else EXIT_GOOD
    if verdict is StepVerdict.BAD:
        return EXIT_GOOD if first_good else EXIT_BAD
    return EXIT_SKIP if verdict is StepVerdict.SKIP else EXIT_ABORT


def _head(tree: Path) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return proc.stdout.strip() or "?"


def run_tree(tree: Path, runner: Runner, jobs: int = os.cpu_count() or 1, first_good: bool = False) -> int:
    """One ``git bisect run`` step: build ``tree``, run the selected tests on it; git's exit code."""
    tree = tree.expanduser().resolve()  # relative to the caller's cwd (git bisect run runs in the tree)
    head = _head(tree)
    t0 = time.monotonic()
    entry: dict[str, object] = {"tree": str(tree), "head": head, "k": runner.expr, "time": time.strftime("%FT%T%z")}
    try:
        from kernels.git_tree import build_tree  # imported late: the Debian bisection does not need the builder

        image = build_tree(tree, jobs)
    except SetupError as exc:
        code = EXIT_SKIP
        print(f"run-tree {head}: does not build: {exc} → exit {code} (skip)", flush=True)
        entry.update(verdict="skip", reason=f"build: {exc}", exit=code)
    else:
        built = time.monotonic() - t0
        workdir = runner.project / ".holecheck" / "bisect" / f"run-tree-{time.strftime('%Y%m%d-%H%M%S')}-{head}"
        outcome, seconds = runner.run(str(image), workdir, "tests")
        code = exit_status(outcome.verdict, first_good)
        print(f"run-tree {head}: {image} built in {built:.0f} s → {outcome.verdict} ({outcome.reason}) in "
              f"{seconds:.0f} s → exit {code}", flush=True)
        entry.update(image=str(image), verdict=outcome.verdict.value, reason=outcome.reason, exit=code,
                     failures=failure_report(outcome), dir=str(workdir))
    log = runner.project / ".holecheck" / "bisect" / "run-tree.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return code
