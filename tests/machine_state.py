"""What a holecheck run may leave on the machine, checked after it ended (however it ended).

``Baseline.take()`` before the run; a ``ProcessWatch`` records every descendant of the run while it runs (QEMU
and virtiofsd sit in sessions of their own but are still descendants); after the run, ``leftovers(...)`` gives
one line per thing left behind — ``[]`` means the machine is as found:

- a process the run started, still alive; any process whose command line names the run's private paths;
- a host-wide knob not as before (``suite.host_knobs``: THP and mTHP knobs, every KSM knob, the cgroup v2 root's
  subtree_control; read under holecheck's knob lock, so a concurrent holecheck run's scenario is never mistaken
  for a leftover; for runs on the host's kernel: a run whose kernel under test is in a VM sets the knobs inside
  the VM);
- a holecheck memory cgroup named after one of the run's processes (``suite.memcg``: ``holecheck-…-<pid>-…``);
- a mount that was not there before (holecheck's only mount, debugfs for split_huge_pages, is undone);
- anything in the run's private TMPDIR (every socket and private dir is a ``tempfile`` dir), a new holecheck
  entry in /run;
- in a cache directory: a temporary name of holecheck's (``.<name>.XXXXXXXX``, ``tmpXXXXXXXX``, ``*.seeding``,
  ``*.linking``) — a half-written entry that was never renamed into place.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from suite import host_knobs, memcg, procs, thp
from suite.errors import StallError
from suite.waits import wait_for

RUN_DIR = Path("/run")
LOCK_FILE = re.compile(r"\.lock(\.\w+)?$")  # flock targets (the THP knob lock) stay by design
# tempfile's random part is 8 of [a-z0-9_]; holecheck's temporary siblings are ".<final name>.<random>" or
# ".<kind>-<random>" (mkstemp/mkdtemp with a dot prefix) and "tmp<random>" (TemporaryDirectory, no prefix).
TEMP_NAME = re.compile(r"^(\..+[.-][a-z0-9_]{8}|tmp[a-z0-9_]{8}|.+\.(seeding|linking))$")
# Big trees inside the cache that holds no temporaries of holecheck's: not walked.
CACHE_PRUNE = re.compile(r"^(pristine|patched|_obj-.*|state|lib|usr|boot)$")
MEMCG_NAME = re.compile(r"^holecheck-(?:.+-)?(\d+)-[0-9a-f]{6}$")


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks since boot: tells a process from a later one reusing its pid
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.cmdline[:160]}"


def proc_info(pid: int) -> Proc | None:
    """The live, non-zombie process ``pid``, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return Proc(pid, int(fields[19]), cmd or f"[{stat.split('(', 1)[1].rsplit(')', 1)[0]}]")


def alive(p: Proc) -> bool:
    now = proc_info(p.pid)
    return now is not None and now.start == p.start


@dataclass
class ProcessWatch:
    """Every process seen in the tree under ``root`` (call ``poll()`` often while the run runs)."""

    root: int
    seen: dict[tuple[int, int], Proc] = field(default_factory=dict)

    def poll(self) -> list[Proc]:
        """The run's descendants now (recorded)."""
        now = [p for pid in procs.descendants(self.root) if (p := proc_info(pid)) is not None]
        for p in now:  # the latest command line: a child first seen between fork and exec still shows its parent's
            self.seen[(p.pid, p.start)] = p
        return now

    @property
    def pids(self) -> set[int]:
        return {self.root} | {pid for pid, _ in self.seen}

    def survivors(self) -> list[Proc]:
        return [p for p in self.seen.values() if alive(p)]


def processes_mentioning(markers: Iterable[str]) -> list[Proc]:
    """Live processes (other than this one) whose command line contains one of ``markers``."""
    markers = [m for m in markers if m]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            p = proc_info(int(entry.name))
            if p is not None and any(m in p.cmdline for m in markers):
                found.append(p)
    return found


def thp_knobs(timeout: float = 300.0) -> dict[str, str]:
    """The host's knobs (``host_knobs.now()``: THP, mTHP, KSM, subtree_control), read while no holecheck scenario
    has them changed: under the knob lock, polled often (other runs' scenarios take it back to back; a slow poll
    would starve)."""
    if not thp.SYSFS.exists():
        return {}
    fd = os.open(thp.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        wait_for(take, bool, what=f"the THP knob lock {thp.LOCK} to read the knobs", timeout=timeout,
                 interval=0.005, max_interval=0.02)
        return host_knobs.now()
    finally:
        os.close(fd)


def mounts() -> frozenset[str]:
    return frozenset(Path("/proc/self/mounts").read_text().splitlines())


def run_entries() -> frozenset[Path]:
    return frozenset(p for p in RUN_DIR.rglob("holecheck*") if not LOCK_FILE.search(p.name)) \
        if RUN_DIR.is_dir() else frozenset()


@dataclass(frozen=True)
class Baseline:
    thp: dict[str, str] | None  # None: not checked (the run does not target the host's kernel)
    mounts: frozenset[str]
    run: frozenset[Path]

    @classmethod
    def take(cls, host_knobs: bool = True) -> Baseline:
        return cls(thp_knobs() if host_knobs else None, mounts(), run_entries())


def memcgs_of(pids: set[int]) -> list[Path]:
    """holecheck memory cgroups created by one of ``pids`` (suite.memcg names them after the creating pid)."""
    return [p for p in memcg.leftovers() if (m := MEMCG_NAME.match(p.name)) and int(m[1]) in pids]


def cache_temporaries(cache: Path) -> list[Path]:
    """Temporary names of holecheck's inside a cache dir: entries that were never renamed into place."""
    found = []
    for dirpath, dirnames, filenames in os.walk(cache):
        dirnames[:] = [d for d in dirnames if not CACHE_PRUNE.match(d)]
        found += [Path(dirpath) / n for n in [*dirnames, *filenames] if TEMP_NAME.match(n)]
    return sorted(found)


def leftovers(before: Baseline, watch: ProcessWatch, markers: Iterable[str], private_tmp: Path | None = None,
              caches: Iterable[Path] = ()) -> list[str]:
    """One line per thing the run left behind; [] if the machine is as ``before``."""
    markers = list(markers)

    def left_processes() -> list[str]:
        survivors = watch.survivors()
        known = {(p.pid, p.start) for p in survivors}
        return [f"process still running: {p}" for p in survivors] + [
            f"process naming the run's paths: {p}" for p in processes_mentioning(markers)
            if (p.pid, p.start) not in known]

    # a child the run's exit kills (PR_SET_PDEATHSIG, e.g. strace) may still be on its way out when the run's exit
    # status is in: give it a moment, then name whatever is still there
    try:
        out = wait_for(left_processes, lambda left: not left, what="the run's processes to be gone", timeout=3.0,
                       interval=0.05)
    except StallError:
        out = left_processes()
    if before.thp is not None:
        out += [f"host knob {line}" for line in host_knobs.differences(before.thp, thp_knobs())]
    out += [f"memory cgroup left: {p}" for p in memcgs_of(watch.pids)]
    out += [f"new mount: {m}" for m in sorted(mounts() - before.mounts)]
    if private_tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            out += [f"left in the run's TMPDIR: {p}" for p in sorted(private_tmp.iterdir())]
    out += [f"new in /run: {p}" for p in sorted(run_entries() - before.run)]
    for cache in caches:
        out += [f"half-written cache entry: {p}" for p in cache_temporaries(cache)]
    return out
