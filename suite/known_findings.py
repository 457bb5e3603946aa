"""Kernel bugs holecheck has measured and that are not fixed on a kernel it runs by default.

A cell that shows a known finding is reported as *xfail* with the finding's name, its pages and its cause, so the
main job stays green on it. It is strict both ways. An entry explains only its *signature*: the pages it may account
for (a named page set of the model, ``Verdict.pages``: the merged duplicate data pages, the zero subpages), lost
bits and untrapped writes on the same pages, a restored snapshot's or a dump's mismatches only among the pages that
lost their bit; any page or finding beyond that fails the cell, named (``beyond``). And the cell *passing* where the
finding is due fails too ("did not show: fixed? remove it here"). An entry is due in the uffd modes it names (never
a MISSING cell unless it says so) and on kernels keyed on what they do (their measured features), not on a version
string, so a kernel built with the fix stops matching by itself once the feature changes; ``measured`` says on which
kernels it was seen.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .verdict import Finding, Verdict

# the uffd mode a scenario kind registers: postcopy's are MISSING, the snapshots' (and their soft-dirty siblings,
# which register nothing) write-protect
MODES = {"postcopy-style": "missing", "postcopy": "missing", "postcopy-libvirt": "missing",
         "snapshot-style": "wp", "snapshot": "wp"}
LOST = ("lost-uffd-wp", "lost-soft-dirty")


def uffd_mode(scenario_id: str) -> str:
    """'missing', 'wp', or 'rwp' (the snapshot-style sequence registered read-write-protect: ``rwp_style``)."""
    kind, _, name = scenario_id.partition("[")
    return "rwp" if kind == "snapshot-style" and name.startswith("rwp-") else MODES.get(kind, "")


@dataclass(frozen=True)
class KnownFinding:
    name: str
    summary: str  # one line for the xfail reason
    cause: str  # where in the kernel, in a maintainer's words
    measured: str  # kernels it was seen on, and how
    scenario: re.Pattern[str]  # the scenario ids (Verdict.scenario) it shows in
    kinds: frozenset[str]  # the finding kinds it explains
    pages: str  # the model's page set (``Verdict.pages``) whose pages it may lose bits of
    modes: frozenset[str]  # the uffd modes (``uffd_mode``) of the cells it is due in
    kernel: Callable[[Mapping[str, bool]], bool]  # does the kernel under test have it (by its measured features)

    def applies(self, verdict: Verdict, features: Mapping[str, bool]) -> bool:
        return (bool(self.scenario.search(verdict.scenario)) and uffd_mode(verdict.scenario) in self.modes
                and self.kernel(features))

    def explains(self, verdict: Verdict) -> bool:
        """Every finding of this failing verdict lies within this entry's signature."""
        return not verdict.ok and not beyond(verdict, [self])


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
        pages="zero",  # the zero subpages KSM merged (in a QEMU: every page holecheck wrote no data into)
        modes=frozenset({"wp"}),
        kernel=lambda features: (features.get("ksm", False) and not features.get("shrink_underused", True)
                                and not features.get("ksm_merge_keeps_uffd_wp", False)),
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
        pages="data",  # the duplicates: every data page holds the same bytes; KSM keeps one, replaces the rest
        modes=frozenset({"wp"}),
        # measured per kernel (suite/targets/ksm_probe.py): a kernel with the fix (kernels/patches/ksm-keep-uffd-wp)
        # keeps the bit through a merge, and the entry stops applying there by itself
        kernel=lambda features: features.get("ksm", False) and not features.get("ksm_merge_keeps_uffd_wp", False),
    ),
)


