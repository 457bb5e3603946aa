"""Scenario builders for the memory axes (issue 11): RAM backing, how the THPs were born, uffd features, and
CRIU's soft-dirty sequence. Each returns a ``scenario.Scenario`` (data: a list of steps), like the builders in
``scenario``; the runner's ``do_<op>`` methods perform the new steps.

- backing ``memfd``: the region is a MAP_SHARED memfd (shmem THPs under ``shmem_enabled=advise`` and
  MADV_HUGEPAGE). The underused shrinker splits anonymous THPs only: the runner says so in each shrink record.
- origin ``read``: every page read first (the huge zero page), then written (since 6.15 a THP allocated in place;
  before, 4 KiB pages); ``collapse``: written as 4 KiB pages, then MADV_COLLAPSE.
- ``criu_style``: write non-zero data, clear (``clear_refs`` 4, or PAGEMAP_SCAN's write-protect under uffd
  WP_ASYNC), overwrite the zero-fill subpages with zeros, split, dump: every page written since the clear must
  read soft-dirty / written, else an incremental dump restores stale data.
- ``wp_feature_style``: the snapshot-style sequence with ``UFFD_FEATURE_WP_ASYNC`` (armed and read back with
  PAGEMAP_SCAN ``PAGE_IS_WRITTEN``) or ``UFFD_FEATURE_WP_UNPOPULATED`` (protect without populating first).
- ``rwp_style`` (issue 21): the same sequence with userfaultfd's read-write-protect mode (Linux 7.3), sync, async
  (read back with PAGEMAP_SCAN ``PAGE_IS_ACCESSED``) or switched between the two by ``UFFDIO_SET_MODE``.
"""
from __future__ import annotations

from dataclasses import replace

from .scenario import SNAPSHOT_SHRINK_POINTS, Fill, Scenario, Step, postcopy_style, snapshot_style
from .thp import ThpSettings

FEATURES = ("async", "unpopulated")  # register-arg tokens: UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED
DUMPS = ("soft-dirty", "written")
SHMEM_THP = "advise"  # shmem_enabled for memfd cells: THPs where MADV_HUGEPAGE asks (like QEMU's RAM)


def with_memory(scenario: Scenario, *, backing: str = "anon", origin: str = "write") -> Scenario:
    """The same sequence on another backing and/or with its THPs born another way (ids gain a suffix)."""
    steps = list(scenario.steps)
    first_place = next((i for i, st in enumerate(steps) if st.op == "place"), -1)
    if origin != "write" and first_place < 0:
        raise ValueError(f"{scenario.id}: origin {origin!r} needs a synthetic sequence (real QEMU: write only)")
    if origin == "read":  # the huge zero page first, then the writes of the place step
        steps.insert(first_place, Step("touch", "read", label="touch(read)@origin"))
    elif origin == "collapse":  # no MADV_HUGEPAGE at map: 4 KiB pages, then collapsed
        steps = [replace(st, arg="") if st.op == "map" else st for st in steps]
        steps.insert(first_place + 1, Step("collapse"))
    elif origin != "write":
        raise ValueError(f"unknown origin {origin!r}")
    thp = replace(scenario.thp, shmem_enabled=SHMEM_THP) if backing == "memfd" else scenario.thp
    return replace(scenario, steps=tuple(steps), backing=backing, origin=origin, thp=thp)


def criu_style(dump: str, *, sabotage: bool = False, fill: Fill | None = None,
               thp: ThpSettings | None = None) -> Scenario:
    """CRIU's incremental dump: place non-zero data everywhere, clear, zero the zero-fill subpages (the THPs are
    underused now), shrink, then dump: every page written since the clear must read ``dump`` (soft-dirty or
    PAGE_IS_WRITTEN). ``sabotage`` makes the selected written pages read clean before the dump."""
    if dump not in DUMPS:
        raise ValueError(f"unknown dump {dump!r} (one of {', '.join(DUMPS)})")
    if dump == "soft-dirty":
        arm = [Step("clear-soft-dirty")]
    else:
        arm = [Step("register", "wp,async,unpopulated"), Step("clear-written")]
    steps = [Step("map", "hugepage"), Step("place", pages="all"), *arm, Step("touch", "zero", pages="zero"),
             Step("shrink", label="shrink@after-zero")]
    steps += [Step("sabotage-clean", dump, pages="sabotage")] if sabotage else []
    steps += [Step("dump", dump), Step("verify")]
    name = f"criu-{dump}" + ("-sabotage" if sabotage else "")
    return Scenario(name=name, kind="snapshot-style", steps=tuple(steps), fill=fill or Fill(),
                    thp=thp or ThpSettings())


