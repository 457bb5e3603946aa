"""Which cells a known finding covers (scenario id, uffd mode, measured kernel features) and what it explains: only
its signature, page by page. Each hole is a constructed verdict that the kinds-only check of before absorbed."""
from __future__ import annotations

import json

import numpy as np

from suite import known_findings
from suite.scenario import Fill
from suite.verdict import PAGE, Finding, Verdict

KSM_ZERO_CELL = "snapshot-style[shrink@after-protect-mpn409-spread8-by-ksm-zero]"
SAME_CELL = "snapshot-style[shrink@after-protect-mpn409-spread8-same-by-ksm]"
QEMU_SAME_CELL = "snapshot[shrink@snapshot-running-mpn409-spread8-same-by-ksm]"
NO_REMAP = {"shrink_underused": False, "soft_dirty": True, "ksm": True}  # Debian 6.1's features
REMAP = {"shrink_underused": True, "soft_dirty": True, "ksm": True}  # the host's 6.18, Debian 6.12.x
NO_KSM = {"shrink_underused": True, "soft_dirty": True, "ksm": False}
REGION, N = 0x7f0000000000, 2048
DATA = np.nonzero(Fill().data_mask(N))[0]  # 8 data pages per 512: 32
ZERO = np.nonzero(~Fill().data_mask(N))[0]
DUPLICATES = "ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty"


def va(indices) -> list[int]:
    return [REGION + int(i) * PAGE for i in indices]


def verdict(scenario: str, **findings) -> Verdict:
    """A verdict of ``scenario`` with the model's page sets of a spread8 fill and ``kind=(phase, page indices)``."""
    v = Verdict(scenario=scenario, kernel="6.18.44", region=REGION)
    v.name_pages("data", DATA)
    v.name_pages("zero", ZERO)
    for kind, (phase, pages) in findings.items():
        v.findings.append(Finding.of(kind.replace("_", "-"), phase, va(pages)))
    return v


def judged(v: Verdict, features) -> tuple[list[str], list[Finding]]:
    known = known_findings.applying(v, features)
    return [k.name for k in known], known_findings.beyond(v, known)


MERGED = DATA[1:]  # KSM keeps one of the duplicates, replaces the rest


def test_the_duplicates_finding_explains_exactly_its_merged_data_pages():
    v = verdict(SAME_CELL, lost_uffd_wp=("shrink@after-protect", MERGED),
                no_wp_fault=("touch(write, data)", MERGED))
    names, extra = judged(v, REMAP)
    assert names == [DUPLICATES] and extra == []
    assert known_findings.known_pages(v, REMAP, "no-wp-fault") == set(va(MERGED))


def test_a_content_only_failure_is_not_the_known_finding():
    """Before: kinds {content} <= the entry's kinds, so a content-only failure xfailed as the KSM finding."""
    v = verdict(SAME_CELL, content=("verify", DATA[:3]))
    names, extra = judged(v, REMAP)
    assert names == [DUPLICATES] and not known_findings.KNOWN[1].explains(v)
    assert [(f.kind, f.addresses) for f in extra] == [("content", va(DATA[:3]))]


def test_every_page_losing_its_bit_names_the_zero_subpages():
    """Debian 6.12.43's own bug (the split loses every zero subpage's bit) in a -same-by-ksm cell: before, all
    of it xfailed as the KSM finding; now exactly the zero subpages fail, named."""
    v = verdict(SAME_CELL, lost_uffd_wp=("shrink@after-protect", range(N)),
                no_wp_fault=("touch(write, zero)", range(N)))
    _, extra = judged(v, REMAP)
    assert [(f.kind, f.addresses, f.count) for f in extra] == [("lost-uffd-wp", va(ZERO), len(ZERO))]
    assert "beyond the known finding" in extra[0].message()
    assert known_findings.known_pages(v, REMAP, "lost-uffd-wp") == set(va(DATA))


def test_lost_bits_and_untrapped_writes_must_be_the_same_pages():
    trapped_anyway = verdict(SAME_CELL, lost_uffd_wp=("shrink", MERGED), no_wp_fault=("touch(write, data)", MERGED[1:]))
    untrapped_kept = verdict(SAME_CELL, lost_uffd_wp=("shrink", MERGED[1:]), no_wp_fault=("touch(write, data)", MERGED))
    assert [f.addresses for f in judged(trapped_anyway, REMAP)[1]] == [va(MERGED[:1])]
    assert [(f.kind, f.addresses) for f in judged(untrapped_kept, REMAP)[1]] == [("no-wp-fault", va(MERGED[:1]))]


def test_restored_snapshot_mismatches_lie_among_the_pages_that_lost_their_bit():
    inside = verdict(QEMU_SAME_CELL, lost_uffd_wp=("shrink@snapshot-running", MERGED),
                     content=("restored", MERGED[:5]))
    outside = verdict(QEMU_SAME_CELL, lost_uffd_wp=("shrink@snapshot-running", MERGED[5:]),
                      content=("restored", MERGED[:6]))
    assert judged(inside, REMAP) == ([DUPLICATES], [])
    assert [(f.kind, f.addresses) for f in judged(outside, REMAP)[1]] == [("content", va(MERGED[:5]))]


