"""The content axis: the model's bytes of a data page (suite/content.py)."""
import numpy as np
import pytest

from suite import content


def test_sparse_pages_have_one_nonzero_byte_and_are_unique() -> None:
    n = 8192 * 2
    spots = {content.sparse_spot(i) for i in range(n)}
    assert len(spots) == n  # no two sparse pages alike: KSM has nothing to merge among them
    for i in (0, 1, 64, 512, 4095, 4096, 70000):
        raw = np.frombuffer(content.page("sparse", i), dtype=np.uint8)
        assert np.count_nonzero(raw) == 1


def test_sparse_offsets_reach_every_part_of_a_page_even_for_spread_layouts() -> None:
    # the spread8 layout places data at multiples of 64: its offsets must not all share a stride
    offsets = {content.sparse_spot(i)[0] for i in range(0, 4096 * 8, 64)}
    assert 0 in {content.sparse_spot(i)[0] for i in range(4096)}
    assert 4095 in {content.sparse_spot(i)[0] for i in range(4096)}
    assert len({o % 64 for o in offsets}) > 16 and min(offsets) < 256 and max(offsets) > 3840


def test_unique_and_same_pages_are_stamps() -> None:
    assert content.page("unique", 5)[:8] == (content.STAMP | 5).to_bytes(8, "little")
    assert content.page("same", 5) == content.page("same", 6)
    with pytest.raises(ValueError, match="unknown fill content"):
        content.page("random", 0)


def test_expected_and_first_difference() -> None:
    data = np.array([False, True, False, True])
    ram = content.expected("sparse", data).reshape(4, content.PAGE)
    assert not ram[0].any() and not ram[2].any()
    offset, value = content.sparse_spot(3)
    assert ram[3][offset] == value
    assert content.first_difference(bytes(content.PAGE), ram[3]) == offset
    assert content.first_difference(ram[1], ram[1]) == -1
