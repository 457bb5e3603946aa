"""Soak: run one pytest selection N times and tell stable cells from flaky ones.

    python -m suite.soak -n 5 [--out DIR] [--run-timeout S] [PYTEST ARGS ...]
    python -m suite.soak -n 3 tests/test_synthetic.py -k mpn409
    python -m suite.soak -n 3 -- -n 2 --dist loadgroup tests -m host    # after "--", every argument is pytest's

Each run is its own pytest session (``--junitxml`` and, unless given, ``--artifacts`` per run under DIR, its
output in ``run-N.log``). The report lists every cell with its outcomes over the runs and its time spread
(min / median / max of JUnit's per-test time), flaky cells (more than one outcome) first, then failing ones,
then a one-line total. Exit 0 only if every run finished and every cell passed (or skipped) every time.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .bisection.step import PYTEST_FAILED, PYTEST_OK, last_word, run_bounded
from .reports.outcomes import RANK, Outcome, parse_junit, worst_per_test

RUN_TIMEOUT = 3 * 3600.0  # one session of the selection; a hung one is stopped (and unwinds), not waited for
ORDER = {"flaky": 0, "failed": 1, "missing": 2, "passed": 3, "xfailed": 4, "skipped": 5}  # xfailed: known


@dataclass
class CellStats:
    """One test's outcomes over the runs (in run order; a run it did not appear in is left out)."""

    nodeid: str
    outcomes: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    first_problem: tuple[int, str] | None = None  # (run number, first line of the failure message)
    skip_reason: str = ""  # the first skip's reason (a skip always says why)

    def count(self, status: str) -> int:
        return self.outcomes.count(status)

    @property
    def failures(self) -> int:
        return self.count("failed") + self.count("error")

    def kind(self, runs: int) -> str:
        """flaky (more than one outcome), failed, missing (absent from a run), passed or skipped."""
        seen = {"failed" if o == "error" else o for o in self.outcomes}
        if len(seen) > 1:
            return "flaky"
        if "failed" in seen:
            return "failed"
        if len(self.outcomes) < runs:
            return "missing"
        return seen.pop() if seen else "missing"

    def spread(self) -> tuple[float, float, float]:
        s = self.seconds or [0.0]
        return min(s), statistics.median(s), max(s)


def first_line(message: str) -> str:
    """What went wrong, in one line: pytest's exception line (``E   …``) of a traceback, else a verdict's first
    finding (``[phase] N pages …``, without its address list), else the first line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if exc := next((ln[1:].strip() for ln in lines if ln.startswith("E ")), ""):
        return exc
    if finding := next((ln for ln in lines if ln.startswith("[")), ""):
        return finding.split(" (first ")[0]
    return lines[0] if lines else ""


def aggregate(runs: Sequence[Sequence[Outcome]]) -> list[CellStats]:
    """Per-cell statistics over the runs, flaky first, then failed, then the rest (each group by node id)."""
    cells: dict[str, CellStats] = {}
    for number, outcomes in enumerate(runs, 1):
        for o in worst_per_test(outcomes).values():
            cell = cells.setdefault(o.nodeid, CellStats(o.nodeid))
            cell.outcomes.append(o.status)
            cell.seconds.append(o.seconds)
            if o.status in ("failed", "error") and cell.first_problem is None:
                cell.first_problem = (number, first_line(o.message) or o.status)
            if o.status == "skipped" and not cell.skip_reason:
                cell.skip_reason = first_line(o.message)
    return sorted(cells.values(), key=lambda c: (ORDER[c.kind(len(runs))], c.nodeid))


@dataclass(frozen=True)
class Run:
    number: int
    exit_code: int | None  # None: stopped after --run-timeout
    seconds: float
    junit: Path
    log: Path
    outcomes: tuple[Outcome, ...]
    problem: str = ""  # why this run judged nothing (or not everything): exit code, no XML, its last word

    @property
    def usable(self) -> bool:
        return not self.problem


def cell_line(cell: CellStats, runs: int) -> str:
    lo, mid, hi = cell.spread()
    counts = f"{cell.count('passed')}/{runs} passed, {cell.failures} failed"
    if skipped := cell.count("skipped"):
        counts += f", {skipped} skipped"
    if absent := runs - len(cell.outcomes):
        counts += f", absent from {absent}"
    return f"{cell.kind(runs).upper():7} {counts:34} {lo:7.1f} {mid:7.1f} {hi:7.1f} s  {cell.nodeid}"


def report(cells: Sequence[CellStats], runs: Sequence[Run]) -> tuple[list[str], bool]:
    """(lines to print, all good): the per-cell table, each failing cell's first failure, the one-line total."""
    n = len(runs)
    lines = [f"{'':7} {'outcomes over ' + str(n) + ' runs':34} {'min':>7} {'median':>7} {'max':>7}"]
    for cell in cells:
        lines.append(cell_line(cell, n))
        if cell.first_problem and cell.kind(n) in ("flaky", "failed"):
            number, first = cell.first_problem
            lines.append(f"{'':8}run {number}: {first[:200]}")
        elif cell.skip_reason and cell.kind(n) == "skipped":
            lines.append(f"{'':8}skipped: {cell.skip_reason[:200]}")
    lines += [f"run {r.number}: {r.problem} (log {r.log})" for r in runs if not r.usable]
    kinds = [c.kind(n) for c in cells]
    tally = ", ".join(f"{kinds.count(k)} {k}" for k in ORDER if kinds.count(k))
    wall = sum(r.seconds for r in runs)
    good = bool(cells) and all(r.usable for r in runs) and not {"flaky", "failed", "missing"} & set(kinds)
    bad_runs = sum(not r.usable for r in runs)
    lines.append(f"soak: {'OK' if good else 'NOT OK'}: {len(cells)} cells x {n} runs: {tally or 'no cells'}"
                 f"{f'; {bad_runs} unusable runs' if bad_runs else ''}; {wall:.0f} s in all")
    return lines, good


