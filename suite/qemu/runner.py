"""Runs a real-QEMU scenario (postcopy migration or background snapshot) and judges every guest page.

Phases are walked in order; a phase step advances the migration to that point and holds it there (throttles,
pause-before-switchover, strace on the destination's uffd creation), an action step acts where it is held.
After every step the oracle snapshots the side under test, so a finding names the first phase it showed at.
Addresses in findings are guest-physical (the RAM block starts at gpa 0 on ``pc``).
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import ledger, memcg, pagemap, shrinker, split_triggers, thp
from ..errors import HolecheckError, StallError
from ..ledger import Ledger
from ..options import RunOptions
from ..oracle import runs
from ..pagemap import PAGE, PAGES_PER_THP
from ..procs import descendants, signal_all
from ..scenario import Scenario, Step
from ..verdict import Verdict
from ..waits import wait_for
from . import discards, inject, migration
from .machine import MachineConfig, RamMachine

LOW_CHUNKS = 1  # gpa < 2 MiB: ROM/BIOS shadows below 1 MiB and the dirtier's pages; never filled with data
DIRTIER_GPA = 0x100000  # the dirtier rewrites this MiB: far more pending RAM than a 1 ms downtime can take
DIRTIER_PAGES = 256
STAMP = 0x484F4C45_00000000  # "HOLE" | page index: every data page is unique
MIB = 1 << 20
HOLD = 60.0  # strace holds the destination's uffd creation at most this long (released earlier by the driver)


@dataclass
class Side:
    """One QEMU, the memcg it started in, and the oracle's ledger of its RAM (guest-physical addresses)."""

    name: str
    machine: RamMachine
    cg: memcg.Memcg | None
    ledger: Ledger


