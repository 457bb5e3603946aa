"""A real QEMU background snapshot: write-protect, write while it runs, restore into a fresh QEMU. Both RAMs are
judged against the model: the restored one against the model at the snapshot's start, the live source against the
model with the writes made while the snapshot ran."""
from __future__ import annotations

import signal

import numpy as np

from ..errors import PartyGoneError, StallError
from ..oracle import runs
from ..pagemap import PAGE, PAGES_PER_THP
from ..procs import descendants, signal_all
from ..scenario import Step
from ..waits import wait_for
from . import migration
from .migration_run import (
    LOW_CHUNKS,
    Aborted,
    MigrationRun,
)
from .ram_model import RamModel

WRITTEN = 0x5A  # the byte the snapshot's writes fill unique and same pages with


class SnapshotRun(MigrationRun):
    """The source is the side under test: its RAM is write-protected with uffd-wp while the snapshot runs."""

    under_test = "src"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.frozen: list[int] = []
        self.at_start: RamModel | None = None  # the model when the snapshot began: what it must restore

    def release(self) -> None:
        self.thaw()

    def freeze(self) -> None:
        """Stop the stream's sink: QEMU's snapshot thread soon blocks on the pipe and un-protects nothing more,
        so the uffd-wp bits before and after a shrink can be compared exactly."""
        self.frozen = descendants(self.src.machine.pid)
        signal_all(self.frozen, signal.SIGSTOP)

    def thaw(self) -> None:
        signal_all(self.frozen, signal.SIGCONT)
        self.frozen = []

    def do_before_snapshot(self, step: Step) -> None:
        self.src = self.start_side("src", incoming=False)
        self.fill(self.src)
        self.src.ledger.observe(step.phase)

    def do_snapshot_running(self, step: Step) -> None:
        self.file = self.workdir / "snapshot.bin"
        self.at_start = self.model.copy()
        migration.start_snapshot(self.src.machine, self.file, self.opts.snapshot_rate)
        migration.wait_ram_flags(self.src.machine, present={"uw"}, timeout=self.opts.deadline())
        self.freeze()
        # settled: QEMU's thread is blocked on the full pipe when two snapshots show the same uffd-wp bits
        prev = [-1]

        def wp_count() -> int:
            n = int(self.src.ledger.snapshot().uffd_wp.sum())
            same, prev[0] = n == prev[0], n
            return n if same else -1

        wait_for(wp_count, lambda n: n >= 0, what="src: the snapshot stream to stall on its stopped sink",
                 timeout=self.opts.deadline(), interval=0.02)
        self.src.ledger.observe(step.phase)

    def do_shrink(self, step: Step) -> None:
        self.shrink(step, [self.src])

    def do_write(self, step: Step) -> None:
        """Write the selected pages while the snapshot runs: each write must be trapped and the old content saved.
        Sparse content writes sparse pages of other indices (the zero detector stays under test for a shrink after
        the writes); the others fill each page with WRITTEN."""
        self.thaw()
        sel = self.s.selector(step.pages) & (np.arange(self.s.npages) >= LOW_CHUNKS * PAGES_PER_THP)
        self.nonzero |= sel
        q = self.src.machine.qtest
        for first, count in runs(sel):
            try:
                if self.s.fill.content == "sparse":
                    self.model.rewrite(first, count, salt=self.s.npages)
                    q.write(first * PAGE, self.model.pages(first, count).tobytes(), timeout=self.opts.deadline())
                else:
                    q.memset(first * PAGE, count * PAGE, WRITTEN, timeout=self.opts.deadline())
                    self.model.memset(first, count, WRITTEN)
            except StallError as exc:
                if gone := self.src.machine.gone():  # no answer from a QEMU that exited: the run's error
                    raise PartyGoneError(f"{gone}: {exc}") from exc
                self.src.ledger.stall(step.phase, [first], str(exc))
                raise Aborted() from None
        self.src.ledger.observe(step.phase)

    def do_snapshot_done(self, step: Step) -> None:
        self.thaw()
        migration.wait_status(self.src.machine, {"completed"}, timeout=self.opts.deadline(6))
        self.src.ledger.observe(step.phase)

    def do_restored(self, step: Step) -> None:
        dst = self.start_side("restore", incoming=True)
        migration.restore(dst.machine, self.file, timeout=self.opts.deadline(6))
        assert self.at_start is not None
        self.compare(step, dst, self.at_start, "the model at the snapshot's start")
        self.compare(step, self.src, self.model, "the model with the writes made while the snapshot ran")


