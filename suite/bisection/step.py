"""One bisection step: the selected tests run against one kernel in a pytest subprocess of the project
(``Runner``), and the session judged from pytest's exit code and JUnit XML (``classify``): good, bad, skip (the
kernel could not be judged) or abort (the suite is broken). ``suite.bisect`` (Debian packages) and
``suite.bisection.tree`` (``git bisect run``) both step with it.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from ..procs import stop_group
from ..reports.outcomes import BadJUnit, parse_junit_text, worst_per_test
from ..reports.outcomes import Outcome as Case

PROJECT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT = 3600.0  # one pytest session: fetch + boot (~5 s under TCG) + a small -k selection; minutes
KILL_GRACE = 60.0  # after SIGTERM the session unwinds (VM, THP knobs, cgroups) before SIGKILL
MARKEXPR = "host and not bench"
# pytest's exit codes (pytest.ExitCode), spelt out: the child is another process.
PYTEST_OK, PYTEST_FAILED, PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE, PYTEST_NO_TESTS = range(6)


class StepVerdict(StrEnum):
    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"  # the kernel could not be judged: try a neighbour
    ABORT = "abort"  # the suite (not the kernel) is broken: stop bisecting


# --- judging one pytest session -------------------------------------------------------------------------------------

def parse_junit(text: str) -> list[Case]:
    """The test cases of a step's JUnit XML, one per test at its worst (``outcomes.worst_per_test``). A SetupError
    raised inside a test is the environment failing, not the kernel: an error, not a verdict."""
    cases = list(worst_per_test(parse_junit_text(text)).values())
    for c in cases:
        if c.status == "failed" and re.match(r"(suite\.errors\.)?SetupError\b", c.summary):
            c.status = "error"
    return cases


@dataclass(frozen=True)
class Outcome:
    """One step's classification and the facts behind it."""

    verdict: StepVerdict
    reason: str  # "2 failed: a, b; 2 passed", "boot/setup failed: …"
    exit_code: int | None  # None: no exit (timed out, killed by us)
    cases: tuple[Case, ...] = ()

    def count(self, outcome: str) -> int:
        return sum(c.status == outcome for c in self.cases)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.cases if c.status == "failed"]