def run_once(number: int, pytest_args: Sequence[str], out: Path, timeout: float) -> Run:
    junit, log_path = out / f"run-{number}.xml", out / f"run-{number}.log"
    args = list(pytest_args)
    if not any(a == "--artifacts" or a.startswith("--artifacts=") for a in args):
        args.append(f"--artifacts={out / f'run-{number}'}")  # each run's evidence kept, not overwritten
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, f"--junitxml={junit}"]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"# {shlex.join(argv)}\n")
        log.flush()
        code = run_bounded(argv, Path.cwd(), log, timeout)
    seconds = time.monotonic() - t0
    outcomes = tuple(parse_junit(junit)) if junit.is_file() else ()
    problem = ""
    if code is None:
        problem = f"no result within {timeout:g} s: stopped"
    elif code not in (PYTEST_OK, PYTEST_FAILED) or not junit.is_file():
        problem = f"pytest exit {code}: {last_word(log_path.read_text(errors='replace'))}"
    return Run(number, code, seconds, junit, log_path, outcomes, problem)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suite.soak", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False,
                                epilog="Every other argument goes to pytest, e.g. tests/test_synthetic.py -k mpn409")
    p.add_argument("-n", "--runs", type=int, required=True, help="how many times to run the selection")
    p.add_argument("--out", type=Path, help="keep JUnit XML, logs and artifacts here (default: a new temp dir)")
    p.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT, help="seconds one run may take")
    a, pytest_args = p.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:  # soak -n 3 -- -n 2 tests: what follows "--" is pytest's (xdist's -n too)
        pytest_args = pytest_args[1:]
    if a.runs < 1:
        p.error("-n must be at least 1")
    out = a.out or Path(tempfile.mkdtemp(prefix="holecheck-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"soak: {a.runs} runs of pytest {shlex.join(pytest_args)}; JUnit XML, logs, artifacts in {out}", flush=True)
    runs: list[Run] = []
    for number in range(1, a.runs + 1):
        run = run_once(number, pytest_args, out, a.run_timeout)
        runs.append(run)
        merged = worst_per_test(run.outcomes).values()
        tally = ", ".join(f"{n} {s}" for s in RANK if (n := sum(o.status == s for o in merged)))
        print(f"run {number}/{a.runs}: exit {run.exit_code}, {tally or 'no test cases'} in {run.seconds:.0f} s"
              + (f": {run.problem}" if run.problem else ""), flush=True)
    lines, good = report(aggregate([r.outcomes for r in runs]), runs)
    print("\n".join(lines))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
