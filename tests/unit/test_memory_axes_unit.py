"""Pure parts of the memory axes: scenario ids and JSON, the builders' steps, and the per-THP no-split judgement
on a real capture (tests/data/memory-origin-collapse: the origin negative control on the host, 6.18, where THPs
born by MADV_COLLAPSE were split except chunks 1 and 5, filled behind the model's back)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from suite import memory_axes as ma
from suite import oracle, pagemap
from suite import scenario as sc

DATA = Path(__file__).resolve().parent.parent / "data" / "memory-origin-collapse"


def test_default_axes_keep_every_existing_id():
    s = sc.snapshot_style("after-protect")
    assert s.id == "snapshot-style[shrink@after-protect-mpn409-spread8]"
    assert ma.with_memory(s).id == s.id
    assert ma.with_memory(s, backing="memfd", origin="collapse").id == \
        "snapshot-style[shrink@after-protect-mpn409-spread8-memfd-collapse]"


@pytest.mark.parametrize("scenario", [ma.criu_style("soft-dirty", sabotage=True),
                                      ma.origin_style("read", backing="memfd"),
                                      ma.wp_feature_style("async", "after-register", sabotage=True)],
                         ids=lambda s: s.id)
def test_scenarios_round_trip_through_json(scenario):
    assert sc.Scenario.from_json(scenario.to_json()) == scenario


def test_old_scenario_json_reads_with_default_axes():
    old = (DATA / "scenario.json").read_text().replace('"backing": "anon", ', "").replace(', "origin": "collapse"', "")
    assert sc.Scenario.from_json(old).backing == "anon"


def test_builders_place_the_axes_steps():
    read = ma.with_memory(sc.snapshot_style("after-protect"), origin="read")
    assert [st.phase for st in read.steps[:3]] == ["map(hugepage)", "touch(read)@origin", "place(data)"]
    collapse = ma.with_memory(sc.snapshot_style("after-protect"), origin="collapse", backing="memfd")
    assert [st.phase for st in collapse.steps[:3]] == ["map", "place(data)", "collapse"]
    assert collapse.thp.shmem_enabled == ma.SHMEM_THP
    criu = ma.criu_style("written", sabotage=True)
    assert [st.op for st in criu.steps] == ["map", "place", "register", "clear-written", "touch", "shrink",
                                           "sabotage-clean", "dump", "verify"]
    with pytest.raises(ValueError, match="unknown backing"):
        sc.Scenario(name="x", kind="snapshot-style", steps=(), backing="hugetlb")


def test_skipped_splits_name_the_filled_thps_of_a_real_capture():
    scenario = sc.Scenario.from_json((DATA / "scenario.json").read_text())
    before, _ = pagemap.load(DATA / "pagemap-before-shrink@before-register.npz")
    after, _ = pagemap.load(DATA / "pagemap-after-shrink@before-register.npz")
    nonzero = scenario.selector("data")  # the model: the filled chunks are still underused
    assert oracle.thp_chunks(before) == 32 and oracle.thp_chunks(after) == 2
    assert oracle.skipped_splits(before, after, nonzero, 409).tolist() == [1, 5]
    assert oracle.skipped_splits(before, after, nonzero, 511).tolist() == []  # none due at 511
    truly = nonzero | scenario.selector("sabotage-chunks")  # what the memory held: those two not underused
    assert oracle.skipped_splits(before, after, truly, 409).tolist() == []
    assert np.array_equal(np.unique(np.nonzero(scenario.selector("sabotage-chunks"))[0] // 512), [1, 5])


@pytest.mark.parametrize("mode", ma.RWP_MODES)
def test_rwp_style_steps(mode):
    """RWP (issue 21): register RWP (async where the mode starts async), protect, read every 16th zero subpage,
    split, switch with UFFDIO_SET_MODE where the mode says, then read and write every page (sync) or scan."""
    s = ma.rwp_style(mode, "after-protect", sabotage=True)
    ops = [(st.op, st.arg) for st in s.steps]
    assert s.id == f"snapshot-style[rwp-{mode}-shrink@after-protect-sabotage-mpn409-spread8]"
    assert ops[:6] == [("map", "hugepage"), ("place", ""), ("register", "rwp,async" if mode.startswith("async")
                                                                        else "rwp"),
                       ("rwp", "1"), ("touch", "read"), ("shrink", "")]
    assert (("set-mode", mode.split("-")[-1]) in ops) == ("-" in mode)
    assert ops.index(("sabotage-unrwp", "0")) > ops.index(("shrink", ""))
    assert (("dump", "accessed") in ops) == ("async" in mode)
    assert (("touch", "read") in ops[6:]) == (mode.split("-")[-1] == "sync")  # the sync phase reads every zero subpage
    assert ops[-1] == ("verify", "") and sc.Scenario.from_json(s.to_json()) == s


def test_rwp_style_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown RWP mode"):
        ma.rwp_style("wp-rwp", "after-protect")
