"""Real QEMU background snapshots, the shrinker fired before, during and after (issue: the restored RAM must
equal the RAM at snapshot start, and no uffd-wp bit may be lost across the split)."""
from __future__ import annotations

import pytest
from split_rules import assert_split_as_expected

from suite import scenario as sc
from suite.thp import ThpSettings

pytestmark = [pytest.mark.host, pytest.mark.qemu]

THP_SETTINGS = [ThpSettings(max_ptes_none=409), ThpSettings(max_ptes_none=511)]
FILLS = [sc.Fill(8, "spread"), sc.Fill(64, "head")]


@pytest.mark.parametrize("fill", FILLS, ids=lambda f: f.id)
@pytest.mark.parametrize("thp_settings", THP_SETTINGS, ids=lambda t: t.id)
@pytest.mark.parametrize("phase", sc.SNAPSHOT_PHASES[:-1], ids=lambda p: f"shrink@{p}")
def test_snapshot(run, qemu, check_verdict, kernel_features, phase, thp_settings, fill):
    verdict = run(sc.snapshot(phase, fill=fill, thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="src")