def _names(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def classify(exit_code: int | None, junit: str | None, note: str = "") -> Outcome:
    """Good, bad, skip or abort from pytest's exit code and JUnit XML text (``note``: why there is no exit code,
    or the session's own last word, e.g. the one-line reason a kernel did not boot)."""
    suffix = f": {note}" if note else ""
    if exit_code is None:
        return Outcome(StepVerdict.SKIP, f"no result{suffix}", None)
    if exit_code == PYTEST_USAGE:  # conftest's pytest.exit(returncode=4): the kernel did not boot or lacks config
        return Outcome(StepVerdict.SKIP, f"boot/setup failed{suffix}", exit_code)
    if exit_code == PYTEST_NO_TESTS:
        return Outcome(StepVerdict.ABORT, "no tests collected: -k/-m select nothing", exit_code)
    if exit_code in (PYTEST_INTERRUPTED, PYTEST_INTERNAL):
        what = "interrupted (a collection error, or Ctrl-C)" if exit_code == PYTEST_INTERRUPTED else "internal error"
        return Outcome(StepVerdict.ABORT, f"pytest {what}, exit {exit_code}{suffix}", exit_code)
    if exit_code not in (PYTEST_OK, PYTEST_FAILED):
        return Outcome(StepVerdict.SKIP, f"pytest died (exit {exit_code}){suffix}", exit_code)
    if not junit:
        return Outcome(StepVerdict.SKIP, f"exit {exit_code} but no JUnit XML{suffix}", exit_code)
    try:
        cases = tuple(parse_junit(junit))
    except BadJUnit as exc:
        return Outcome(StepVerdict.SKIP, f"unreadable JUnit XML ({exc})", exit_code)
    out = Outcome(StepVerdict.SKIP, "", exit_code, cases)
    passed, errors, skipped = out.count("passed"), out.count("error"), out.count("skipped")
    err = "error" if errors == 1 else "errors"
    tail = "; ".join(f"{n} {w}" for n, w in ((passed, "passed"), (errors, err), (skipped, "skipped"),
                                              (out.count("xfailed"), "known findings (xfail)")) if n)
    if failed := out.failed:
        reason = f"{len(failed)} failed: {_names(failed)}" + (f"; {tail}" if tail else "")
        return Outcome(StepVerdict.BAD, reason, exit_code, cases)
    if errors:  # errors and no failure: fixtures could not set up, so nothing was judged
        first = next(c for c in cases if c.status == "error").summary
        return Outcome(StepVerdict.SKIP, f"{tail}, no verdict: {first[:160]}", exit_code, cases)
    if not passed:
        return Outcome(StepVerdict.SKIP, f"no test ran ({tail or 'no test cases'})", exit_code, cases)
    return Outcome(StepVerdict.GOOD, tail, exit_code, cases)


def last_word(log_text: str) -> str:
    """The session's one-line reason for stopping (``holecheck: …`` from pytest.exit), else its last line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if m := re.search(r"holecheck: (.+?)(?:\s*!+)?$", ln):
            return m[1]
    return lines[-1].strip("=! ") if lines else ""


# --- running one step -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runner:
    """Runs the selected tests against one kernel in a pytest subprocess of the project."""

    expr: str
    timeout: float = STEP_TIMEOUT
    extra: tuple[str, ...] = ()
    project: Path = PROJECT

    def argv(self, kernel: str, junit: Path, artifacts: Path) -> list[str]:
        # The venv's interpreter with -m: the project dir (cwd) comes first on sys.path, so a worktree runs its own
        # suite even though the venv's editable install points at another checkout.
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests", f"--kernel={kernel}",
                "-k", self.expr, "-m", MARKEXPR, f"--junitxml={junit}", "-q", f"--artifacts={artifacts}",
                *self.extra]

    def run(self, kernel: str, workdir: Path, name: str) -> tuple[Outcome, float]:
        """Run and classify; pytest's output goes to ``workdir/name.log``, artifacts to ``workdir/name/``."""
        junit, log_path, artifacts = workdir / f"{name}.xml", workdir / f"{name}.log", workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        junit.unlink(missing_ok=True)
        t0 = time.monotonic()
        argv = self.argv(kernel, junit, artifacts)
        with open(log_path, "w") as log:
            log.write(f"# {shlex.join(argv)}\n")
            log.flush()
            code = run_bounded(argv, self.project, log, self.timeout)
        seconds = time.monotonic() - t0
        note = (f"no result within {self.timeout:g} s (--step-timeout); session stopped, log {log_path}"
                if code is None else last_word(log_path.read_text(errors="replace")))
        xml = junit.read_text(errors="replace") if junit.exists() else None
        # The session's last word only where the XML cannot explain the step (no exit, setup failure, no XML).
        return classify(code, xml, note if code not in (PYTEST_OK, PYTEST_FAILED) or xml is None else ""), seconds


def run_bounded(argv: list[str], cwd: Path, log: TextIO, timeout: float) -> int | None:
    """Run ``argv`` in its own process group; on timeout (→ None) or Ctrl-C, SIGTERM the group (the session
    unwinds: VM stopped, THP knobs and cgroups restored), then SIGKILL after KILL_GRACE."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc, KILL_GRACE)


# --- what a step's failures say (the JSON logs, the summary) --------------------------------------------------------

def failure_report(outcome: Outcome) -> dict[str, dict[str, str]]:
    return {c.name: {"summary": c.summary, "text": c.message or c.summary}
            for c in outcome.cases if c.status == "failed"}


def failure_lines(failure: dict[str, str], limit: int = 4, width: int = 200) -> list[str]:
    """A failure in a few lines: a holecheck verdict (``pytest.fail``: the text is the verdict itself) by its
    header and findings, anything else (a traceback) by JUnit's one-line message."""
    if failure["summary"].startswith("Failed: "):
        lines = [ln.strip() for ln in failure["text"].splitlines() if not ln.strip().startswith("artifacts:")]
    else:
        lines = [failure["summary"]]
    return [ln[:width] + ("…" if len(ln) > width else "") for ln in lines[:limit]]
