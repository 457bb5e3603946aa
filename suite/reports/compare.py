"""Which cells changed verdict between two runs: the headline of a nightly run.

    python -m suite.report --compare OLD NEW      # each a JUnit XML file (--junitxml) or a --report directory

Prints new failures first (a cell that fails now and did not before, a new cell that fails included), then fixes
(failing before, passing now), then every other change (a cell that appeared or disappeared, skipped ↔ passed,
failed ↔ error, failed → skipped), each with its kernel and the first line of its failure message. Exit status:
0 no new failure, 1 new failures (or NEW has no cells at all while OLD had some), 2 an input cannot be read.

A cell is a test id; a test in a ``--kernel`` matrix carries the kernel spec in its id (``[debian-newest-…]``),
so the same spec is the same cell on another night even when ``debian:newest`` became a newer package: the
line then says which kernel ran before and which now.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .outcomes import Outcome, collect

OUTCOMES_FILE = "outcomes.json"  # what a --report directory keeps for a later comparison
FAILING = ("failed", "error")
WIDTH = 200  # a message line is cut here


@dataclass(frozen=True)
class Result:
    """One cell of a run: its outcome and the kernel it ran on."""

    outcome: Outcome
    kernel: str

    @property
    def status(self) -> str:
        return self.outcome.status


@dataclass(frozen=True)
class Change:
    nodeid: str
    kind: str  # "new failure" | "fixed" | "other"
    old: Result | None  # None: a new cell
    new: Result | None  # None: a removed cell

    @property
    def transition(self) -> str:
        return f"{self.old.status if self.old else 'new cell'} → {self.new.status if self.new else 'removed'}"

    @property
    def kernel(self) -> str:
        """The kernel now (before, for a removed cell); both when they differ."""
        old, new = (r.kernel if r else "" for r in (self.old, self.new))
        if old and new and old != new:
            return f"{new} (was {old})"
        return new or old or "?"

    @property
    def message(self) -> str:
        """The failure that matters: the new one for a new failure, the old one for a fix."""
        for r in ((self.old, self.new) if self.kind == "fixed" else (self.new, self.old)):
            if r is not None and r.status != "passed" and r.outcome.message:
                return first_line(r.outcome.message)
        return ""


def first_line(message: str) -> str:
    """What went wrong, in one line: an exception's ``E   …`` line in a pytest traceback; a holecheck verdict's
    first finding (its first line only names the scenario and kernel); else the first line."""
    lines = [ln.rstrip() for ln in re.sub(r"^(Failed|Skipped): ", "", message.strip()).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = next((ln[1:].strip() for ln in lines if ln.startswith("E ")), "")
    if not line:
        verdict_head = " on kernel " in lines[0] and len(lines) > 1 and lines[1].startswith(" ")
        line = (lines[1] if verdict_head else lines[0]).strip()
    line = re.sub(r"\(first ([^,()]+), [^()]*\)", r"(first \1, …)", line)  # one example page is enough here
    return line[:WIDTH] + ("…" if len(line) > WIDTH else "")


def cell_key(nodeid: str) -> str:
    """The same cell whether its id came from pytest (``tests/test_x.py::Class::test[p]``) or from JUnit, which
    only knows ``tests.test_x.Class`` + ``test[p]`` (outcomes.parse_junit guesses ``tests/test_x/Class.py::…``)."""
    path, _, name = nodeid.rpartition("::")
    return re.sub(r"\.py$", "", path.replace(".py::", ".").replace("::", ".")).replace("/", ".") + "::" + name


def load(path: Path) -> dict[str, Result]:
    """A run's cells by ``cell_key``: from a JUnit XML file, or a --report directory's outcomes.json."""
    if path.is_dir():
        saved = path / OUTCOMES_FILE
        if not saved.is_file():
            raise ValueError(f"{path}: no {OUTCOMES_FILE} (a --report directory written before it was kept, or not "
                             "a report): give the run's JUnit XML instead")
        rows = json.loads(saved.read_text())
        return {cell_key(r["nodeid"]): Result(Outcome(**{k: v for k, v in r.items() if k != "kernel"}), r["kernel"])
                for r in rows}
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory (expected a JUnit XML file or a --report directory)")
    cells = collect(Path("/nonexistent"), [path])  # no artifacts: the XML's own properties name the kernel
    return {cell_key(c.nodeid): Result(c.outcome, c.kernel) for c in cells}


def save(path: Path, results: Sequence[tuple[Outcome, str]]) -> None:
    """What ``load`` reads back from a --report directory: each outcome with its kernel."""
    path.write_text(json.dumps([asdict(o) | {"kernel": k} for o, k in results], indent=1, ensure_ascii=False) + "\n")


def kind(old: Result | None, new: Result | None) -> str | None:
    """None if nothing changed; else new failure, fixed or other."""
    was, now = (r.status if r else None for r in (old, new))
    if was == now:
        return None
    if now in FAILING and was not in FAILING:
        return "new failure"
    if was in FAILING and now == "passed":
        return "fixed"
    return "other"


def compare(old: dict[str, Result], new: dict[str, Result]) -> list[Change]:
    """Every cell whose status changed: new failures, then fixes, then the rest; each group in the new run's
    order (removed cells last, in the old run's order)."""
    keys = list(new) + [k for k in old if k not in new]
    changes = []
    for key in keys:
        o, n = old.get(key), new.get(key)
        if (k := kind(o, n)) is not None:
            changes.append(Change((n or o).outcome.nodeid, k, o, n))  # type: ignore[union-attr]
    order = ("new failure", "fixed", "other")
    return sorted(changes, key=lambda c: order.index(c.kind))


HEADINGS = {"new failure": "NEW FAILURES", "fixed": "FIXED", "other": "OTHER CHANGES"}


def render(changes: Sequence[Change], old_name: str, new_name: str, cells: int) -> str:
    counts = {k: sum(c.kind == k for c in changes) for k in HEADINGS}
    lines = [f"{old_name} → {new_name}: {counts['new failure']} new failures, {counts['fixed']} fixed, "
             f"{counts['other']} other changes ({cells} cells)"]
    for k, heading in HEADINGS.items():
        group = [c for c in changes if c.kind == k]
        if group:
            lines += ["", heading]
        for c in group:
            lines.append(f"  {c.nodeid}: {c.transition}, kernel {c.kernel}")
            if msg := c.message:
                lines.append(f"      {msg}")
    return "\n".join(lines)


def main(old_path: Path, new_path: Path) -> int:
    try:
        old, new = load(old_path), load(new_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # outcomes.BadJUnit is a ValueError
        print(f"report --compare: {exc}", file=sys.stderr)
        return 2
    changes = compare(old, new)
    print(render(changes, str(old_path), str(new_path), len(set(old) | set(new))))
    if old and not new:  # e.g. tonight's kernel did not boot: its cells vanished rather than failed
        print(f"\n{new_path} has no cells at all: that run never reached its tests (a kernel that did not boot?)")
        return 1
    return 1 if any(c.kind == "new failure" for c in changes) else 0
