"""Runs a synthetic scenario next to the kernel under test and judges every page: returns a ``Verdict``.

The model the runner keeps (which pages are placed, which must be write-protected) is the expectation; the
helper's fault reports and the pagemap oracle are the observation. Every step is followed by a pagemap
snapshot, so a finding names the first phase at which it showed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import memcg, oracle, pagemap, qemu_runner, shrinker, thp
from .errors import StallError
from .oracle import runs
from .pagemap import PAGE, PageStates
from .scenario import OPS, Scenario, Step
from .uffd import Faults, UffdHelper
from .verdict import Finding, PhaseRecord, Verdict

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    trigger: str | None = None  # overrides the scenario's shrinker trigger
    timeout: float = 10.0  # per helper command / destination read: longer means a stall
    artifacts: Path | None = None
    qemu: str = "qemu-system-x86_64"  # for the real-QEMU kinds
    accel: str = "auto"


@contextlib.contextmanager
def _scope(trigger: str) -> Iterator[memcg.Memcg | None]:
    if trigger == "drop_caches" or (trigger == "auto" and memcg.available() is None):
        yield None
    else:
        with memcg.scope("synthetic") as cg:
            yield cg


def run(scenario: Scenario, options: RunOptions | None = None) -> Verdict:
    """Run any scenario where this process runs (the host, or the agent inside L1)."""
    opts = options or RunOptions()
    if not scenario.synthetic:
        return qemu_runner.run(scenario, qemu_runner.QemuOptions(
            qemu=opts.qemu, accel=opts.accel, trigger=opts.trigger, timeout=opts.timeout, artifacts=opts.artifacts))
    trigger = opts.trigger or scenario.trigger
    verdict = Verdict(scenario=f"{scenario.kind}[{scenario.name}-{scenario.thp.id}-{scenario.fill.id}]",
                      kernel=os.uname().release)
    t0 = time.monotonic()
    with thp.applied(scenario.thp), _scope(trigger) as cg, \
            UffdHelper(argv_prefix=cg.wrap([]) if cg else None, timeout=opts.timeout) as helper:
        SyntheticRun(scenario, helper, cg, trigger, verdict, opts.artifacts).execute()
    verdict.seconds = round(time.monotonic() - t0, 3)
    log.info("%s", verdict.summary())
    return verdict


class SyntheticRun:
    def __init__(self, scenario: Scenario, helper: UffdHelper, cg: memcg.Memcg | None, trigger: str,
                 verdict: Verdict, artifacts: Path | None = None) -> None:
        self.s, self.h, self.cg, self.trigger, self.v = scenario, helper, cg, trigger, verdict
        self.artifacts = artifacts
        self.around_shrinks: dict[str, PageStates] = {}
        n = scenario.npages
        self.placed = np.zeros(n, dtype=bool)  # known placed: present once, not discarded on purpose
        self.wp_expected = np.zeros(n, dtype=bool)  # must be write-protected
        self.reported_holes = np.zeros(n, dtype=bool)
        self.nonzero = np.zeros(n, dtype=bool)  # content the model expects to be non-zero (place, touch write)
        self.wp_registered = False
        self.prev: PageStates | None = None

    # --- driving -------------------------------------------------------------------------------------------

    def execute(self) -> None:
        try:
            self.walk()
        finally:
            self.save_page_states()

    def save_page_states(self) -> None:
        """On failure: the oracle's snapshots around each shrink and after the last step, with the model."""
        if self.artifacts is None or self.v.ok:
            return
        states = {**self.around_shrinks, **({"last": self.prev} if self.prev is not None else {})}
        for name, st in states.items():
            pagemap.save(self.artifacts / f"pagemap-{name}.npz", st, placed=self.placed,
                         wp_expected=self.wp_expected)
        (self.artifacts / "scenario.json").write_text(self.s.to_json())

    def walk(self) -> None:
        for step in self.s.steps:
            t = time.monotonic()
            sel = self.s.selector(step.pages)
            before = self.prev
            try:
                faults = self.perform(step, sel)
            except StallError as exc:
                self.v.findings.append(Finding.of("stall", step.phase, [], detail=str(exc)))
                return  # the helper sits in a fault: nothing further can be trusted
            after = self.snapshot()
            self.judge(step, sel, before, after, faults)
            self.v.phases.append(PhaseRecord(step.phase, after.counts(), round(time.monotonic() - t, 4)))
            self.prev = after
        if self.wp_registered and not any(p.counts["uffd_wp"] for p in self.v.phases):
            self.v.notes.append("kernel reported no uffd-wp bit in pagemap: judged by WP faults alone")

    def snapshot(self, with_thp: bool = False) -> PageStates:
        assert self.h.addr is not None
        return pagemap.snapshot(self.h.pid, self.h.addr, self.s.npages * PAGE, with_thp=with_thp)

    def each_run(self, sel: np.ndarray, call) -> Faults:
        """Apply ``call(off, length)`` to every run of selected pages; merge the faults they reported."""
        missing: list[int] = []
        wp: list[int] = []
        for first, count in runs(sel):
            f = call(first * PAGE, count * PAGE)
            if f is not None:
                missing += f.missing
                wp += f.wp
        return Faults(missing, wp)

    def perform(self, step: Step, sel: np.ndarray) -> Faults:
        h, op, none = self.h, step.op, Faults([], [])
        if op == "map":
            h.map(self.s.npages * PAGE)
            if step.arg == "hugepage":
                h.madvise("hugepage", 0, self.s.npages * PAGE)
            self.prev = self.snapshot()
            return none
        if op == "place":
            self.nonzero |= sel
            return self.each_run(sel, h.place)
        if op == "nohugepage":
            return h.madvise("nohugepage", 0, self.s.npages * PAGE)
        if op in ("discard", "sabotage-punch"):
            return self.each_run(sel, lambda o, n: h.madvise("dontneed", o, n))
        if op == "register":
            h.register(step.arg)
            self.wp_registered = "wp" in step.arg
            return none
        if op in ("wp", "sabotage-unprotect"):
            on = op == "wp" and step.arg == "1"
            if op == "wp" and on:  # like QEMU's snapshot: populate first, so every page is present to protect
                h.madvise("populate_read", 0, self.s.npages * PAGE)
            return self.each_run(sel, lambda o, n: h.wp(o, n, on))
        if op == "clear-soft-dirty":
            Path(f"/proc/{h.pid}/clear_refs").write_text("4")
            return none
        if op == "shrink":
            self.shrink(step)
            return none
        if op == "touch":
            if step.arg == "write":
                self.nonzero |= sel
            return self.each_run(sel, lambda o, n: h.touch(step.arg, o, n))
        if op == "verify":
            bad: list[int] = []

            def verify(o: int, n: int) -> Faults:
                mismatch, f = h.verify(o, n)
                bad.extend(mismatch)
                return f

            faults = self.each_run(sel, verify)
            if bad:
                self.v.findings.append(Finding.of("content", step.phase, [self.addr(i) for i in bad]))
            return faults
        raise AssertionError(f"op {op} has no implementation")

    def shrink(self, step: Step) -> None:
        thp.verify(self.s.thp)
        before = self.snapshot(with_thp=True)
        result = shrinker.fire(self.trigger, self.cg)
        after = self.snapshot(with_thp=True)
        self.around_shrinks[f"before-{step.phase}"] = before
        self.around_shrinks[f"after-{step.phase}"] = after
        shrinker.judge_split(self.v, step.phase, before, after, self.nonzero, result)

    # --- judging -------------------------------------------------------------------------------------------

    def addr(self, index: int) -> int:
        assert self.h.addr is not None
        return self.h.addr + index * PAGE

    def report(self, kind: str, step: Step, indices: np.ndarray | list[int], detail: str = "") -> None:
        if len(indices):
            self.v.findings.append(Finding.of(kind, step.phase, [self.addr(int(i)) for i in indices], detail=detail))

    def judge(self, step: Step, sel: np.ndarray, before: PageStates | None, after: PageStates,
              faults: Faults) -> None:
        if step.op == "discard":  # on purpose: these pages will be re-sent (re-supplied on MISSING faults)
            self.placed &= ~sel
        # A MISSING fault on a placed page: QEMU thinks it has the page and never asks the source again.
        placed_faults = [i for i in faults.missing if self.placed[i]]
        self.report("missing-fault", step, placed_faults)
        holes = self.placed & after.hole & ~self.reported_holes
        self.reported_holes |= holes
        self.report("hole", step, np.nonzero(holes)[0])
        self.placed |= after.present

        if step.op == "wp":
            self.wp_expected = self.wp_expected | sel if step.arg == "1" else self.wp_expected & ~sel
        if step.op == "touch" and step.arg == "write":
            trapped = np.zeros_like(sel)
            trapped[faults.wp] = True
            self.report("no-wp-fault", step, np.nonzero(sel & self.wp_expected & ~trapped)[0])
            self.wp_expected &= ~sel  # the handler un-protected what it trapped, as QEMU does

        if before is not None and OPS[step.op]:  # this step must not clear protection bits
            keep = ~sel if step.op == "discard" else np.ones_like(sel)
            self.report("lost-uffd-wp", step, oracle.lost_uffd_wp(before, after, self.wp_expected & keep))
            self.report("lost-soft-dirty", step, np.nonzero(before.soft_dirty & ~after.soft_dirty & keep)[0])
