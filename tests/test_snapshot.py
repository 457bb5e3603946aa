"""Real QEMU background snapshots, the shrinker fired before, during and after (issue: the restored RAM must
equal the model at snapshot start, the live RAM the model with the writes made meanwhile, and no uffd-wp bit
may be lost across the split)."""
from __future__ import annotations

import pytest
from split_rules import assert_split_as_expected
from test_postcopy import cells

from suite import scenario as sc

pytestmark = [pytest.mark.host, pytest.mark.qemu]


@pytest.mark.parametrize(("phase", "thp_settings", "fill"),
                         cells(sc.SNAPSHOT_PHASES[:-1], ("before-snapshot", "snapshot-done")))
def test_snapshot(run, qemu, check_verdict, kernel_features, phase, thp_settings, fill):
    verdict = run(sc.snapshot(phase, fill=fill, thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="src")