@dataclass
class Dirtier:
    """Keeps a few source pages dirty through qtest, so precopy never converges while it is held open."""

    machine: RamMachine
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: str = ""

    def start(self) -> None:
        def loop() -> None:
            n = 0
            while not self.stop.is_set():
                try:
                    self.machine.qtest.memset(DIRTIER_GPA, DIRTIER_PAGES * PAGE, n % 255 + 1, timeout=5.0)
                except HolecheckError as exc:
                    self.error = str(exc)
                    return
                n += 1
                self.stop.wait(0.001)

        self.thread = threading.Thread(target=loop, name="holecheck-dirtier", daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


class Aborted(Exception):
    """A stall was recorded; nothing after it can be trusted."""


class MigrationRun:
    def __init__(self, scenario: Scenario, opts: RunOptions, verdict: Verdict, stack: contextlib.ExitStack,
                 workdir: Path) -> None:
        self.s, self.opts, self.v, self.stack, self.workdir = scenario, opts, verdict, stack, workdir
        self.trigger = opts.trigger or scenario.trigger
        self.sides: dict[str, Side] = {}
        self.discards: discards.DiscardLog | None = None  # the judged destination's own discards
        n = scenario.npages
        self.volatile = np.zeros(n, dtype=bool)  # pages the driver itself keeps changing
        first = DIRTIER_GPA // PAGE
        self.volatile[first : first + DIRTIER_PAGES] = True
        self.data = scenario.selector("data") & (np.arange(n) >= LOW_CHUNKS * PAGES_PER_THP)
        # content the model expects to be non-zero: the fill, the dirtier's MiB, and what the scenario writes
        self.nonzero = self.data | self.volatile

    # --- the walk ------------------------------------------------------------------------------------------

    under_test = ""  # the side whose page states the phase records show

    def execute(self) -> None:
        """Each step is a ``do_<op>(step)`` method; a stall aborts the walk (its finding is recorded)."""
        try:
            for step in self.s.steps:
                t0 = time.monotonic()
                getattr(self, step.handler)(step)
                if side := self.sides.get(self.under_test):
                    side.ledger.record(step.phase, t0)
            self.finish()
        except Aborted:
            pass
        except BaseException:
            self.crashed = True  # no verdict: keep what the machines said, for the error's reader
            raise
        finally:
            self.release()
            self.save_traces()
            ledger.save_page_states(self.opts.artifacts, self.s, self.v, [s.ledger for s in self.sides.values()])

    crashed = False  # an error ended the walk (not a finding): artifacts are kept as for a failure

    def keep_artifacts(self) -> bool:
        return self.opts.artifacts is not None and (self.crashed or not self.v.ok)

    def finish(self) -> None:
        """Checks after the last step."""

    def release(self) -> None:
        """Let go of what holds the migration (throttles, strace, a stopped sink); runs whatever happened."""

    # --- machines ------------------------------------------------------------------------------------------

    def start_side(self, name: str, incoming: bool) -> Side:
        cg = self.stack.enter_context(shrinker.scope(self.trigger, name))
        judged = name == self.under_test
        trace_dir = self.workdir / f"{name}-trace"
        if judged and incoming:  # a judged destination logs its own discards (QEMU's trace events)
            trace_dir.mkdir()
        config = MachineConfig(mem_mib=self.s.size_mib, accel=self.opts.accel, qemu=self.opts.qemu,
                               incoming=incoming, memfd=self.s.backing == "memfd",
                               extra_args=tuple(discards.trace_args(trace_dir)) if trace_dir.is_dir() else ())
        machine = self.stack.enter_context(RamMachine(config, name=name, argv_prefix=cg.wrap if cg else None))
        self.v.qemu = machine.version
        self.stack.callback(self.save_machine_artifacts, machine)

        def snapshot(with_thp: bool) -> pagemap.PageStates:
            start, size = machine.ram_mapping()
            return pagemap.snapshot(machine.pid, start, size, with_thp=with_thp)

        taken_back = None
        if trace_dir.is_dir():
            taken_back = self.discards = discards.DiscardLog(
                trace_dir / "trace.log", self.s.npages, lambda: machine.ram_mapping()[0],
                enabled=discards.tracing(machine.qmp))
        # memfd RAM: a zapped shared PTE keeps its page in the cache, so pte_none is no hole (judged by reads)
        book = Ledger(self.v, snapshot, self.s.npages, name, "gpa", judged=judged and self.s.backing != "memfd",
                      volatile=self.volatile, taken_back=taken_back)
        side = self.sides[name] = Side(name, machine, cg, book)
        return side

    def save_traces(self) -> None:
        """On failure: the trace logs of QEMU's discards (the work dir goes before the machines stop)."""
        if not self.keep_artifacts():
            return
        assert self.opts.artifacts is not None
        for trace in self.workdir.glob("*-trace/trace.log"):
            with contextlib.suppress(OSError):
                shutil.copyfile(trace, self.opts.artifacts / f"trace-{trace.parent.name.removesuffix('-trace')}.log")

    def save_machine_artifacts(self, machine: RamMachine) -> None:
        if not self.keep_artifacts():
            return
        assert self.opts.artifacts is not None
        with contextlib.suppress(OSError):
            machine.transcript.write(self.opts.artifacts / f"qmp-{machine.name}.txt")
            (self.opts.artifacts / f"stderr-{machine.name}.txt").write_text(machine.stderr_text())

    def fill(self, side: Side) -> None:
        """Data into the selected subpages of every chunk (above the low chunk), through QEMU's own qtest."""
        q = side.machine.qtest
        for i in np.nonzero(self.data)[0]:
            q.write(int(i) * PAGE, np.full(PAGE // 8, STAMP | int(i), dtype="<u8").tobytes())

    # --- the oracle ----------------------------------------------------------------------------------------

    def shrink(self, step: Step, sides: list[Side]) -> None:
        thp.verify(self.s.thp)
        for side in sides:
            if self.s.split == "shrinker" and not self.s.thp.mthp_kb:
                why_not = "shmem THPs: the underused shrinker splits anonymous THPs only" \
                    if self.s.backing == "memfd" else ""
                before, after = side.ledger.shrink(step.phase, self.trigger, side.cg, self.nonzero, why_not=why_not)
            else:  # another trigger on QEMU's RAM, from outside (process_madvise, debugfs, ksmd with mem-merge)
                start, _ = side.machine.ram_mapping()
                before, after = split_triggers.judged_split(side.ledger, side.machine.pid, start, self.s,
                                                            step.phase, self.trigger, side.cg)
            side.ledger.lost_bits(step.phase, before, after)

    def compare(self, step: Step, side: Side, expected: np.ndarray, what: str) -> None:
        """Every page of ``side``'s RAM must equal ``expected`` (uint8 array of the whole RAM)."""
        got = np.frombuffer(side.machine.read_ram(0, self.s.npages * PAGE), dtype=np.uint8)
        pages = got.reshape(-1, PAGE)
        bad = np.nonzero((pages != expected.reshape(-1, PAGE)).any(axis=1))[0]
        zeros = bad.size and not pages[bad].any()
        side.ledger.report("content", step.phase, bad, what + ("; all zero there" if zeros else ""))


# --- postcopy --------------------------------------------------------------------------------------------------

class PostcopyRun(MigrationRun):
    """Source → destination over a unix socket; the destination is the side under test."""

    under_test = "dst"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hold: migration.HoldUffdRegistration | None = None
        self.dirtier: Dirtier | None = None
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
        return migration.query(machine, timeout=self.opts.timeout)

    def ram_stats(self) -> dict:
        return self.query(self.src.machine).get("ram", {})

    def stalled(self, step: Step, exc: Exception, indices: list[int] | None = None, detail: str = "") -> Aborted:
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
        # precopy completes once pending RAM fits into downtime × bandwidth; the dirtier keeps 1 MiB pending
        migration.set_parameters(self.src.machine, max_bandwidth=8 * MIB, downtime_limit=1,
                                 max_postcopy_bandwidth=4096)
        migration.start_incoming(self.dst.machine, migration.migration_uri(self.dst.machine))
        self.src.ledger.observe(step.phase)
        self.dst.ledger.observe(step.phase)

    def do_mid_precopy(self, step: Step) -> None:
        migration.start_migrate(self.src.machine, migration.migration_uri(self.dst.machine))
        total = self.s.npages * PAGE
        self.wait_ram(lambda r: 0 < r.get("remaining", total) <= total // 2, "half of RAM sent")
        migration.set_parameters(self.src.machine, max_bandwidth=1024)  # hold here
        self.dst.ledger.observe(step.phase)

    def do_precopy_done(self, step: Step) -> None:
        self.dirtier = Dirtier(self.src.machine)
        self.dirtier.start()
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
        self.hold = migration.HoldUffdRegistration(self.dst.machine, hold=HOLD)
        self.hold.attach()
        assert self.dirtier is not None
        # the dirtier runs until the source is paused before the switch: stopped any earlier, precopy may converge
        # before QEMU acts on migrate-start-postcopy (it did under TCG in an L1 VM: the migration then completed
        # as precopy). Its writes before the pause are caught by the last bitmap sync, which follows the pause.
        migration.start_postcopy(self.src.machine)
        try:
            migration.wait_status(self.src.machine, {"pre-switchover"}, timeout=self.opts.timeout)
        finally:
            self.dirtier.halt()
        if self.dirtier.error:
            raise HolecheckError(f"dirtier failed: {self.dirtier.error}")
        self.dst.ledger.observe(step.phase)

    def do_nohugepage_window(self, step: Step) -> None:
        migration.set_parameters(self.src.machine, max_bandwidth=64 * MIB)
        self.src.machine.qmp("migrate-continue", state="pre-switchover")
        assert self.hold is not None
        try:
            self.hold.wait_open(timeout=self.opts.timeout)
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
        migration.wait_ram_flags(self.dst.machine, present={"um"}, timeout=self.opts.timeout)
        migration.wait_status(self.src.machine, {"postcopy-active"}, timeout=self.opts.timeout)
        self.dst.ledger.observe(step.phase)

    def do_completed(self, step: Step) -> None:
        migration.set_parameters(self.src.machine, max_postcopy_bandwidth=1 << 30)
        migration.wait_status(self.src.machine, {"completed"}, timeout=30)
        migration.wait_status(self.dst.machine, {"completed"}, timeout=30)
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
            q.read(int(present[-1]) * PAGE, PAGE, timeout=self.opts.timeout)
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
                q.read(i * PAGE, PAGE, timeout=self.opts.timeout)
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
            got = self.dst.machine.qtest.read(index * PAGE, PAGE, timeout=self.opts.timeout)
        except HolecheckError as exc:
            status = "?"
            with contextlib.suppress(HolecheckError):
                status = self.query(self.src.machine).get("status", "?")
            self.v.notes.append(f"after the stall: the reader was still stuck {time.monotonic() - t0:.1f} s after "
                                f"the source was let go (source status {status}; {exc})")
            return
        waited = time.monotonic() - t0
        with contextlib.suppress(HolecheckError):
            migration.wait_status(self.src.machine, {"completed"}, timeout=self.opts.timeout)
            migration.wait_status(self.dst.machine, {"completed"}, timeout=self.opts.timeout)
            self.final_compare()
        requests = "?"
        with contextlib.suppress(HolecheckError):
            requests = str(self.ram_stats().get("postcopy-requests", "?"))
        self.v.notes.append(f"after the stall: the reader got gpa {index * PAGE:#x} {waited:.1f} s after the source "
                            f"was let go, {'all zero' if not any(got) else 'data'}; source "
                            f"postcopy-requests={requests}")

    def wait_ram(self, done, what: str) -> dict:
        return wait_for(self.ram_stats, done, what=f"src: {what}", timeout=30, interval=0.005, max_interval=0.05)

    def final_compare(self) -> None:
        """After completion the destination must hold exactly the source's RAM."""
        step = Step("completed", label="compare")
        expected = np.frombuffer(self.src.machine.read_ram(0, self.s.npages * PAGE), dtype=np.uint8)
        self.compare(step, self.dst, expected, "destination differs from source")


# --- background snapshot ---------------------------------------------------------------------------------------

class SnapshotRun(MigrationRun):
    """The source is the side under test: its RAM is write-protected with uffd-wp while the snapshot runs."""

    under_test = "src"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.frozen: list[int] = []

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
        self.start_content = np.frombuffer(self.src.machine.read_ram(0, self.s.npages * PAGE), dtype=np.uint8)
        self.src.ledger.observe(step.phase)

    def do_snapshot_running(self, step: Step) -> None:
        self.file = self.workdir / "snapshot.bin"
        migration.start_snapshot(self.src.machine, self.file, self.opts.snapshot_rate)
        migration.wait_ram_flags(self.src.machine, present={"uw"}, timeout=self.opts.timeout)
        self.freeze()
        # settled: QEMU's thread is blocked on the full pipe when two snapshots show the same uffd-wp bits
        prev = [-1]

        def wp_count() -> int:
            n = int(self.src.ledger.snapshot().uffd_wp.sum())
            same, prev[0] = n == prev[0], n
            return n if same else -1

        wait_for(wp_count, lambda n: n >= 0, what="src: the snapshot stream to stall on its stopped sink",
                 timeout=self.opts.timeout, interval=0.02)
        self.src.ledger.observe(step.phase)

    def do_shrink(self, step: Step) -> None:
        self.shrink(step, [self.src])

    def do_write(self, step: Step) -> None:
        """Write the selected pages while the snapshot runs: each write must be trapped and the old content saved."""
        self.thaw()
        sel = self.s.selector(step.pages) & (np.arange(self.s.npages) >= LOW_CHUNKS * PAGES_PER_THP)
        self.nonzero |= sel
        q = self.src.machine.qtest
        for first, count in runs(sel):
            try:
                q.memset(first * PAGE, count * PAGE, 0x5A, timeout=self.opts.timeout)
            except StallError as exc:
                self.src.ledger.stall(step.phase, [first], str(exc))
                raise Aborted() from None
        self.src.ledger.observe(step.phase)

    def do_snapshot_done(self, step: Step) -> None:
        self.thaw()
        migration.wait_status(self.src.machine, {"completed"}, timeout=60)
        self.src.ledger.observe(step.phase)

    def do_restored(self, step: Step) -> None:
        dst = self.start_side("restore", incoming=True)
        migration.restore(dst.machine, self.file, timeout=60)
        self.compare(step, dst, self.start_content, "restored RAM differs from RAM at snapshot start")


# --- entry point -------------------------------------------------------------------------------------------------

def run(scenario: Scenario, opts: RunOptions) -> Verdict:
    cls = PostcopyRun if scenario.kind == "postcopy" else SnapshotRun
    with ledger.recorded(scenario) as verdict, contextlib.ExitStack() as stack, _workdir() as workdir:
        cls(scenario, opts, verdict, stack, workdir).execute()
    return verdict


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="holecheck-") as d:  # 0700: QEMU sockets and the snapshot live here
        yield Path(d)