def wp_feature_style(feature: str, shrink_at: str, *, sabotage: bool = False, fill: Fill | None = None,
                     thp: ThpSettings | None = None) -> Scenario:
    """The snapshot-style sequence with a uffd-wp feature at the same shrink points.

    ``async``: registered with WP_ASYNC (+ WP_UNPOPULATED), protected by PAGEMAP_SCAN's clear, writes resolved
    by the kernel (no fault messages), then dumped with PAGE_IS_WRITTEN; ``sabotage`` re-protects written pages.
    ``unpopulated``: registered with WP_UNPOPULATED and protected without populating first; ``sabotage``
    un-protects pages as the snapshot-style control does.
    """
    if feature not in FEATURES or shrink_at not in SNAPSHOT_SHRINK_POINTS:
        raise ValueError(f"unknown feature {feature!r} or point {shrink_at!r}")
    base = snapshot_style(shrink_at, fill=fill, thp=thp, sabotage=sabotage and feature == "unpopulated")
    steps: list[Step] = []
    for st in base.steps:
        if st.op == "register":
            st = Step("register", "wp,async,unpopulated" if feature == "async" else "wp,unpopulated")
        elif st.op == "wp":
            st = Step("clear-written") if feature == "async" else Step("wp", "1,unpopulated")
        elif st.op == "verify" and feature == "async":
            steps += [Step("sabotage-clean", "written", pages="sabotage")] if sabotage else []
            steps.append(Step("dump", "written"))
        steps.append(st)
    name = f"wp-{feature}-{base.name}" + ("-sabotage" if sabotage else "")
    return replace(base, name=name, steps=tuple(steps))


MINOR_POINTS = ("after-place", "after-zap")


def minor_style(shrink_at: str, *, sabotage: bool = False, thp: ThpSettings | None = None) -> Scenario:
    """MINOR mode on memfd (QEMU's postcopy with shared RAM the destination already holds): data everywhere,
    register MINOR, zap every PTE (the page cache keeps the pages), read all: each read raises a MINOR fault that
    UFFDIO_CONTINUE resolves, and every page still holds its data. ``sabotage`` punches the selected pages out of
    the page cache before the reads: they read zeros, and the content check must name exactly them."""
    if shrink_at not in MINOR_POINTS:
        raise ValueError(f"unknown point {shrink_at!r} (one of {', '.join(MINOR_POINTS)})")
    shrink = Step("shrink", label=f"shrink@{shrink_at}")
    steps = [Step("map", "hugepage"), Step("place", pages="all"), Step("register", "minor")]
    steps += [shrink] if shrink_at == "after-place" else []
    steps += [Step("discard", "zap")] + ([shrink] if shrink_at == "after-zap" else [])
    steps += [Step("sabotage-punch", pages="sabotage")] if sabotage else []
    steps += [Step("touch", "read"), Step("verify")]
    name = f"minor-shrink@{shrink_at}" + ("-sabotage" if sabotage else "")
    base = Scenario(name=name, kind="postcopy-style", steps=tuple(steps), thp=thp or ThpSettings())
    return with_memory(base, backing="memfd")


def origin_style(origin: str, *, backing: str = "anon", sabotage: bool = False,
                 thp: ThpSettings | None = None, fill: Fill | None = None) -> Scenario:
    """Snapshot-style with the shrink before registration, THPs born by ``origin``: every underused THP must be
    split whatever its origin. ``sabotage`` fills the zero subpages of chunks 1 and 5 behind the model's back just
    before the shrink: those THPs are no longer underused, so the split skips them and the verdict must name them
    as ``no-split``."""
    base = with_memory(snapshot_style("before-register", thp=thp, fill=fill), backing=backing, origin=origin)
    steps = list(base.steps)
    if sabotage:
        at = next(i for i, st in enumerate(steps) if st.op == "shrink")
        steps.insert(at, Step("sabotage-fill", pages="sabotage-chunks"))
    return replace(base, name=f"origin-{base.name}" + ("-sabotage" if sabotage else ""), steps=tuple(steps))


