"""Bisect kernels for the first version whose holecheck verdict changes: Debian packages, or your git tree.

Debian packages (``debian`` subcommand)::

    python -m suite.bisect debian --good debian:6.12.95 --bad debian:6.12.43 -k "snapshot_style and mpn409"

The candidates are Debian's generic-flavour (``-amd64``) packages between the two ends, one build per upstream
version (the build ``--kernel=debian:X.Y.Z`` would pick: bookworm-backports before trixie, then the newest
rebuild), oldest first. Versions Debian still lists but whose packages the archive no longer carries
(``kernels.debian.unfetchable``) are left out up front: the plan says how many, and which range a change among
them can only be located to. ``--good``/``--bad`` say what the suite's verdict is at each end; which end is older
decides what is searched, as with git's old/new terms:

- good older than bad: a regression → ``first bad: debian:…``;
- bad older than good: a fix → ``first good: debian:…``. ``--first-good`` states that intent, and is checked:
  with it, a good end older than the bad end is an error instead of a silent regression search.

Both ends are run first (the good end must pass and the bad end fail, else nothing is bisected), then a binary
search, one pytest subprocess per step::

    pytest -p no:cacheprovider tests --kernel=debian:ABI -k EXPR -m "host and not bench" --junitxml=… -q

Each step is classified from pytest's exit code and its JUnit XML: every selected test that ran passed → good;
at least one test failed → bad (a verdict); the kernel did not boot or the session could not set up (exit 4),
only errors, nothing ran, or no result within ``--step-timeout`` → skip (not a verdict: like ``git bisect
skip``, the candidate nearest the midpoint that is not skipped is tried instead). Interrupted or internal-error
sessions, or a -k that selects nothing, abort the bisection: those are the suite's problems, not the kernel's.
While a step runs, the kernels the next step may need (both possible midpoints) are fetched in the background
(``suite.bisection.prefetch``; never while the step's own kernel is being fetched, cancelled when not needed and
on exit).
Every step prints one line; the log of steps is ``.holecheck/bisect/<time>.json`` and each step's pytest output,
JUnit XML and artifacts are kept in ``.holecheck/bisect/<time>/``. ``--dry-run`` prints the candidates only.
Exit status: 0 found; 1 an end does not hold its verdict; 2 bad input or the bisection aborted; 3 only skipped
kernels are left between the last old and the first new one (all of them are named).

Your kernel tree (``run-tree`` subcommand: one step of ``git bisect run``, see ``suite.bisection.tree``)::

    cd linux
    git bisect start BAD GOOD
    git bisect run /path/to/holecheck/.venv/bin/python -m suite.bisect run-tree . -k postcopy_style
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kernels import versions
from suite.errors import SetupError

from .bisection.prefetch import Prefetcher
from .bisection.step import PROJECT, STEP_TIMEOUT, Outcome, Runner, StepVerdict, failure_lines, failure_report
from .bisection.tree import EXIT_ABORT, run_tree
from .procs import sigterm_unwinds

# kernels.* is imported where it is used, as elsewhere in suite/: kernels depends on suite, not the other way round.


# --- Debian candidates ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One Debian kernel package to bisect over (generic flavour)."""

    abi: str  # "6.12.57+deb12", "6.12.90+deb12.1", "6.1.0-56"

    @property
    def upstream(self) -> str:
        """"6.12.57" (new naming); for bookworm's 6.1 ABIs ("6.1.0-56") the ABI itself: no upstream in the name."""
        return versions.upstream(self.abi)

    @property
    def spec(self) -> str:
        """What pytest gets: the exact ABI, so a step runs the very build the list chose."""
        return f"debian:{self.abi}"

    @property
    def label(self) -> str:
        return f"debian:{self.upstream} ({self.abi}-{versions.FLAVOURS['']})"


def generic_abis(specs: Sequence[str]) -> list[str]:
    """The generic-flavour ABIs of ``kernels.debian.abis()`` (the cloud flavour oopses under TCG)."""
    return [v for v in specs if not v.endswith("-cloud")]


