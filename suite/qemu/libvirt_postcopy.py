"""Postcopy driven through libvirt's API (kind ``postcopy-libvirt``): the two RAM machines are libvirt domains
(``qemu.libvirt_domains``), the migration is ``migrateToURI3(LIVE|PEER2PEER|POSTCOPY)`` then
``migrateStartPostCopy``, a ``qemu.postcopy_run`` with the same ledger, reads and final compare.

Where libvirt lacks a step, QMP passes through (our own socket on each QEMU), with the suite's bounded waits:
- the holds: libvirt's bandwidths are whole MiB/s, and QEMU sends zero pages in a few bytes each, so 1 MiB/s would
  let precopy converge while held; ``max-bandwidth`` 1 KiB/s and ``max-postcopy-bandwidth`` 4 KiB/s go over QMP;
- the destination exists only once libvirt's migration has prepared it: it is attached (QMP, qtest, ledger) at
  ``mid-precopy``, so a shrink at ``before-migrate`` reaches the source alone;
- libvirt ends the source QEMU when the migration completes: the source is judged against the model right before
  the switch to postcopy (the dirtier halted), the destination at completion.
libvirt cannot hold ``precopy-done`` (the end of the first pass; ``postcopy-running`` passes it with the QMP
family's dirtier before the switch) or ``pre-switchover`` / ``nohugepage-window`` (it drives
pause-before-switchover itself): those phases stay with the QMP-driven family. Every libvirt event of both
connections (lifecycle, migration iteration, job completed with its statistics) goes to ``libvirt-events.txt``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import uuid
from typing import Any

from .. import ledger, pagemap, shrinker
from ..errors import HolecheckError
from ..ledger import Ledger
from ..options import RunOptions
from ..pagemap import PAGE
from ..scenario import Scenario, Step
from ..targets.libvirt_vm import Embed
from ..verdict import Verdict
from ..waits import wait_for
from . import migration
from .libvirt_domains import DestinationDaemon, DomainRamMachine
from .machine import MachineConfig
from .migration_run import MIB, Side
from .postcopy_run import PostcopyRun

ATTACH_TIMEOUT = 60.0  # libvirt prepares the destination: a capabilities probe on a fresh daemon takes seconds


class LibvirtPostcopyRun(PostcopyRun):
    """``PostcopyRun`` whose migration libvirt performs; the phases libvirt can hold are overridden."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.embed = Embed.get()
        self.lv = self.embed.libvirt
        self.events: list[str] = []
        self.job: dict[str, Any] = {}  # the migration thread's outcome: "error" or "done"
        self.thread: threading.Thread | None = None
        self.name = f"holecheck-ram-{uuid.uuid4().hex[:8]}"
        self.uuid = str(uuid.uuid4())
        self.stack.callback(self.save_events)

    # --- plumbing -------------------------------------------------------------------------------------------

    def event(self, side: str, what: str, **data: object) -> None:
        self.events.append(f"{time.time():.3f} {side} {what} {json.dumps(data, default=str)}")

    def watch(self, conn: Any, side: str, dom: Any = None) -> None:
        """Record ``side``'s libvirt events (of ``dom`` only on the shared embedded connection) until the end."""
        lv = self.lv
        ids = [conn.domainEventRegisterAny(dom, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                           lambda _c, d, ev, det, _o: self.event(side, "lifecycle", domain=d.name(),
                                                                                 event=ev, detail=det), None),
               conn.domainEventRegisterAny(dom, lv.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
                                           lambda _c, d, it, _o: self.event(side, "migration-iteration",
                                                                            iteration=it), None),
               conn.domainEventRegisterAny(dom, lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                           lambda _c, d, stats, _o: self.on_job_completed(side, stats), None)]

        def unwatch() -> None:
            for i in ids:
                with contextlib.suppress(Exception):
                    conn.domainEventDeregisterAny(i)

        self.stack.callback(unwatch)

    def on_job_completed(self, side: str, stats: dict[str, Any]) -> None:
        self.event(side, "job-completed", **stats)
        if side == "src" and "memory_postcopy_requests" in stats:
            self.job["postcopy_requests"] = stats["memory_postcopy_requests"]

    def save_events(self) -> None:
        if self.opts.artifacts is not None:
            with contextlib.suppress(OSError):
                (self.opts.artifacts / "libvirt-events.txt").write_text("\n".join(self.events) + "\n")

    def domain_side(self, name: str, incoming: bool) -> Side:
        """A side whose QEMU libvirt starts (source: now; destination: when the migration prepares it)."""
        cg = self.stack.enter_context(shrinker.scope(self.trigger, name))
        config = MachineConfig(mem_mib=self.s.size_mib, accel=self.opts.accel, qemu=self.opts.qemu,
                               incoming=incoming, mem_merge=self.s.split.startswith("ksm"))
        if incoming:
            daemon = self.daemon = self.stack.enter_context(
                DestinationDaemon(self.embed, argv_prefix=cg.wrap if cg else None))
            self.watch(daemon.conn, "dst")
            conn_of, log_path = (lambda: daemon.conn), (lambda: daemon.qemu_log(self.name))
        else:
            conn_of = lambda: self.embed.conn  # noqa: E731
            log_path = lambda: self.embed.dir / "log" / "qemu" / f"{self.name}.log"  # noqa: E731
        machine = DomainRamMachine(config, name=name, dom_name=self.name, dom_uuid=self.uuid,
                                   workdir=self.workdir, conn_of=conn_of, log_path=log_path)
        self.stack.callback(machine.stop)
        self.stack.callback(self.save_machine_artifacts, machine)
        side = self.add_side(name, machine, cg)
        if incoming:  # judged once attached: a shrink before then reaches the source alone
            del self.sides[name]
        return side

    def add_side(self, name: str, machine: DomainRamMachine, cg: Any) -> Side:
        def snapshot(with_thp: bool) -> pagemap.PageStates:
            start, size = machine.ram_mapping()
            return pagemap.snapshot(machine.pid, start, size, with_thp=with_thp)

        book = Ledger(self.v, snapshot, self.s.npages, name, "gpa", judged=name == self.under_test,
                      volatile=self.volatile)
        side = self.sides[name] = Side(name, machine, cg, book)
        return side

    def moved_into(self, side: Side) -> None:
        """The source QEMU starts in our cgroup (libvirt makes none: cgroup_controllers=[]): move it into its memcg
        before its RAM is touched, so the scoped shrinker reaches exactly its pages."""
        if side.cg is not None:
            side.cg.procs.write_text(str(side.machine.pid))

    def migrating(self) -> None:
        if err := self.job.get("error"):
            raise HolecheckError(f"libvirt migration failed: {err}")

    def job_stats(self) -> dict[str, Any]:
        with contextlib.suppress(self.lv.libvirtError):
            return self.src_dom.jobStats()
        return {}

    # --- the phases libvirt can hold ------------------------------------------------------------------------

    def do_before_migrate(self, step: Step) -> None:
        self.src = self.domain_side("src", incoming=False)
        assert isinstance(self.src.machine, DomainRamMachine)
        self.src.machine.launch()
        self.v.qemu = self.src.machine.version
        self.moved_into(self.src)
        self.src_dom = self.src.machine.domain()
        self.watch(self.embed.conn, "src", self.src_dom)
        self.fill(self.src)
        self.dst = self.domain_side("dst", incoming=True)  # the daemon only: libvirt creates the domain
        self.src.ledger.observe(step.phase)

    def do_mid_precopy(self, step: Step) -> None:
        lv = self.lv
        assert isinstance(self.dst.machine, DomainRamMachine)
        sock = self.workdir / "migrate.sock"
        params = {lv.VIR_MIGRATE_PARAM_DEST_XML: self.dst.machine.xml,
                  lv.VIR_MIGRATE_PARAM_URI: f"unix://{sock}",  # QEMU's stream over a socket in our 0700 dir
                  lv.VIR_MIGRATE_PARAM_BANDWIDTH: 8}  # MiB/s, as the QMP-driven family's first pass
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_POSTCOPY

        def perform() -> None:
            try:
                self.src_dom.migrateToURI3(self.daemon.uri, params, flags)
                self.job["done"] = True
            except Exception as exc:  # reported by the phase that waits for it
                self.job["error"] = str(exc)

        # precopy completes once pending RAM fits into downtime × bandwidth (zero pages cost a few bytes each):
        # 1 ms keeps it from converging; libvirt keeps parameters it does not set itself (downtime, postcopy rate)
        self.src_dom.migrateSetMaxDowntime(1, 0)
        self.start_dirtier()  # as the QMP family: dirty pages every sync finds hold precopy open
        migration.set_parameters(self.src.machine, max_postcopy_bandwidth=4096)  # B/s: below libvirt's MiB/s
        self.event("src", "migrateToURI3", flags=flags, uri=self.daemon.uri)
        self.thread = threading.Thread(target=perform, name="libvirt-migrate", daemon=True)
        self.thread.start()
        self.stack.callback(self.abort_job)
        wait_for(lambda: (self.migrating(), migration.query(self.src.machine).get("status"))[1],
                 lambda s: s == "active", what="src: libvirt's migration to become active", timeout=ATTACH_TIMEOUT,
                 interval=0.005, max_interval=0.02)
        # libvirt applies its own downtime as the job starts (300 ms: converges with the dirtier running), so 1 ms
        # goes over QMP once the migration is active
        migration.set_parameters(self.src.machine, downtime_limit=1)
        total = self.s.npages * PAGE  # the first pass takes ~0.6 s: hold it before attaching the destination
        self.wait_ram(lambda r: 0 < r.get("remaining", total) <= total // 2, "half of RAM sent")
        migration.set_parameters(self.src.machine, max_bandwidth=1024)  # hold here
        self.dst.machine.attach(ATTACH_TIMEOUT)
        self.sides["dst"] = self.dst
        self.dst.ledger.observe(step.phase)

    def do_postcopy_running(self, step: Step) -> None:
        self.migrating()
        # the first pass must be over before the switch: a chunk half sent is a whole THP on the destination whose
        # unsent tail QEMU discards at the switch (present, never received). The QMP family's precopy-done does
        # that with its dirtier (else precopy converges and no postcopy happens); libvirt cannot hold it.
        self.do_precopy_done(step)
        assert self.dirtier is not None
        self.dirtier.halt()
        if self.dirtier.error:
            raise HolecheckError(f"dirtier failed: {self.dirtier.error}")
        self.compare(step, self.src, self.model, "the model at the switch")
        self.event("src", "migrateStartPostCopy")  # still held at 1 KiB/s: the dirtier's MiB cannot converge
        self.src_dom.migrateStartPostCopy(0)
        migration.set_parameters(self.src.machine, max_bandwidth=64 * MIB)
        migration.wait_ram_flags(self.dst.machine, present={"um"}, timeout=self.opts.deadline())
        migration.wait_status(self.src.machine, {"postcopy-active"}, timeout=self.opts.deadline())
        self.dst.ledger.observe(step.phase)

    def do_completed(self, step: Step) -> None:
        self.migrating()
        self.src_dom.migrateSetMaxSpeed(8192, self.lv.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY)
        assert self.thread is not None
        wait_for(lambda: (self.migrating(), self.thread.is_alive())[1] if self.thread else False,
                 lambda alive: not alive, what="libvirt's migrateToURI3 to return (migration completed)",
                 timeout=self.opts.deadline(6))
        self.migrating()
        migration.wait_status(self.dst.machine, {"completed"}, timeout=self.opts.deadline(3))
        self.sides.pop("src", None)  # libvirt ended the source QEMU: nothing left to shrink or snapshot there
        self.dst.ledger.observe(step.phase)

    def abort_job(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.src_dom.abortJob()
            self.thread.join(timeout=10)

    # --- judging --------------------------------------------------------------------------------------------

    def ram_stats(self) -> dict:
        stats = self.job_stats()
        if stats:
            return {"postcopy-requests": stats.get("memory_postcopy_requests", "?"),
                    "remaining": stats.get("memory_remaining", 0)}
        return {"postcopy-requests": self.job.get("postcopy_requests", "?")}

    def wait_ram(self, done, what: str) -> dict:
        return wait_for(lambda: migration.query(self.src.machine).get("ram", {}), done, what=f"src: {what}",
                        timeout=self.opts.deadline(3), interval=0.005, max_interval=0.05)

    def final_compare(self) -> None:
        """The destination must hold the model (libvirt ended the source)."""
        self.compare(Step("completed", label="compare"), self.dst, self.model, "the model at completion")


def run(scenario: Scenario, opts: RunOptions) -> Verdict:
    embed = Embed.get()
    with ledger.recorded(scenario) as verdict, contextlib.ExitStack() as stack:
        workdir = embed.dir / f"run-{uuid.uuid4().hex[:8]}"  # inside the embed root: a killed run's is reaped
        workdir.mkdir(mode=0o700)
        stack.callback(shutil.rmtree, workdir, True)
        LibvirtPostcopyRun(scenario, opts, verdict, stack, workdir).execute()
    return verdict