def lost_data_control(split: str = "shrinker", *, thp: ThpSettings | None = None) -> Scenario:
    """Negative control of the content axis: the postcopy-style sequence with sparse data pages (one non-zero byte
    each), the ``sabotage-data`` pages zeroed behind the model's back just before the split, as a zero-subpage
    detector that misjudged them would leave them. The verdict must name exactly those pages as ``lost-data``: at
    the split where it maps them to the zero page, else at the verify where they read zero."""
    base = replace(postcopy_style("after-discard", "after-place", fill=Fill(content="sparse"), thp=thp), split=split)
    at = next(i for i, st in enumerate(base.steps) if st.op == "shrink")
    steps = (*base.steps[:at], Step("sabotage-zero", pages="sabotage-data"), *base.steps[at:])
    return replace(base, name=f"{base.name}-sabotage-zero", steps=steps)


# RWP modes: sync (every access faults), async (the kernel resolves; PAGEMAP_SCAN reads the hot set), and
# UFFDIO_SET_MODE switching RWP_ASYNC off / on after the first accesses (7.3 toggles only RWP_ASYNC: a WP ↔ RWP
# switch does not exist, re-registering a WP range as RWP is -EBUSY)
RWP_MODES = ("sync", "async", "async-sync", "sync-async")
RWP_MIB = 16  # 8 THPs: every sync access is a fault round trip, 10-40 s per 16k pages in an L1 VM under TCG


def rwp_style(mode: str, shrink_at: str, *, sabotage: bool = False, fill: Fill | None = None,
              thp: ThpSettings | None = None) -> Scenario:
    """The snapshot-style sequence under RWP: register RWP, populate and protect every page, read every 16th zero
    subpage of the even THPs (``zero-some-half``; async mode resolves a PMD-mapped THP whole, so the odd THPs must
    stay untouched), split at ``shrink_at`` (after-protect: protected and accessed pages side by side), then read
    and write every page. In sync mode every first access to a protected page raises exactly one RWP
    fault and the second none; in async mode none, and PAGEMAP_SCAN's hot / cold sets must be exactly the pages
    accessed / not. ``async-sync`` / ``sync-async`` switch with UFFDIO_SET_MODE after the split (the kernel's
    documented working-set loop: detect async, switch to sync, scan, evict). ``sabotage`` un-protects a few zero
    subpages after the split (negative control: named at the first access, or by the scan)."""
    if mode not in RWP_MODES or shrink_at not in SNAPSHOT_SHRINK_POINTS:
        raise ValueError(f"unknown RWP mode {mode!r} (one of {', '.join(RWP_MODES)}) or point {shrink_at!r}")
    first, last = mode.split("-")[0], mode.split("-")[-1]
    base = snapshot_style(shrink_at, fill=fill, thp=thp)
    steps: list[Step] = []
    for st in base.steps:
        if st.op == "register":
            steps.append(Step("register", "rwp,async" if first == "async" else "rwp"))
        elif st.op == "wp":
            steps += [Step("rwp", "1"), Step("touch", "read", pages="zero-some-half")]
        elif st.op == "shrink" or st.op == "map" or st.op == "place":
            steps.append(st)
    steps += [Step("set-mode", last)] if first != last else []
    steps += [Step("sabotage-unrwp", "0", pages="sabotage")] if sabotage else []
    steps += [Step("dump", "accessed")] if first == "async" else []  # the hot set of the async phase
    if last == "sync":  # the first access of each page faults (a read, a write), the second must not
        steps += [Step("touch", "read", pages="zero"), Step("touch", "write", pages="data"),
                  Step("touch", "write", pages="zero", label="touch(write, zero)@again")]
    else:
        steps += [Step("touch", "write", pages="data"), Step("dump", "accessed", label="dump(accessed)@end")]
    steps.append(Step("verify"))
    name = f"rwp-{mode}-{base.name}" + ("-sabotage" if sabotage else "")
    return replace(base, name=name, steps=tuple(steps), size_mib=RWP_MIB)
