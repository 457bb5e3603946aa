"""Real QEMU background snapshots, the shrinker fired before, during and after (issue: the restored RAM must
equal the model at snapshot start, the live RAM the model with the writes made meanwhile, and no uffd-wp bit
may be lost across the split)."""
from __future__ import annotations

import numpy as np
import pytest
from split_rules import assert_split_as_expected
from test_postcopy import SPARSE_FILLS, cells

from suite import content
from suite import scenario as sc

pytestmark = [pytest.mark.host, pytest.mark.qemu]


@pytest.mark.parametrize(("phase", "thp_settings", "fill"),
                         cells(sc.SNAPSHOT_PHASES[:-1], ("before-snapshot", "snapshot-done")))
def test_snapshot(run, qemu, check_verdict, kernel_features, phase, thp_settings, fill):
    verdict = run(sc.snapshot(phase, fill=fill, thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="src")


def test_negative_control_snapshot_zeroed_data(run, qemu, check_verdict):
    """Sparse data pages zeroed on the source before the snapshot, behind the model's back: the snapshot saves
    zeros, and the restored RAM must name exactly those pages as lost data, with the byte. The live RAM holds the
    writes made since (they rewrite every data page), so it has nothing to name."""
    scenario = sc.snapshot("before-snapshot", fill=SPARSE_FILLS[0], zeroed_at="before-snapshot")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    zeroed = [int(i) for i in np.flatnonzero(scenario.selector("sabotage-data"))]
    assert [(f.kind, f.phase, f.detail[:11]) for f in verdict.findings] == [("lost-data", "restored", "restore RAM")], \
        verdict.failure_message()
    finding = verdict.findings[0]
    assert finding.addresses == [i * 4096 for i in zeroed] and finding.count == len(zeroed)
    for i in zeroed:
        offset, value = content.sparse_spot(i)
        assert f"gpa {i * 4096:#x}+{offset:#x} reads 0x00, model {value:#04x}" in finding.detail