def preferred_builds(abis: Sequence[str]) -> list[Candidate]:
    """One build per upstream version, chosen by ``kernels.versions.preference``, ordered by upstream version."""
    best: dict[str, str] = {}
    for abi in abis:
        up = Candidate(abi).upstream
        if up not in best or versions.preference(abi) > versions.preference(best[up]):
            best[up] = abi
    return sorted((Candidate(a) for a in best.values()), key=lambda c: versions.abi_key(c.upstream))


def resolve_endpoint(text: str, abis: Sequence[str], unfetchable: Mapping[str, str] | None = None) -> Candidate:
    """``debian:6.12.95`` (or ``6.12.95``, ``6.12.90+deb12.1``, ``newest-6.1``) → the package it names, among
    those that can be fetched (``unfetchable``: ABI → why not, from ``kernels.debian.unfetchable``)."""
    value = text.removeprefix("debian:")
    spec = versions.parse_spec(value)
    if spec.flavour != versions.FLAVOURS[""]:
        raise SetupError(f"{text}: bisection runs the generic flavour only (the cloud flavour oopses under TCG)")
    gone = unfetchable or {}
    chosen = versions.select(spec, [versions.package_name(a) for a in abis if a not in gone])
    if chosen is None:
        if listed := versions.select(spec, [versions.package_name(a) for a in abis]):
            abi = versions.split_package(listed)[0]
            raise SetupError(f"{text}: {abi} is listed but not fetchable ({gone[abi]}); choose an end that is "
                             "(python -m kernels.debian list marks them)")
        raise SetupError(f"{text}: no such Debian kernel package (python -m kernels.debian list shows them)")
    return Candidate(versions.split_package(chosen)[0])


def candidate_range(abis: Sequence[str], a: Candidate, b: Candidate) -> list[Candidate]:
    """The ends (as given) and every preferred build strictly between them, oldest first."""
    lo, hi = sorted((a, b), key=lambda c: versions.abi_key(c.upstream))
    if lo.upstream == hi.upstream:
        raise SetupError(f"debian:{a.abi} and debian:{b.abi} are the same upstream version: nothing to bisect")
    lo_key, hi_key = versions.abi_key(lo.upstream), versions.abi_key(hi.upstream)
    between = [c for c in preferred_builds(abis) if lo_key < versions.abi_key(c.upstream) < hi_key]
    return [lo, *between, hi]


def left_out(abis: Sequence[str], candidates: Sequence[Candidate],
             unfetchable: Mapping[str, str]) -> list[tuple[list[Candidate], Candidate, Candidate]]:
    """The upstream versions between the ends that only unfetchable builds carry, as gaps: (the versions, the
    fetchable candidate before them, the one after). A change inside a gap is found only up to that range."""
    lo_key, hi_key = versions.abi_key(candidates[0].upstream), versions.abi_key(candidates[-1].upstream)
    kept = {c.upstream for c in candidates}
    dropped = [c for c in preferred_builds([a for a in abis if a in unfetchable])
               if lo_key < versions.abi_key(c.upstream) < hi_key and c.upstream not in kept]
    gaps: list[tuple[list[Candidate], Candidate, Candidate]] = []
    for c in dropped:
        key = versions.abi_key(c.upstream)
        before = max((k for k in candidates if versions.abi_key(k.upstream) < key),
                     key=lambda k: versions.abi_key(k.upstream))
        if gaps and gaps[-1][1] == before:
            gaps[-1][0].append(c)
        else:
            after = min((k for k in candidates if versions.abi_key(k.upstream) > key),
                        key=lambda k: versions.abi_key(k.upstream))
            gaps.append(([c], before, after))
    return gaps


# --- the binary search ----------------------------------------------------------------------------------------------

