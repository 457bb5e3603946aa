"""A real QEMU postcopy migration walked phase by phase: each phase step advances the migration to that point and
holds it there (throttles, pause-before-switchover, strace on the destination's uffd creation), an action step
acts where it is held; received pages are read (bounded: a stuck read is a stall) and compared at the end."""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ..errors import HolecheckError, PartyGoneError, StallError
from ..oracle import runs
from ..pagemap import PAGE
from ..scenario import Step
from ..waits import wait_for
from . import inject, migration
from .machine import RamMachine
from .migration_run import (
    DIRTIER_PAGES,
    HOLD,
    MIB,
    Aborted,
    Dirtier,
    MigrationRun,
)


class PostcopyRun(MigrationRun):
    """Source → destination over a unix socket; the destination is the side under test."""

    under_test = "dst"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hold: migration.HoldUffdRegistration | None = None
        self.sabotaged = False  # a negative control punched holes: the reads must show what QEMU does with them

    def finish(self) -> None:
        self.final_compare()
        if self.discards is not None and (note := self.discards.note(besides=self.volatile)):
            self.v.notes.append(note)
        # how QEMU dealt with received pages that were missing (re-requests show here; stalls and zero fills not)
        with contextlib.suppress(HolecheckError):
            self.v.notes.append(f"source postcopy-requests={self.ram_stats().get('postcopy-requests', '?')}")

    def release(self) -> None:
        if self.dirtier:
            self.dirtier.halt()
        if self.hold:
            self.hold.release()

    def query(self, machine: RamMachine) -> dict:
        return migration.query(machine, timeout=self.opts.deadline())

    def start_dirtier(self) -> None:
        self.dirtier = Dirtier(self.src.machine, self.opts.deadline(), self.model)
        self.dirtier.start()

    def ram_stats(self) -> dict:
        return self.query(self.src.machine).get("ram", {})

    def stalled(self, step: Step, exc: Exception, indices: list[int] | None = None, detail: str = "") -> Aborted:
        if gone := self.dst.machine.gone():  # no answer from a QEMU that exited: the run's error, not a finding
            raise PartyGoneError(f"{gone}: {exc}") from exc
        requests = "?"
        with contextlib.suppress(HolecheckError):
            requests = str(self.ram_stats().get("postcopy-requests", "?"))
        text = f"{exc}; source postcopy-requests={requests}" + (f"; {detail}" if detail else "")
        self.dst.ledger.stall(step.phase, indices or [], text)
        return Aborted()

    # phases

    def do_before_migrate(self, step: Step) -> None:
        self.src = self.start_side("src", incoming=False)
        self.dst = self.start_side("dst", incoming=True)
        self.fill(self.src)
        migration.set_variant(self.src.machine, self.s.variant, pause_before_switchover=True)
        migration.set_variant(self.dst.machine, self.s.variant)
        # precopy completes once pending RAM fits into downtime × bandwidth; the dirtier keeps 1 MiB pending.
        # That bandwidth is QEMU's measured one, which spikes when a hold is lifted (under TCG in an L1 VM it let
        # mid-precopy cells converge); QEMU >= 8.2 takes a fixed one instead: 1 MiB/s × 1 ms, only an empty
        # dirty bitmap converges, and RAM (postcopiable) never blocks migrate-start-postcopy
        fixed = {"avail_switchover_bandwidth": MIB} \
            if "avail-switchover-bandwidth" in self.src.machine.qmp("query-migrate-parameters") else {}
        migration.set_parameters(self.src.machine, max_bandwidth=8 * MIB, downtime_limit=1,
                                 max_postcopy_bandwidth=4096, **fixed)
        migration.start_incoming(self.dst.machine, migration.migration_uri(self.dst.machine))
        self.src.ledger.observe(step.phase)
        self.dst.ledger.observe(step.phase)

    def do_mid_precopy(self, step: Step) -> None:
        # the dirtier runs from here on: a throttle alone does not hold precopy open (QEMU 11.1 under TCG in an L1
        # VM sent the rest of RAM through a 1 KiB/s hold and converged); dirty pages that every sync finds do
        self.start_dirtier()
        migration.start_migrate(self.src.machine, migration.migration_uri(self.dst.machine))
        total = self.s.npages * PAGE
        self.wait_ram(lambda r: 0 < r.get("remaining", total) <= total // 2, "half of RAM sent")
        migration.set_parameters(self.src.machine, max_bandwidth=1024)  # hold here
        self.dst.ledger.observe(step.phase)

    def do_precopy_done(self, step: Step) -> None:
        # not faster: QEMU's bandwidth estimate spikes after a throttle is lifted, and at 64 MiB/s it then thinks
        # the dirtier's 1 MiB fits into 1 ms of downtime (converged in 2 of 4 runs; 0 of 4 at 8 MiB/s)
        migration.set_parameters(self.src.machine, max_bandwidth=8 * MIB)
        # a bitmap sync alone is no proof the pass is over: QEMU 11.1 syncs within the first pass, and a chunk it
        # has half sent is a whole THP on the destination whose unsent tail QEMU discards at the switch (and
        # re-requests): pages present, never received. Only the dirtier's pages may still be pending here.
        pending = 2 * DIRTIER_PAGES * PAGE
        self.wait_ram(lambda r: r.get("dirty-sync-count", 0) >= 2 and r.get("remaining", pending + 1) <= pending,
                      f"the first full pass (dirty-sync-count >= 2, at most {pending >> 20} MiB remaining)")
        migration.set_parameters(self.src.machine, max_bandwidth=1024)  # hold: the dirtier keeps pages pending
        if (status := self.query(self.src.machine).get("status")) != "active":
            raise HolecheckError(f"src: precopy converged during {step.phase} (status {status!r}) before postcopy "
                                 "could be asked for: the dirtier kept too few pages pending (slow qtest, e.g. TCG)")
        self.dst.ledger.observe(step.phase)

    def do_pre_switchover(self, step: Step) -> None:
        self.hold = migration.HoldUffdRegistration(self.dst.machine, hold=HOLD, advise_timeout=self.opts.deadline())
        self.hold.attach()
        assert self.dirtier is not None
        # the dirtier runs until the source is paused before the switch: stopped any earlier, precopy may converge
        # before QEMU acts on migrate-start-postcopy (it did under TCG in an L1 VM: the migration then completed
        # as precopy). Its writes before the pause are caught by the last bitmap sync, which follows the pause.
        migration.start_postcopy(self.src.machine)
        try:
            migration.wait_status(self.src.machine, {"pre-switchover"}, timeout=self.opts.deadline())
        finally:
            self.dirtier.halt()
        if self.dirtier.error:
            raise HolecheckError(f"dirtier failed: {self.dirtier.error}")
        # the source's RAM as the switch will send it: nothing writes it from here on
        self.compare(step, self.src, self.model, "the model at the switch")
        self.dst.ledger.observe(step.phase)

    def do_nohugepage_window(self, step: Step) -> None:
        migration.set_parameters(self.src.machine, max_bandwidth=64 * MIB)
        self.src.machine.qmp("migrate-continue", state="pre-switchover")
        assert self.hold is not None
        try:
            self.hold.wait_open(timeout=self.opts.deadline())
        except StallError as exc:  # say why the switch never came: the source's state, the destination's words
            src = {}
            with contextlib.suppress(HolecheckError):
                src = self.query(self.src.machine)
            raise StallError(f"{exc}; source status {src.get('status', '?')!r}"
                             + (f" ({src['error-desc']})" if src.get("error-desc") else "")
                             + f"; destination said: {self.dst.machine.log_tail(3) or '(nothing)'}") from None
        self.dst.ledger.observe(step.phase)

    def do_postcopy_running(self, step: Step) -> None:
        assert self.hold is not None
        self.hold.release()
        migration.wait_ram_flags(self.dst.machine, present={"um"}, timeout=self.opts.deadline())
        migration.wait_status(self.src.machine, {"postcopy-active"}, timeout=self.opts.deadline())
        self.dst.ledger.observe(step.phase)

    def do_completed(self, step: Step) -> None:
        migration.set_parameters(self.src.machine, max_postcopy_bandwidth=1 << 30)
        migration.wait_status(self.src.machine, {"completed"}, timeout=self.opts.deadline(3))
        migration.wait_status(self.dst.machine, {"completed"}, timeout=self.opts.deadline(3))
        self.dst.ledger.observe(step.phase)

    # actions

    def do_shrink(self, step: Step) -> None:
        sides = [self.sides[n] for n in (("src", "dst") if step.arg == "both" else (step.arg,)) if n in self.sides]
        self.shrink(step, sides)

    def do_sabotage_punch(self, step: Step) -> None:
        """Negative control: holes in received pages, as a kernel that leaves pte_none after a split would."""
        start, _ = self.dst.machine.ram_mapping()
        sel = self.s.selector(step.pages) & self.dst.ledger.placed
        inject.madvise_in(self.dst.machine.pid, [(start + f * PAGE, n * PAGE) for f, n in runs(sel)])
        self.sabotaged = True
        self.dst.ledger.observe(step.phase)

    def do_read_received(self, step: Step) -> None:
        """QEMU's own bounded reads (qtest) of the received pages a vCPU could stall on: those not present.

        A present page cannot fault, so reading it proves nothing; a received page that is pte_none raises a
        MISSING fault QEMU ignores (it is in its received set), and the reader waits for ever. (/proc/PID/mem is
        no substitute: a remote read of a missing page gets SIGBUS at once, and QEMU never sees a fault.)
        """
        states = self.dst.ledger.snapshot()
        q = self.dst.machine.qtest
        present = np.nonzero(self.dst.ledger.placed & states.present)[0]
        if present.size:  # liveness: the destination answers reads of what it has
            q.read(int(present[-1]) * PAGE, PAGE, timeout=self.opts.deadline())
        missing = [int(i) for i in np.nonzero(self.dst.ledger.missing(states))[0]]
        watched = self.sabotaged or bool(missing)  # what QEMU does with a missing page is worth a note
        if watched and not self.in_postcopy():
            # the throttle did not hold postcopy (QEMU >= 10 sends ~64 pages per rate window): no reader can stall
            self.v.notes.append("postcopy was over before the reads: the destination's RAM is no longer "
                                "userfaultfd-registered, so no reader could stall on a missing page")
            watched = False
        waited = 0.0
        for n, i in enumerate(missing):
            t0 = time.monotonic()
            try:
                q.read(i * PAGE, PAGE, timeout=self.opts.deadline())
            except StallError as exc:
                aborted = self.stalled(step, exc, missing[n:], (
                    f"{len(missing)} received page(s) are pte_none; QEMU will not re-request a page in its "
                    "received set, so the faulting reader (a vCPU, here qtest) waits for ever"))
                self.after_stall(i)
                raise aborted from None
            waited = max(waited, time.monotonic() - t0)
        if watched and missing:  # every read returned: at once, or only when postcopy was over?
            self.v.notes.append(f"reads of {len(missing)} missing received page(s) returned, the longest after "
                                f"{waited:.2f} s; postcopy {'still ran' if self.in_postcopy() else 'was over'} "
                                "after them")
        self.dst.ledger.observe(step.phase)

    def in_postcopy(self) -> bool:
        """The destination's RAM is still userfaultfd-registered (a missing page still faults to QEMU)."""
        return "um" in self.dst.machine.ram_flags()

    def after_stall(self, index: int) -> None:
        """What QEMU does for a reader stuck on a missing received page once the migration may end: the source
        is let go, the page read again (the stuck read is answered first), both RAMs compared. Noted in the
        verdict, so the report says per QEMU what a stalled vCPU finally gets."""
        t0 = time.monotonic()
        try:
            migration.set_parameters(self.src.machine, max_postcopy_bandwidth=1 << 30)
            got = self.dst.machine.qtest.read(index * PAGE, PAGE, timeout=self.opts.deadline())
        except HolecheckError as exc:
            status = "?"
            with contextlib.suppress(HolecheckError):
                status = self.query(self.src.machine).get("status", "?")
            self.v.notes.append(f"after the stall: the reader was still stuck {time.monotonic() - t0:.1f} s after "
                                f"the source was let go (source status {status}; {exc})")
            return
        waited = time.monotonic() - t0
        with contextlib.suppress(HolecheckError):
            migration.wait_status(self.src.machine, {"completed"}, timeout=self.opts.deadline())
            migration.wait_status(self.dst.machine, {"completed"}, timeout=self.opts.deadline())
            self.final_compare()
        requests = "?"
        with contextlib.suppress(HolecheckError):
            requests = str(self.ram_stats().get("postcopy-requests", "?"))
        self.v.notes.append(f"after the stall: the reader got gpa {index * PAGE:#x} {waited:.1f} s after the source "
                            f"was let go, {'all zero' if not any(got) else 'data'}; source "
                            f"postcopy-requests={requests}")

    def wait_ram(self, done, what: str) -> dict:
        return wait_for(self.ram_stats, done, what=f"src: {what}", timeout=self.opts.deadline(3), interval=0.005,
                        max_interval=0.05)

    def final_compare(self) -> None:
        """After completion the destination, and the source while it is there, must hold exactly the model: what
        holecheck wrote (a source data page both sides lost is a finding on both)."""
        step = Step("completed", label="compare")
        for side in (self.dst, self.sides.get("src")):
            if side is not None:
                self.compare(step, side, self.model, "the model at completion")


