"""The page ledger: what the oracle has seen of one region of memory over a run, and the findings it made.

Both runners keep one ``Ledger`` per region they judge (the synthetic helper's region; each QEMU's RAM). A ledger
knows which pages are *placed* (present at some snapshot and not meant to change), which holes it already
reported, its last snapshot and those around each shrink. ``observe`` turns a snapshot into hole findings,
``shrink`` brackets one firing of the shrinker with snapshots and judges the split, ``report`` names pages as
addresses, and ``save_page_states`` leaves the snapshots behind for ``pagemap.decode`` when a run failed.
``recorded`` opens the run's verdict: timed, under the scenario's THP knobs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import oracle, pagemap, shrinker, thp
from .memcg import Memcg
from .pagemap import PAGE, PageStates
from .scenario import Scenario
from .verdict import Finding, PhaseRecord, Verdict

log = logging.getLogger(__name__)


@contextlib.contextmanager
def recorded(scenario: Scenario) -> Iterator[Verdict]:
    """The verdict of one run of ``scenario``: timed, with the scenario's THP knobs applied (and restored) around
    the run; its summary is logged at the end."""
    verdict = Verdict(scenario=scenario.id, kernel=os.uname().release)
    t0 = time.monotonic()
    with thp.applied(scenario.thp):
        yield verdict
    verdict.seconds = round(time.monotonic() - t0, 3)
    log.info("%s", verdict.summary())


class TakenBack(Protocol):
    """Pages the process under test took back itself (a QEMU's own discards, ``qemu.discards``): read around each
    snapshot, they are not holes while the process has not placed them again."""

    def before_snapshot(self) -> None: ...

    def after_snapshot(self, present: np.ndarray) -> np.ndarray: ...


@dataclass
class Ledger:
    verdict: Verdict
    snap: Callable[[bool], PageStates]  # a pagemap snapshot of the region (argument: with kpageflags' THP bit)
    npages: int
    name: str = ""  # the side ("src", "dst", "restore"); "" for the synthetic run's one region
    space: str = "va"  # findings' address space: "va" (the helper's addresses) or "gpa" (guest-physical)
    base: int = 0  # address of page 0 in ``space`` (the helper's region is known once mapped)
    judged: bool = True  # new holes are findings here (not on a postcopy source: a pte_none zero page reads as 0)
    volatile: np.ndarray | None = None  # pages the driver itself keeps changing: never placed, never holes
    taken_back: TakenBack | None = None  # pages the process discarded itself: not holes until placed again
    last: PageStates | None = None
    around_shrinks: dict[str, PageStates] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.placed = np.zeros(self.npages, dtype=bool)
        self.reported_holes = np.zeros(self.npages, dtype=bool)
        if self.volatile is None:
            self.volatile = np.zeros(self.npages, dtype=bool)
        self.excused = np.zeros(self.npages, dtype=bool)  # at the last snapshot: taken back by the process

    @property
    def where(self) -> str:
        """Detail of this ledger's page findings: which side's RAM (nothing for the one synthetic region)."""
        return f"{self.name} RAM" if self.name else ""

    def snapshot(self, with_thp: bool = False) -> PageStates:
        if self.taken_back is not None:
            self.taken_back.before_snapshot()
        self.last = self.snap(with_thp)
        if self.taken_back is not None:
            self.excused = self.taken_back.after_snapshot(self.last.present)
        return self.last

    def missing(self, states: PageStates) -> np.ndarray:
        """Placed pages that are holes in ``states`` (the last snapshot), but for those the process took back."""
        assert self.volatile is not None
        return self.placed & states.hole & ~self.volatile & ~self.excused

    def observe(self, phase: str, with_thp: bool = False) -> PageStates:
        """Snapshot; placed pages that are holes now are findings of ``phase`` (once each); then every present
        page counts as placed."""
        states = self.snapshot(with_thp)
        assert self.volatile is not None
        if self.judged:
            holes = self.missing(states) & ~self.reported_holes
            self.reported_holes |= holes
            self.report("hole", phase, np.nonzero(holes)[0], self.where)
        self.placed |= states.present & ~self.volatile
        return states

    def shrink(self, phase: str, trigger: str, cg: Memcg | None,
               nonzero: np.ndarray, why_not: str = "", origin: str = "") -> tuple[PageStates, PageStates]:
        """Fire the shrinker once between two THP-aware snapshots (kept for the artifacts); the second is observed
        and the split judged (``nonzero``: the pages the model expects to hold data): each underused THP it
        skipped, again after one more firing, is a ``no-split`` finding naming its first page, size and
        ``origin``. Returns both snapshots (the second after the second firing, if one was needed)."""
        before = self.snapshot(with_thp=True)
        result = shrinker.fire(trigger, cg)
        after = self.observe(phase, with_thp=True)
        prefix = f"{self.name}-" if self.name else ""
        self.around_shrinks[f"{prefix}before-{phase}"] = before
        self.around_shrinks[f"{prefix}after-{phase}"] = after
        shrinker.judge_split(self.verdict, phase, before, after, nonzero, result, side=self.name, why_not=why_not)
        if not self.verdict.shrinks[-1]["split_expected"]:
            return before, after
        mpn = thp.ShrinkerSupport.now().max_ptes_none
        chunks = oracle.skipped_splits(before, after, nonzero, mpn)
        if len(chunks):  # one more firing, in case a skipped folio is still queued (one dropped from it is not)
            shrinker.fire(trigger, cg)
            after = self.around_shrinks[f"{prefix}after-{phase}"] = self.observe(phase, with_thp=True)
            again = oracle.skipped_splits(before, after, nonzero, mpn)
            if len(late := np.setdiff1d(chunks, again)):
                self.verdict.notes.append(f"{phase}: {self.name + ': ' if self.name else ''}{len(late)} underused "
                                          "THPs split only on a second firing")
            chunks = np.intersect1d(chunks, again)
        chunks = self.refused_by_a_reference(phase, chunks, result)
        self.report("no-split", phase, chunks * pagemap.PAGES_PER_THP,
                    f"{self.name + ': ' if self.name else ''}underused 2048kB THPs ({origin or 'origin unknown'}) "
                    f"still whole after {result.trigger} and a second firing, of "
                    f"{self.verdict.shrinks[-1]['thp_before']} (first page of each THP named)")
        return before, after

    def refused_by_a_reference(self, phase: str, chunks: np.ndarray, result: shrinker.ShrinkResult) -> np.ndarray:
        """Underused THPs left whole that the kernel did try to split — as many PMDs split without their folio and
        ``thp_split_page_failed`` attempts counted as THPs left — were refused by a transient extra reference (seen
        in an idle helper's region too, 1 of 32: likely a per-CPU LRU batch still holding the last-faulted folio,
        or compaction); the deferred-split queue drops such a folio, so no firing splits it again. Named in the
        verdict's notes, not as a kernel finding; the rest are returned. Only while the same firing split others:
        a kernel whose every split fails (a leaked reference) still fails the cell."""
        if not len(chunks):
            return chunks
        delta = result.vmstat_delta
        failed = delta.get("thp_split_page_failed", 0)
        pmd_only = delta.get("thp_split_pmd", 0) - delta.get("thp_split_page", 0)  # PMDs split, folio not
        if failed < len(chunks) or pmd_only < len(chunks) or delta.get("thp_split_page", 0) < 1:
            return chunks
        where = ", ".join(f"{self.space} {a:#x}" for a in self.addresses(chunks[:8] * pagemap.PAGES_PER_THP))
        who = f"{self.name}: " if self.name else ""
        self.verdict.notes.append(f"{phase}: {who}{len(chunks)} underused THP(s) ({where}) the kernel tried "
                                  f"to split ({pmd_only} PMDs split without their folio, thp_split_page_failed "
                                  f"+{failed}) and could not: a transient extra reference; the cell did not test them")
        return chunks[:0]

    def lost_bits(self, phase: str, before: PageStates, after: PageStates, wp: np.ndarray | None = None,
                  keep: np.ndarray | None = None) -> None:
        """uffd-wp and soft-dirty bits reported ``before`` and gone ``after`` are findings (uffd-wp only where
        ``wp``, both only where ``keep``, if given)."""
        soft_dirty = oracle.lost_soft_dirty(before, after)
        self.report("lost-uffd-wp", phase, oracle.lost_uffd_wp(before, after, wp), self.where)
        self.report("lost-soft-dirty", phase, soft_dirty if keep is None else soft_dirty[keep[soft_dirty]], self.where)

    def addresses(self, indices: Iterable[int]) -> list[int]:
        return [self.base + int(i) * PAGE for i in indices]

    def report(self, kind: str, phase: str, indices: np.ndarray | list[int], detail: str = "") -> None:
        """A finding naming these pages (nothing if there are none)."""
        if len(indices):
            self.verdict.findings.append(Finding.of(kind, phase, self.addresses(indices), self.space, detail))

    def stall(self, phase: str, indices: list[int], detail: str) -> None:
        """A stall is a finding even when no page can be named."""
        self.verdict.findings.append(Finding.of("stall", phase, self.addresses(indices), self.space, detail))

    def record(self, phase: str, t0: float) -> None:
        """The page-state counts of the last snapshot, as the phase record of a step begun at ``t0``."""
        if self.last is not None:
            self.verdict.phases.append(PhaseRecord(phase, self.last.counts(), round(time.monotonic() - t0, 4)))

    def states(self) -> dict[str, PageStates]:
        """The snapshots worth keeping: around each shrink, and the last."""
        prefix = f"{self.name}-" if self.name else ""
        return {**self.around_shrinks, **({f"{prefix}last": self.last} if self.last is not None else {})}


def save_page_states(artifacts: Path | None, scenario: Scenario, verdict: Verdict, ledgers: Iterable[Ledger],
                     **masks: np.ndarray) -> None:
    """On failure: every ledger's snapshots (``pagemap-<name>.npz``, with its placed pages and ``masks``) and the
    scenario, for ``pagemap.decode``, the report's pictures and the reproducer."""
    if artifacts is None or verdict.ok:
        return
    for ledger in ledgers:
        for name, states in ledger.states().items():
            pagemap.save(artifacts / f"pagemap-{name}.npz", states, placed=ledger.placed, **masks)
    (artifacts / "scenario.json").write_text(scenario.to_json())