@dataclass
class Search:
    """Find the first index in the *new* state (git's terms) in a list whose index 0 is known to be old and whose
    last index is known to be new. Skipped indices are never proposed again; the next proposal is the untested
    index nearest the midpoint (the lower one on a tie)."""

    size: int
    old: int = 0
    new: int = -1
    skipped: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError("a search needs two ends")
        if self.new < 0:
            self.new = self.size - 1

    def untested(self) -> list[int]:
        return [i for i in range(self.old + 1, self.new) if i not in self.skipped]

    def next(self) -> int | None:
        """The index to test next, or None when the search is over."""
        left = self.untested()
        mid = (self.old + self.new) / 2
        return min(left, key=lambda i: (abs(i - mid), i)) if left else None

    def record(self, index: int, state: str) -> None:
        """``state``: "old", "new" or "skip"."""
        if not self.old < index < self.new:
            raise ValueError(f"index {index} outside the open range ({self.old}, {self.new})")
        if state == "skip":
            self.skipped.add(index)
        elif state == "old":
            self.old = index
        elif state == "new":
            self.new = index
        else:
            raise ValueError(f"state {state!r}: expected old, new or skip")

    def steps_left(self) -> int:
        """Tests still needed if none is skipped: ceil(log2(untested + 1))."""
        return math.ceil(math.log2(len(self.untested()) + 1))

    def after(self, index: int) -> list[int]:
        """What ``next`` proposes once ``index`` is tested: if it turns out new, then if old (fetched ahead)."""
        out = []
        for state in ("new", "old"):
            then = Search(self.size, self.old, self.new, set(self.skipped))
            then.record(index, state)
            if (i := then.next()) is not None and i not in out:
                out.append(i)
        return out

    def suspects(self) -> list[int]:
        """Once over: the indices that may be the first new one (more than one only when skips are in the way)."""
        return list(range(self.old + 1, self.new + 1))


# --- the Debian bisection -------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One pytest session in the log."""

    role: str  # "old end (expected bad)", "new end (expected good)", "step 2/4"
    candidate: str  # the label
    spec: str
    verdict: str
    reason: str
    exit_code: int | None
    seconds: float
    failures: dict[str, dict[str, str]]  # failed test → {"summary": JUnit message line, "text": the verdict}
    kernel: str = ""  # how the kernel got there: "cached", "prefetched in 21 s", "fetched in 30 s", …


@dataclass
class Plan:
    """What a Debian bisection searches: candidates oldest first; which verdict the old end has."""

    candidates: list[Candidate]
    old_verdict: StepVerdict  # GOOD: a regression (find the first bad); BAD: a fix (find the first good)
    # upstream versions between the ends left out up front (only unfetchable builds): (versions, before, after)
    gaps: list[tuple[list[Candidate], Candidate, Candidate]] = field(default_factory=list)
    why: str = ""  # why they cannot be fetched

    def notes(self) -> list[str]:
        """What the plan leaves out and what that leaves unresolved: one line per gap."""
        if not self.gaps:
            return []
        n = sum(len(g[0]) for g in self.gaps)
        lines = [f"left out {n} version{'s' if n != 1 else ''} Debian lists but cannot be fetched ({self.why}):"]
        for dropped, before, after in self.gaps:
            lines.append(f"  {dropped[0].upstream} … {dropped[-1].upstream} ({len(dropped)}): a change there is "
                         f"located only to {before.upstream} … {after.upstream}")
        return lines

    @property
    def new_verdict(self) -> StepVerdict:
        return StepVerdict.BAD if self.old_verdict is StepVerdict.GOOD else StepVerdict.GOOD

    @property
    def looking_for(self) -> str:
        return f"first {self.new_verdict}"


def make_plan(abis: Sequence[str], good: str, bad: str, first_good: bool,
              unfetchable: Mapping[str, str] | None = None) -> Plan:
    """Resolve the ends and order the candidates, leaving out what cannot be fetched (``unfetchable``: ABI → why);
    the ends' version order decides regression vs fix."""
    gone = unfetchable or {}
    g, b = resolve_endpoint(good, abis, gone), resolve_endpoint(bad, abis, gone)
    fetchable = [a for a in abis if a not in gone]
    candidates = candidate_range(fetchable, g, b)
    fix = versions.abi_key(g.upstream) > versions.abi_key(b.upstream)
    if first_good and not fix:
        raise SetupError(f"--first-good looks for a fix, so the good end must be the newer one; here {good} is older "
                         f"than {bad} (for a regression, drop --first-good)")
    gaps = left_out(abis, candidates, gone)
    why = "; ".join(sorted({gone[c.abi] for dropped, _, _ in gaps for c in dropped}))
    return Plan(candidates, StepVerdict.BAD if fix else StepVerdict.GOOD, gaps, why)


