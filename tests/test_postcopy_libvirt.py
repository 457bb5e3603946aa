"""Postcopy managed by libvirt: the RAM machines are libvirt domains and libvirt's API migrates them
(``migrateToURI3`` with POSTCOPY, then ``migrateStartPostCopy``); the shrinker fires at each phase libvirt lets one
hold, and the verdict is the QMP-driven family's: no received page becomes a hole or stalls a reader, and the
destination ends equal to the source."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from split_rules import assert_split_as_expected
from test_postcopy import DST_HAS_THPS, FILLS, THP_SETTINGS

from suite import scenario as sc

pytestmark = [pytest.mark.host, pytest.mark.qemu]


@pytest.mark.parametrize("fill", FILLS[:1], ids=lambda f: f.id)
@pytest.mark.parametrize("thp_settings", THP_SETTINGS, ids=lambda t: t.id)
@pytest.mark.parametrize("phase", sc.LIBVIRT_POSTCOPY_PHASES, ids=lambda p: f"shrink@{p}")
def test_postcopy_libvirt(run, qemu, check_verdict, kernel_features, phase, thp_settings, fill):
    if Path(shutil.which(qemu) or qemu).read_bytes()[:2] == b"#!":
        # measured 2026-12-04: libvirt 9.0 refuses QEMU 11.1.3 run from its own Debian root ("An error occurred,
        # but the cause is unknown"); a plain binary (the system's, a Debian tree, your build) works
        pytest.skip(f"libvirt cannot start {qemu}: a wrapper running QEMU from its own Debian root under that "
                    "root's ld.so; the libvirt-managed family needs a QEMU binary (--qemu=system or a PATH)")
    verdict = run(sc.postcopy_libvirt(phase, fill=fill, thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="dst" if phase in DST_HAS_THPS else "src")
