"""A kernel without an optional feature skips the cells that need it, naming what it lacks (constructed feature
sets, as ``preflight.local_features`` answers them for a kernel built without CONFIG_KSM, debugfs or mTHP)."""
from __future__ import annotations

from suite.targets import preflight

FULL = {"ksm": True, "debugfs_split": True, "zram": True, "mthp_kb": [16, 32, 64, 2048], "numa_nodes": 1}


def test_a_kernel_with_everything_lacks_nothing() -> None:
    for split in ("shrinker", "pageout", "pageout-swap", "partial-unmap", "debugfs", "ksm", "ksm-zero"):
        assert preflight.lacking(FULL, split, 64) == ""


def test_no_ksm_names_config_ksm_for_both_ksm_triggers_only() -> None:
    no_ksm = {**FULL, "ksm": False}
    for split in ("ksm", "ksm-zero"):
        assert preflight.lacking(no_ksm, split) == (
            f"the {split} split trigger needs what this kernel lacks: no KSM (CONFIG_KSM: no /sys/kernel/mm/ksm)")
    assert preflight.lacking(no_ksm, "pageout") == ""


def test_no_debugfs_and_no_zram_are_named() -> None:
    assert "CONFIG_DEBUG_FS" in preflight.lacking({**FULL, "debugfs_split": False}, "debugfs")
    assert "CONFIG_ZRAM" in preflight.lacking({**FULL, "zram": False}, "pageout-swap")


def test_an_mthp_size_without_its_knob_is_named_with_the_sizes_there() -> None:
    assert preflight.lacking(FULL, "shrinker", 128) == (
        "this kernel has no hugepages-128kB knob (sizes with a knob: 16kB, 32kB, 64kB, 2048kB)")
    assert "none (mTHP came with 6.8)" in preflight.lacking({**FULL, "mthp_kb": []}, "pageout", 64)


def test_the_running_kernel_answers_every_key() -> None:
    features = preflight.local_features()
    assert {"ksm", "debugfs_split", "zram", "mthp_kb", "numa_nodes", "soft_dirty"} <= set(features)
    assert isinstance(features["numa_nodes"], int) and features["numa_nodes"] >= 1
    assert features["mthp_kb"] == sorted(features["mthp_kb"])


def test_numa_nodes_counts_ranges(tmp_path) -> None:
    online = tmp_path / "online"
    online.write_text("0-2,4\n")
    assert preflight.numa_nodes(online) == 4
    assert preflight.numa_nodes(tmp_path / "none") == 1  # no CONFIG_NUMA: no node directory