class Bisection:
    """Runs a Plan: both ends first, then the search; prints one line per step and keeps the JSON log."""

    def __init__(self, plan: Plan, runner: Runner, log_path: Path, args: dict[str, object],
                 prefetch: Prefetcher | None = None) -> None:
        self.plan, self.runner, self.log_path, self.args = plan, runner, log_path, args
        self.workdir = log_path.with_suffix("")
        self.prefetch = prefetch  # fetches the kernels that may come next while a step runs
        self.steps: list[Step] = []
        self.result: dict[str, object] = {}

    def _run(self, role: str, c: Candidate, upcoming: Sequence[int] = ()) -> Outcome:
        """One step; ``upcoming``: the candidates that may come next, fetched meanwhile."""
        kernel = self.prefetch.step(c.abi, [self.plan.candidates[i].abi for i in upcoming]) if self.prefetch else ""
        outcome, seconds = self.runner.run(c.spec, self.workdir, c.abi)
        failures = failure_report(outcome)
        self.steps.append(Step(role, c.label, c.spec, outcome.verdict.value, outcome.reason, outcome.exit_code,
                               round(seconds, 1), failures, kernel))
        print(f"{role}: {c.label} → {outcome.verdict} ({outcome.reason}) in {seconds:.0f} s"
              + (f" (kernel {kernel})" if kernel else ""), flush=True)
        self._save()
        return outcome

    def _save(self) -> None:
        data = {"args": self.args, "candidates": [c.spec for c in self.plan.candidates], "left_out": self.plan.notes(),
                "looking_for": self.plan.looking_for, "steps": [asdict(s) for s in self.steps], "result": self.result}
        if self.prefetch:  # what was fetched ahead (seconds each), and what was stopped as no longer needed
            data["prefetch"] = {"fetched": {a: round(t, 1) for a, t in self.prefetch.fetched.items()},
                                "cancelled": self.prefetch.cancelled}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        tmp.rename(self.log_path)

    def _finish(self, code: int, **result: object) -> int:
        self.result = {"exit": code, **result}
        self._save()
        print(f"log: {self.log_path}")
        return code

    def run(self) -> int:
        plan, cands = self.plan, self.plan.candidates
        search = Search(len(cands))
        print(f"bisecting {len(cands)} Debian kernels, {cands[0].label} … {cands[-1].label}, for the "
              f"{plan.looking_for} (old end expected {plan.old_verdict}, new end {plan.new_verdict}): both ends, then "
              f"~{search.steps_left()} steps", flush=True)
        for line in plan.notes():
            print(line, flush=True)
        first = search.next()
        ends = (("old end", cands[0], plan.old_verdict, [search.size - 1, first]),
                ("new end", cands[-1], plan.new_verdict, [first, *search.after(first)] if first is not None else []))
        for role, c, want, upcoming in ends:
            got = self._run(f"{role} (expected {want})", c, [i for i in upcoming if i is not None])
            if got.verdict is not want:
                what = ("could not be judged" if got.verdict in (StepVerdict.SKIP, StepVerdict.ABORT)
                        else f"is {got.verdict}")
                print(f"cannot bisect: {c.spec} was given as {want} but {what}; nothing bisected")
                return self._finish(1, error=f"{c.spec} expected {want}, got {got.verdict}: {got.reason}")
        done = 0
        while (i := search.next()) is not None:
            done += 1
            got = self._run(f"step {done}/{done - 1 + search.steps_left()}", cands[i], search.after(i))
            if got.verdict is StepVerdict.ABORT:
                print(f"bisection aborted: {got.reason}")
                return self._finish(2, error=got.reason)
            search.record(i, {plan.old_verdict: "old", plan.new_verdict: "new"}.get(got.verdict, "skip"))
        suspects = [cands[i] for i in search.suspects()]
        last_old = cands[search.old]
        # versions left out up front that lie where the change is: it may be in any of them too
        unfetched = [c for dropped, before, after in plan.gaps
                     if cands.index(before) >= search.old and cands.index(after) <= search.new for c in dropped]
        if len(suspects) == 1 and not unfetched:
            print(f"{plan.looking_for}: {suspects[0].label}; last {plan.old_verdict}: {last_old.label}")
            code, result = 0, {"found": suspects[0].spec, "last_old": last_old.spec}
        elif not unfetched:
            print(f"only skipped kernels left: the {plan.looking_for} is one of "
                  f"{', '.join(c.spec for c in suspects)} (last {plan.old_verdict}: {last_old.label})")
            code, result = 3, {"suspects": [c.spec for c in suspects], "last_old": last_old.spec}
        else:
            print(f"the {plan.looking_for} is one of {', '.join(c.spec for c in suspects)} or of the "
                  f"{len(unfetched)} versions before that cannot be fetched ({unfetched[0].upstream} … "
                  f"{unfetched[-1].upstream}) (last {plan.old_verdict}: {last_old.label})")
            code, result = 3, {"suspects": [c.spec for c in suspects], "last_old": last_old.spec,
                               "unfetchable": [c.spec for c in unfetched]}
        self._show_failures(last_old if plan.old_verdict is StepVerdict.BAD else suspects[-1])
        return self._finish(code, **result)

    def _show_failures(self, c: Candidate) -> None:
        """The verdicts on the bad side of the change: what the change is about, without opening the log."""
        step = next((s for s in reversed(self.steps) if s.spec == c.spec and s.failures), None)
        for name, failure in (step.failures.items() if step else ()):
            print(f"  {c.spec} {name}:")
            for ln in failure_lines(failure):
                print(f"    {ln}")