def test_never_due_in_a_missing_cell_nor_without_ksm():
    """Before: '-by-ksm' matched postcopy_style (MISSING) cells, which on 6.1 then failed 'did not show'; and the
    duplicates entry was due on every kernel (``lambda features: True``)."""
    for cell in ("postcopy-style[register@after-discard-shrink@after-place-mpn409-spread8-by-ksm]",
                 "postcopy-style[register@after-discard-shrink@after-place-mpn409-spread8-same-by-ksm]",
                 "postcopy[shrink@precopy-done-mpn409-spread8-same-by-ksm]"):
        assert known_findings.applying(verdict(cell, lost_uffd_wp=("s", DATA)), NO_REMAP) == []
    assert known_findings.applying(verdict(SAME_CELL, lost_uffd_wp=("s", DATA)), NO_KSM) == []
    assert all(k.kernel({}) is False for k in known_findings.KNOWN), "a kernel nothing was measured of has none"


def test_the_zero_subpage_entry_explains_only_zero_subpages_before_the_remap():
    lost = ZERO[5:]  # use_zero_pages=0: a few zero subpages stay unmerged
    v = verdict(KSM_ZERO_CELL, lost_uffd_wp=("shrink", lost), no_wp_fault=("touch(write, zero)", lost))
    assert judged(v, NO_REMAP) == (["ksm-merge-drops-uffd-wp-and-soft-dirty"], [])
    assert known_findings.applying(v, REMAP) == []  # v6.12+: the split maps the zero page itself, bits kept
    with_data = verdict(KSM_ZERO_CELL, lost_uffd_wp=("shrink", [*lost, DATA[0]]),
                        no_wp_fault=("touch(write, zero)", [*lost, DATA[0]]))
    assert [f.addresses for f in judged(with_data, NO_REMAP)[1]] == [va(DATA[:1])]


def test_both_entries_add_up_in_a_duplicates_cell_before_the_remap():
    v = verdict(SAME_CELL, lost_uffd_wp=("shrink", range(1, N)), no_wp_fault=("touch", range(1, N)))
    names, extra = judged(v, NO_REMAP)
    assert len(names) == 2 and extra == []


def test_a_verdict_without_the_models_pages_is_explained_by_nothing():
    v = verdict(SAME_CELL, lost_uffd_wp=("shrink", MERGED))
    v.pages = {}  # a verdict.json of before: which pages are data is unknown
    assert [(f.kind, f.addresses) for f in judged(v, REMAP)[1]] == [("lost-uffd-wp", va(MERGED))]


def test_findings_keep_every_page_as_runs():
    """Before: addresses cut at 4,096 while a 6.1 cell loses ~16,000 pages; the JSON keeps runs, exact and small."""
    pages = np.nonzero(~Fill().data_mask(16384))[0][63:]  # 16,065 zero subpages, as on 6.1 with use_zero_pages=0
    v = Verdict(scenario=KSM_ZERO_CELL, kernel="6.1.0-57-amd64", region=REGION,
                findings=[Finding.of("lost-uffd-wp", "shrink", va(pages))])
    v.name_pages("zero", np.nonzero(~Fill().data_mask(16384))[0])
    text = v.to_json()
    back = Verdict.from_json(text)
    assert back == v and back.findings[0].count == len(back.findings[0].addresses) == 16065
    assert len(text) < 20_000 and '"addresses"' not in text
    assert back.findings[0].message().startswith("[shrink] 16,065 pages lost their uffd-wp bit")


def test_an_old_verdict_json_with_address_lists_still_reads():
    old = {"scenario": SAME_CELL, "kernel": "6.18.44", "findings": [
        {"kind": "hole", "phase": "p", "count": 5000, "addresses": [4096, 8192], "space": "va", "detail": ""}]}
    v = Verdict.from_json(json.dumps(old))
    assert v.findings[0].addresses == [4096, 8192] and v.findings[0].count == 5000 and v.pages == {}


RWP_SAME_CELL = "snapshot-style[rwp-sync-shrink@after-protect-mpn409-spread8-same-by-ksm]"
RWP_KERNEL = {**REMAP, "uffd_rwp": True}  # Debian 7.3.4


def test_the_rwp_duplicates_finding_is_due_in_rwp_cells_only_and_only_for_its_data_pages():
    """RWP (7.3) shares the uffd-wp PTE bit: KSM's merge drops it from merged duplicates. Its entry explains lost
    bits and unfaulted accesses on the merged data pages of RWP cells; the uffd-wp entry does not apply there."""
    v = verdict(RWP_SAME_CELL, lost_uffd_wp=("shrink@after-protect", MERGED),
                no_rwp_fault=("touch(write, data)", MERGED))
    names, extra = judged(v, RWP_KERNEL)
    assert names == ["ksm-merge-of-duplicates-drops-rwp"] and extra == []
    assert judged(v, REMAP)[0] == []  # a kernel without RWP: not due (the cell skips there anyway)
    worse = verdict(RWP_SAME_CELL, lost_uffd_wp=("shrink@after-protect", [*MERGED, *ZERO[:4]]),
                    no_rwp_fault=("touch(write, data)", [*MERGED, *ZERO[:4]]))
    _, extra = judged(worse, RWP_KERNEL)
    # the zero subpages' lost bits are beyond it (their unfaulted accesses follow from those lost bits)
    assert [(f.kind, f.addresses) for f in extra] == [("lost-uffd-wp", va(ZERO[:4]))]
