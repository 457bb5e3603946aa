"""Kernel bugs holecheck has measured and that are not fixed on a kernel it runs by default.

A cell that shows a known finding is reported as *xfail* with the finding's name, its first pages and its cause, so
the main job stays green on it; it is strict both ways: the same cell failing with any other kind of finding fails,
and the cell *passing* where the finding is due fails too ("no longer shows: fixed? remove it here"). An entry is
keyed on what the kernel does (its features), not on a version string, so a kernel built with the fix stops matching
by itself once the feature it keys on changes; the ``measured`` line says on which kernels it was seen.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .verdict import Verdict


@dataclass(frozen=True)
class KnownFinding:
    name: str
    summary: str  # one line for the xfail reason
    cause: str  # where in the kernel, in a maintainer's words
    measured: str  # kernels it was seen on, and how
    scenario: re.Pattern[str]  # the scenario ids (Verdict.scenario) it shows in
    kinds: frozenset[str]  # the finding kinds it explains
    kernel: Callable[[Mapping[str, bool]], bool]  # does the kernel under test have it (by its features)

    def applies(self, verdict: Verdict, features: Mapping[str, bool]) -> bool:
        return bool(self.scenario.search(verdict.scenario)) and self.kernel(features)

    def explains(self, verdict: Verdict) -> bool:
        return not verdict.ok and {f.kind for f in verdict.findings} <= self.kinds


KNOWN: tuple[KnownFinding, ...] = (
    KnownFinding(
        name="ksm-merge-drops-uffd-wp-and-soft-dirty",
        summary="KSM's merge (replace_page) drops the uffd-wp / soft-dirty bit; before v6.12 a split leaves the zero "
                "subpages as anonymous pages for it to merge",
        cause="KSM's replace_page() maps the merged page (or, with use_zero_pages, the zeropage) with a fresh PTE "
              "that carries neither the uffd-wp nor the soft-dirty bit of the PTE it replaces, so a later write "
              "is not trapped / not seen by an incremental dump. Kernels without the v6.12 zero-subpage remap "
              "leave a split THP's zero-filled subpages as anonymous pages, which KSM then merges; since v6.12 the "
              "split maps them to the zeropage itself (bits kept), so these split cells no longer reach the merge",
        measured="Debian 6.1.0-57: synthetic cells 16,065 pages with use_zero_pages=0, 16,128 with 1; QEMU 7.2's "
                 "background snapshot 30,303 pages, and 1,610 pages of the saved snapshot hold data written after "
                 "its start. The merge itself drops the bit on the host's 6.18 too (256 write-protected duplicate "
                 "4 KiB pages, KSM on: 1 kept it)",
        scenario=re.compile(r"-by-ksm(-zero)?\]"),
        kinds=frozenset({"lost-uffd-wp", "no-wp-fault", "lost-soft-dirty", "stale-dump", "content"}),
        kernel=lambda features: not features.get("shrink_underused", True),
    ),
)


KNOWN += (
    KnownFinding(
        name="ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty",
        summary="KSM's merge (replace_page) drops the uffd-wp and soft-dirty bits of duplicate data pages: a write "
                "to one is not trapped (a background snapshot may save what was written after its start), a page "
                "written since clear_refs reads clean (an incremental dump misses it)",
        cause="write_protect_page() / replace_page() build the merged page's PTE from vma->vm_page_prot alone: the "
              "uffd-wp bit (set by UFFDIO_WRITEPROTECT) and the soft-dirty bit the old PTE carried are gone; the "
              "next write COWs without a WP fault, and pagemap reads the page clean",
        measured="synthetic (tests/test_triggers.py '-same-ksm', 256 duplicate data pages, 255 merged): 255 pages "
                 "lost uffd-wp and took untrapped writes on host 6.18.44, Debian 6.12.118 and 7.3.4; the C "
                 "reproducer (tests/test_reproducer.py) the same on the host; the soft-dirty sibling lost 255 "
                 "soft-dirty bits on 7.3.4 (4 of 4 runs) and 6.12.118 (1 of 5, not a cell: too unsteady). QEMU "
                 "background snapshots with duplicate data pages on the host: "
                 "978-1,000 pages lost the bit a run under QEMU 7.2.22 and 11.1.3 (7 runs); in four runs 11, 166, "
                 "278 and 278 pages of the restored snapshot held data written after its start",
        scenario=re.compile(r"-same-by-ksm\]"),
        kinds=frozenset({"lost-uffd-wp", "no-wp-fault", "lost-soft-dirty", "stale-dump", "content"}),
        kernel=lambda features: True,
    ),
)


def applying(verdict: Verdict, features: Mapping[str, bool]) -> KnownFinding | None:
    """The known finding due in this verdict's cell on this kernel, if any."""
    return next((k for k in KNOWN if k.applies(verdict, features)), None)


def known_pages(verdict: Verdict, features: Mapping[str, bool], kind: str) -> set[int]:
    """Pages of ``kind`` a known finding accounts for in this cell (empty where none applies): a negative control
    on such a kernel names its sabotaged pages plus these."""
    known = applying(verdict, features)
    if known is None or kind not in known.kinds:
        return set()
    return {a for f in verdict.findings if f.kind == kind for a in f.addresses}