KNOWN += (
    KnownFinding(
        name="ksm-merge-of-duplicates-drops-rwp",
        summary="KSM's merge (replace_page) drops the read-write-protection (RWP, Linux 7.3) of duplicate data "
                "pages: an access to a merged page raises no RWP fault, a working-set tracker never sees it",
        cause="RWP lives in the same uffd PTE bit as uffd-wp; replace_page() builds the merged page's PTE from "
              "vma->vm_page_prot, so the merged page is accessible and carries no uffd bit: the same loss as the "
              "uffd-wp duplicates finding, in the newest uffd mode",
        measured="Debian 7.3.4 in an L1 VM (tests/test_triggers.py 'rwp-same-ksm-pmd', 64 MiB region: 255 of 256 "
                 "duplicate data pages lost bit 57 and took an untrapped write, 2 of 2 runs; 16 MiB: 63 of 64); the "
                 "C reproducer the same (255 + 255)",
        scenario=re.compile(r"-same-by-ksm\]"),
        kinds=frozenset({"lost-uffd-wp", "no-rwp-fault"}),
        pages="data",
        modes=frozenset({"rwp"}),
        kernel=lambda features: features.get("ksm", False) and features.get("uffd_rwp", False),
    ),
)


def applying(verdict: Verdict, features: Mapping[str, bool]) -> list[KnownFinding]:
    """The known findings due in this verdict's cell on this kernel (several may be: their signatures add up)."""
    return [k for k in KNOWN if k.applies(verdict, features)]


def _pages(verdict: Verdict, *kinds: str) -> set[int]:
    return {a for f in verdict.findings if f.kind in kinds for a in f.addresses}


def beyond(verdict: Verdict, known: Sequence[KnownFinding]) -> list[Finding]:
    """What of ``verdict`` the signatures of ``known`` do not account for, as findings naming those pages: a kind
    none explains (whole); lost bits outside the entries' page sets; an untrapped write to a page that kept its
    uffd-wp bit, or a page that lost it whose write was trapped (they must be the same pages); a stale dump of a
    page that kept its soft-dirty bit; a content mismatch on a page that lost neither bit."""
    if not known:
        return list(verdict.findings)
    kinds = frozenset().union(*(k.kinds for k in known))
    allowed = set().union(*(verdict.page_set(k.pages) for k in known))
    lost_wp, untrapped = _pages(verdict, "lost-uffd-wp"), _pages(verdict, "no-wp-fault", "no-rwp-fault")
    lost_sd, lost = _pages(verdict, "lost-soft-dirty"), _pages(verdict, *LOST)
    signed = f"not among the pages {', '.join(k.name for k in known)} may account for " \
             f"({' / '.join(k.pages for k in known)} pages)"
    inside = {"lost-uffd-wp": (allowed, signed), "lost-soft-dirty": (allowed, signed),
              "no-wp-fault": (lost_wp, "their uffd-wp bit was not seen lost"),
              "no-rwp-fault": (lost_wp, "their uffd (RWP) bit was not seen lost"),
              "stale-dump": (lost_sd, "their soft-dirty bit was not seen lost"),
              "content": (lost, "they lost no uffd-wp / soft-dirty bit")}
    out: list[Finding] = []
    for f in verdict.findings:
        if f.kind not in kinds or f.kind not in inside or (f.count and not f.addresses):
            out.append(f)
            continue
        pages, why = inside[f.kind]
        extra = {a for a in f.addresses if a not in pages}
        if f.kind == "lost-uffd-wp" and untrapped:  # every page was written after the loss: none may have trapped
            extra |= {a for a in f.addresses if a not in untrapped}
            why += ", or their write was trapped"
        if extra:
            out.append(Finding.of(f.kind, f.phase, sorted(extra), f.space, f"beyond the known finding: {why}"))
    return out


def known_pages(verdict: Verdict, features: Mapping[str, bool], kind: str) -> set[int]:
    """Pages of ``kind`` the known findings due in this cell account for (empty where none applies): a negative
    control on such a kernel names its sabotaged pages plus exactly these."""
    known = applying(verdict, features)
    if not any(kind in k.kinds for k in known):
        return set()
    allowed = set().union(*(verdict.page_set(k.pages) for k in known))
    extra = beyond(verdict, known)  # a page that lost a bit beyond the signature is no known page of any kind
    not_signed = {a for f in extra if f.kind in LOST or f.kind == kind for a in f.addresses}
    return (_pages(verdict, kind) & allowed) - not_signed
