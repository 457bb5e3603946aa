"""Runs a real-QEMU scenario (postcopy migration or background snapshot) and judges every guest page: the entry
point; ``migration_run`` has what both share, ``postcopy_run`` and ``snapshot_run`` the two kinds."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .. import ledger
from ..options import RunOptions
from ..scenario import Scenario
from ..verdict import Verdict
from .postcopy_run import PostcopyRun
from .snapshot_run import SnapshotRun


def run(scenario: Scenario, opts: RunOptions) -> Verdict:
    cls = PostcopyRun if scenario.kind == "postcopy" else SnapshotRun
    with ledger.recorded(scenario) as verdict, contextlib.ExitStack() as stack, _workdir() as workdir:
        cls(scenario, opts, verdict, stack, workdir).execute()
    return verdict


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="holecheck-") as d:  # 0700: QEMU sockets and the snapshot live here
        yield Path(d)
