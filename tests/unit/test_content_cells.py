"""The content axis' cells and judging pieces, on constructed data (the live cells are in test_triggers.py)."""
from suite import memory_axes as ma
from suite import scenario as sc
from suite.reports import reproducer
from suite.runner import first_bytes
from suite.uffd import Mismatch


def test_lost_data_control_zeroes_sparse_data_pages_just_before_the_split() -> None:
    s = ma.lost_data_control("pageout")
    ops = [st.op for st in s.steps]
    assert ops[ops.index("shrink") - 1] == "sabotage-zero" and s.fill.content == "sparse"
    assert s.id.endswith("-sabotage-zero-mpn409-spread8-sparse-by-pageout]")
    zeroed = s.selector("sabotage-data")
    assert zeroed.sum() == 8 and not (zeroed & ~s.selector("data")).any()
    assert sc.Scenario.from_json(s.to_json()) == s


def test_first_bytes_names_page_and_offset_of_the_first_few() -> None:
    bad = [Mismatch(i, i + 1, False) for i in range(10)]
    assert first_bytes(bad[:2]) == "first differing byte (page index+offset): 0+0x1, 1+0x2"
    assert first_bytes(bad).endswith("7+0x8, …") and first_bytes([]) == ""


def test_reproducer_of_a_sparse_cell_writes_sparse_bytes_and_judges_lost_data() -> None:
    text = reproducer.generate(ma.lost_data_control())
    assert "#define SPARSE_CONTENT 1" in text and "sparse_content = SPARSE_CONTENT" in text
    assert "static void sparse_spot(" in text and "static long page_difference(" in text  # the helper's own
    assert "NEGATIVE CONTROL: data pages zeroed behind the model's back" in text
    assert "lost-data       a sparse data page" in text
    plain = reproducer.generate(sc.postcopy_style("after-discard", "after-place"))
    assert "#define SPARSE_CONTENT 0" in plain
