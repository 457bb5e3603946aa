"""Which cells a known finding covers: by scenario id and by what the kernel does, strict about the finding kinds."""
from __future__ import annotations

from suite import known_findings
from suite.verdict import Finding, Verdict

KSM_CELL = "snapshot-style[shrink@after-protect-mpn409-spread8-by-ksm-zero]"
NO_REMAP = {"shrink_underused": False, "soft_dirty": True}  # Debian 6.1's features
REMAP = {"shrink_underused": True, "soft_dirty": True}


def verdict(scenario: str, *kinds: str) -> Verdict:
    return Verdict(scenario=scenario, kernel="6.1.0-57-amd64", region=0x10000,
                   findings=[Finding.of(k, "p", [0x11000, 0x12000]) for k in kinds])


def test_ksm_cells_on_a_kernel_without_the_zero_subpage_remap_are_known():
    v = verdict(KSM_CELL, "lost-uffd-wp", "no-wp-fault")
    known = known_findings.applying(v, NO_REMAP)
    assert known is not None and known.explains(v)
    assert known_findings.known_pages(v, NO_REMAP, "lost-uffd-wp") == {0x11000, 0x12000}


def test_not_due_where_the_split_remaps_or_on_other_triggers():
    assert known_findings.applying(verdict(KSM_CELL, "lost-uffd-wp"), REMAP) is None
    assert known_findings.applying(verdict("snapshot-style[shrink@after-protect-mpn409-spread8-by-pageout]",
                                           "lost-uffd-wp"), NO_REMAP) is None
    assert known_findings.known_pages(verdict(KSM_CELL, "lost-uffd-wp"), REMAP, "lost-uffd-wp") == set()


def test_another_kind_of_finding_is_not_explained():
    v = verdict(KSM_CELL, "lost-uffd-wp", "hole")
    assert not known_findings.applying(v, NO_REMAP).explains(v)
    assert not known_findings.applying(verdict(KSM_CELL), NO_REMAP).explains(verdict(KSM_CELL))


def test_duplicate_data_merged_by_ksm_is_known_on_every_kernel():
    cell = "snapshot[shrink@snapshot-running-mpn409-spread8-same-by-ksm]"
    for features in (NO_REMAP, REMAP):
        known = known_findings.applying(verdict(cell, "lost-uffd-wp"), features)
        assert known is not None and known.explains(verdict(cell, "lost-uffd-wp"))
