"""Firing the deferred-split shrinker, and measuring what it did (vmstat deltas)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import memcg as cgroups
from . import oracle, thp
from .errors import SetupError
from .memcg import Memcg
from .pagemap import PageStates
from .verdict import Verdict

VMSTAT = Path("/proc/vmstat")
COUNTERS = ("thp_underused_split_page", "thp_split_page", "thp_split_page_failed", "thp_split_pmd",
            "thp_deferred_split_page")
TRIGGERS = ("auto", "memcg", "drop_caches")


def vmstat() -> dict[str, int]:
    out = {}
    for line in VMSTAT.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in COUNTERS:
            out[key] = int(value)
    return out


@dataclass
class ShrinkResult:
    trigger: str  # what was fired: "memcg-v1 force_empty", "memcg-v2 reclaim", "drop_caches"
    seconds: float
    vmstat_delta: dict[str, int] = field(default_factory=dict)

    @property
    def underused_splits(self) -> int:
        """Host-wide count of underused THPs split during the trigger (-1: kernel has no such counter)."""
        return self.vmstat_delta.get("thp_underused_split_page", -1)


def _known(trigger: str) -> None:
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown shrinker trigger {trigger!r} (one of {', '.join(TRIGGERS)})")


@contextlib.contextmanager
def scope(trigger: str, name: str) -> Iterator[Memcg | None]:
    """The memory cgroup the processes under test start in, so that ``fire`` reaches only their THPs; None where
    the trigger is host-wide (drop_caches, or 'auto' on a kernel without a memory controller)."""
    _known(trigger)
    if trigger == "memcg" and cgroups.available() is None:
        raise SetupError("--trigger=memcg: this kernel has no memory cgroup controller (cgroup v2 memory or v1 "
                         "memory.force_empty) to scope the shrinker; use --trigger=auto or --trigger=drop_caches")
    if trigger == "drop_caches" or cgroups.available() is None:
        yield None
    else:
        with cgroups.scope(name) as cg:
            yield cg


def fire(trigger: str = "auto", memcg: Memcg | None = None) -> ShrinkResult:
    """Run the shrinker once: scoped to ``memcg`` where given and allowed, else host-wide drop_caches.

    'auto' prefers the scoped trigger: it does not disturb the rest of the machine.
    """
    _known(trigger)
    before = vmstat()
    t0 = time.monotonic()
    if trigger in ("auto", "memcg") and memcg is not None:
        memcg.reclaim()
        what = "memcg-v2 memory.reclaim" if memcg.version == "v2" else "memcg-v1 memory.force_empty"
    else:
        # drop_caches=2 shrinks every slab shrinker, the deferred split queues included, host-wide
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("2")
        what = "drop_caches"
    seconds = time.monotonic() - t0
    after = vmstat()
    return ShrinkResult(what, seconds, {k: after[k] - before.get(k, 0) for k in after})


def judge_split(verdict: Verdict, phase: str, before: PageStates, after: PageStates, nonzero: np.ndarray,
                result: ShrinkResult, *, side: str = "", why_not: str = "") -> None:
    """Record one shrink in ``verdict`` (THPs before/after, vmstat, whether a split was expected and why not);
    ``Ledger.shrink`` names each underused THP it left whole. ``nonzero``: the pages the model expects to hold
    data (pagemap cannot see inside a THP). ``why_not``: the caller knows this trigger cannot split these THPs
    (e.g. shmem under the anon-only shrinker); the record says so with what it measured."""
    assert before.thp is not None and after.thp is not None, "shrinks are judged on with_thp snapshots"
    support = thp.ShrinkerSupport.now()
    reason = oracle.split_expectation(before, nonzero, support.no_split_reason(), support.max_ptes_none)
    thp_before, thp_after = int(before.thp.sum()) // 512, int(after.thp.sum()) // 512
    if why_not:
        reason = f"{why_not} (measured: {thp_before} THPs before, {thp_after} after)"
    verdict.shrinks.append({"phase": phase, **({"side": side} if side else {}), "trigger": result.trigger,
                            "seconds": round(result.seconds, 4), "thp_before": thp_before, "thp_after": thp_after,
                            "vmstat": result.vmstat_delta, "split_expected": not reason, "no_split_reason": reason})
    who = f"{side}: " if side else ""
    if reason:
        verdict.no_split_reason = verdict.no_split_reason or who + reason
        return
    verdict.split_expected = True
