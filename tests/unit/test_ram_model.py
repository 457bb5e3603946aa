"""The real-QEMU RAM model (suite/qemu/ram_model.py): every side judged against what holecheck wrote, on
constructed RAM arrays."""
import numpy as np
import pytest

from suite import content
from suite.pagemap import PAGE
from suite.qemu.ram_model import RamModel, judge

NPAGES = 4 * 512  # four 2 MiB chunks


def filled(kind: str = "sparse") -> tuple[RamModel, np.ndarray]:
    """A model filled like a RAM machine (8 spread data pages per chunk above the first) and RAM that holds it."""
    data = (np.arange(NPAGES) % 64 == 0) & (np.arange(NPAGES) >= 512)
    model = RamModel(kind, NPAGES)
    model.fill(data)
    return model, content.expected(kind, data).copy()


@pytest.mark.parametrize("kind", content.CONTENTS)
def test_the_model_is_the_shared_content(kind) -> None:
    model, ram = filled(kind)
    assert np.array_equal(model.pages(0, NPAGES).reshape(-1), ram)
    assert judge(model, ram.tobytes()) == judge(model, ram)
    assert not judge(model, ram).lost and not judge(model, ram).wrong


def test_a_data_page_zeroed_on_both_sides_passed_and_is_now_lost_data_naming_page_and_byte() -> None:
    """A split that turns a source data page into zeros migrates zeros: source and destination agree (the old
    judgement, destination against source, passed); against the model both name the page and its byte."""
    model, src = filled("sparse")
    page = 512 + 64 * 3
    offset, value = content.sparse_spot(page)
    src[page * PAGE + offset] = 0  # the sparse page's one byte: the page now reads as zeros
    dst = src.copy()  # what the migration carried over
    assert not (dst != src).any()  # the old compare: nothing to see
    for side in (src, dst):
        bad = judge(model, side)
        assert bad.lost == [page] and not bad.wrong
        assert bad.first[page] == (offset, 0, value)
        assert bad.describe(bad.lost) == f"gpa {page * PAGE:#x}+{offset:#x} reads 0x00, model {value:#04x}"


def test_a_wrong_nonzero_byte_is_content_and_a_nonzero_zero_page_too() -> None:
    model, ram = filled("unique")
    ram[600 * PAGE + 9] ^= 0x40  # a data page with one bit flipped
    ram[700 * PAGE + 100] = 7  # a zero page that holds data
    bad = judge(model, ram)
    assert bad.wrong == [600, 700] and not bad.lost
    assert bad.first[600][0] == 9 and bad.first[700] == (100, 7, 0)


def test_a_partly_zeroed_data_page_is_content_not_lost_data() -> None:
    model, ram = filled("unique")
    ram[576 * PAGE : 576 * PAGE + 2048] = 0  # half a page: not what a zero-page mapping does
    assert judge(model, ram).wrong == [576]


def test_memsets_are_modelled_and_only_an_unanswered_one_may_have_landed() -> None:
    """The dirtier's pages are known exactly once each memset is acknowledged; one left unanswered makes exactly
    its pages hold either byte — and no third."""
    model, ram = filled("sparse")
    model.memset(256, 256, 3)
    ram[256 * PAGE : 512 * PAGE] = 3
    assert not judge(model, ram).wrong
    model.alt[256:512] = 4  # a memset of 4 sent, never answered
    ram[256 * PAGE : 512 * PAGE] = 4
    assert not judge(model, ram).wrong and model.uncertain.sum() == 256
    ram[300 * PAGE] = 5
    assert judge(model, ram).wrong == [300]
    ram[300 * PAGE] = 4
    ram[600 * PAGE : 601 * PAGE] = 4  # a data page outside the uncertain set holding the in-flight byte
    assert judge(model, ram).wrong == [600]


def test_rewrites_and_copies_are_independent() -> None:
    model, ram = filled("sparse")
    start = model.copy()
    model.rewrite(1024, 4, salt=NPAGES)
    ram2 = ram.copy()
    ram2[1024 * PAGE : 1028 * PAGE] = model.pages(1024, 4).reshape(-1)
    assert not judge(model, ram2).wrong and not judge(start, ram).wrong
    assert judge(start, ram2).wrong == [1024, 1025, 1026, 1027]  # a restored snapshot holding later writes


def test_ram_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="the model has"):
        judge(RamModel("sparse", 4), bytes(PAGE))
