"""What every real-QEMU scenario run shares: its two sides (a RAM machine, its memory cgroup, its page ledger), the
guest-RAM dirtier that keeps a migration from converging, and ``MigrationRun``, which walks the scenario's steps,
fills RAM, fires the split trigger and compares RAM. ``postcopy_run`` and ``snapshot_run`` extend it.

After every step the oracle snapshots the side under test, so a finding names the first phase it showed at.
Addresses in findings are guest-physical (the RAM block starts at gpa 0 on ``pc``).
"""
from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import ledger, memcg, pagemap, shrinker, split_triggers, thp
from ..errors import HolecheckError
from ..ledger import Ledger
from ..options import RunOptions
from ..oracle import runs
from ..pagemap import PAGE, PAGES_PER_THP
from ..scenario import Scenario, Step
from ..verdict import Verdict
from . import discards
from .machine import MachineConfig, RamMachine
from .ram_model import RamModel, judge

LOW_CHUNKS = 1  # gpa < 2 MiB: ROM/BIOS shadows below 1 MiB and the dirtier's pages; never filled with data
DIRTIER_GPA = 0x100000  # the dirtier rewrites this MiB: far more pending RAM than a 1 ms downtime can take
DIRTIER_PAGES = 256
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
    """Keeps a few source pages dirty through qtest, so precopy never converges while it is held open. Each memset
    goes into the model once QEMU acknowledged it; one left unanswered may still land (``RamModel.alt``)."""

    machine: RamMachine
    deadline: float  # per memset: RunOptions.deadline()
    model: RamModel
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: str = ""

    def start(self) -> None:
        def loop() -> None:
            n, first = 0, DIRTIER_GPA // PAGE
            while not self.stop.is_set():
                byte = n % 255 + 1
                self.model.alt[first : first + DIRTIER_PAGES] = byte  # one qtest command: all of it or none
                try:
                    self.machine.qtest.memset(DIRTIER_GPA, DIRTIER_PAGES * PAGE, byte, timeout=self.deadline)
                except HolecheckError as exc:
                    self.error = str(exc)
                    return
                self.model.memset(first, DIRTIER_PAGES, byte)
                n += 1
                self.stop.wait(0.001)

        self.thread = threading.Thread(target=loop, name="holecheck-dirtier", daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=self.deadline + 1)  # its memset is bounded by the deadline

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


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
        # the model's page sets a known finding's signature is stated in; "zero": every page holecheck writes no
        # data into (the fill's zero subpages and the guest's low MiB but the dirtier's)
        verdict.name_pages("data", np.nonzero(self.data)[0])
        verdict.name_pages("zero", np.nonzero(~self.nonzero)[0])
        self.model = RamModel(scenario.fill.content, n)  # what holecheck wrote: every side is judged against it
        self.dirtier: Dirtier | None = None
        self.misread: dict[str, np.ndarray] = {}  # per side: pages already named as differing from the model

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
                               mem_merge=self.s.split.startswith("ksm"),  # ksmd splits here: RAM MADV_MERGEABLE
                               extra_args=tuple(discards.trace_args(trace_dir)) if trace_dir.is_dir() else ())
        machine = self.stack.enter_context(RamMachine(config, name=name, argv_prefix=cg.wrap if cg else None,
                                                      qmp_timeout=self.opts.deadline(),
                                                      startup_timeout=self.opts.deadline(3)))
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
        """Data (``suite.content``) into the selected subpages of every chunk above the low chunk, through QEMU's
        own qtest; the model learns it."""
        self.model.fill(self.data)
        for first, count in runs(self.data):
            side.machine.qtest.write(first * PAGE, self.model.pages(first, count).tobytes())

    def do_sabotage_zero(self, step: Step) -> None:
        """Negative control: zero the non-zero bytes of the selected data pages (a sparse page's one byte) through
        qtest on side ``step.arg``, behind the model's back, as a zero detector that misjudged them would."""
        side = self.sides[step.arg]
        for i in np.nonzero(self.s.selector(step.pages) & self.data)[0]:
            nz = np.nonzero(self.model.pages(int(i), 1)[0])[0]
            side.machine.qtest.write(int(i) * PAGE + int(nz[0]), bytes(int(nz[-1] - nz[0]) + 1))
        side.ledger.observe(step.phase)

    # --- the oracle ----------------------------------------------------------------------------------------

    def shrink(self, step: Step, sides: list[Side]) -> None:
        thp.verify(self.s.thp)
        for side in sides:
            if self.s.split == "shrinker" and not self.s.thp.mthp_kb:
                why_not = "shmem THPs: the underused shrinker splits anonymous THPs only" \
                    if self.s.backing == "memfd" else ""
                split_triggers.made_folios(side.ledger, side.machine.pid, side.machine.ram_mapping()[0], self.s,
                                           step.phase)
                before, after = side.ledger.shrink(step.phase, self.trigger, side.cg, self.nonzero, why_not=why_not,
                                                   origin="QEMU's RAM")
            else:  # another trigger on QEMU's RAM, from outside (process_madvise, debugfs, ksmd with mem-merge)
                start, _ = side.machine.ram_mapping()
                before, after = split_triggers.judged_split(side.ledger, side.machine.pid, start, self.s,
                                                            step.phase, self.nonzero, self.trigger, side.cg)
            side.ledger.lost_bits(step.phase, before, after)

    def compare(self, step: Step, side: Side, model: RamModel, what: str) -> None:
        """Every page of ``side``'s RAM must equal ``model`` (``what``: which state of it); a page is named once
        per side, at the first compare it differs at. Data read as zeros is ``lost-data``, the rest ``content``."""
        if self.dirtier is not None and self.dirtier.running:
            raise HolecheckError(f"{side.name}: RAM compared while the dirtier writes it (a driver fault)")
        got = side.machine.read_ram(0, self.s.npages * PAGE)
        bad = judge(model, got)
        seen = self.misread.setdefault(side.name, np.zeros(self.s.npages, dtype=bool))
        zero_page = side.ledger.snap(False).zero if bad.lost else None
        for kind, pages in (("lost-data", bad.lost), ("content", bad.wrong)):
            if pages := [i for i in pages if not seen[i]]:
                seen[pages] = True
                mapped = f"; {int(zero_page[pages].sum())} map the zero page" if zero_page is not None \
                    and kind == "lost-data" else ""
                side.ledger.report(kind, step.phase, pages,
                                   f"{side.name} RAM vs {what}{mapped}; first differences: {bad.describe(pages)}")
        if (unsure := model.uncertain).any():
            self.v.notes.append(f"{side.name} RAM vs {what}: {int(unsure.sum())} dirtier page(s) (gpa "
                                f"{int(np.nonzero(unsure)[0][0]) * PAGE:#x}…) may hold the byte of its last, "
                                "unanswered memset")