def bisect_debian(args: argparse.Namespace) -> int:
    from kernels import debian

    index = debian.available()
    plan = make_plan(generic_abis(debian.abis(index)), args.good, args.bad, args.first_good, debian.unfetchable(index))
    if args.dry_run:
        print("\n".join([c.label for c in plan.candidates] + plan.notes()))
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = PROJECT / ".holecheck" / "bisect" / f"{stamp}.json"
    runner = Runner(args.k, args.step_timeout, tuple(shlex.split(args.pytest_args)))
    record = {"good": args.good, "bad": args.bad, "k": args.k, "first_good": args.first_good,
              "pytest_args": args.pytest_args, "step_timeout": args.step_timeout}
    with Prefetcher(log_path.with_suffix("")) as prefetch:  # cancelled on return and on Ctrl-C
        return Bisection(plan, runner, log_path, record, prefetch).run()


# --- CLI -----------------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m suite.bisect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-k", required=True, metavar="EXPR", help="pytest -k: the tests that judge each kernel")
    common.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT, metavar="S",
                        help=f"seconds one pytest session may take (default {STEP_TIMEOUT:g}); beyond: skip")
    common.add_argument("--pytest-args", default="", metavar="ARGS", help='more pytest arguments, e.g. "--accel=tcg"')
    common.add_argument("--first-good", action="store_true",
                        help="looking for a fix: the newer end passes, the older end fails")
    deb = sub.add_parser("debian", parents=[common], help="bisect Debian's kernel packages")
    deb.add_argument("--good", required=True, metavar="debian:VERSION", help="the end whose tests pass")
    deb.add_argument("--bad", required=True, metavar="debian:VERSION", help="the end whose tests fail")
    deb.add_argument("--dry-run", action="store_true", help="print the candidates and stop")
    tree = sub.add_parser("run-tree", parents=[common], help="one git bisect run step on a Linux tree")
    tree.add_argument("tree", metavar="LINUX_TREE")
    tree.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sigterm_unwinds()  # a killed bisection stops its step's session (and that session's VM) on the way out
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code and argv[:1] == ["run-tree"]:  # argparse's exit 2 would read as "bad" to git bisect run
            return EXIT_ABORT
        raise
    if args.command == "run-tree":
        try:
            runner = Runner(args.k, args.step_timeout, tuple(shlex.split(args.pytest_args)))
            return run_tree(Path(args.tree), runner, args.jobs, args.first_good)
        except KeyboardInterrupt:
            return EXIT_ABORT
        except Exception as exc:  # any exit 1 would tell git "bad": a crash of ours must abort the bisection
            print(f"run-tree: {type(exc).__name__}: {exc} → exit {EXIT_ABORT} (abort)", file=sys.stderr)
            return EXIT_ABORT
    try:
        return bisect_debian(args)
    except SetupError as exc:
        print(f"holecheck: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
