"""A THP the kernel tried to split and could not (a transient extra reference: PMD split, folio not,
thp_split_page_failed counted) is named in the notes, not a kernel finding, while the same firing split others;
anything else left whole stays a no-split."""
import numpy as np

from suite.ledger import Ledger
from suite.shrinker import ShrinkResult
from suite.verdict import Verdict


def ledger(name: str) -> Ledger:
    return Ledger(Verdict(scenario="postcopy[x]", kernel="k"), snap=lambda _: None, npages=4096, name=name,
                  space="gpa")


def result(split_pmd: int, split_page: int, failed: int) -> ShrinkResult:
    return ShrinkResult("memcg-v1 memory.force_empty", 0.2, {"thp_split_pmd": split_pmd, "thp_split_page": split_page,
                                                             "thp_split_page_failed": failed})


def test_a_split_the_kernel_tried_and_failed_in_qemu_ram_is_a_note() -> None:
    led = ledger("src")
    left = led.refused_by_a_reference("shrink@precopy-done", np.array([5]), result(128, 127, 1))
    assert left.size == 0
    assert "src: 1 underused THP(s) (gpa 0xa00000)" in led.verdict.notes[0]


def test_a_thp_the_kernel_never_tried_stays_a_no_split() -> None:
    led = ledger("src")
    chunks = np.array([5, 7])
    assert list(led.refused_by_a_reference("p", chunks, result(127, 126, 1))) == [5, 7]  # 1 attempt, 2 left
    assert list(led.refused_by_a_reference("p", chunks, result(128, 128, 0))) == [5, 7]  # none failed
    assert not led.verdict.notes


def test_the_synthetic_region_too_but_never_when_no_split_succeeded() -> None:
    led = ledger("")
    assert list(led.refused_by_a_reference("p", np.array([3]), result(32, 31, 1))) == []  # idle helper, 1 of 32
    assert "p: 1 underused THP(s) (gpa 0x600000)" in led.verdict.notes[0]
    # every split refused: a leaked reference would look like this; it stays a no-split
    assert list(led.refused_by_a_reference("p", np.array([0, 1]), result(2, 0, 2))) == [0, 1]
