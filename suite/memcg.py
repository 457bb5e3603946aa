"""Memory cgroups that scope the shrinker to the processes under test.

The deferred-split queue is per memcg and a THP is charged to the group of the task that faulted it in, so
a process must be *started* inside its group (``Memcg.wrap``) for scoped reclaim to reach its THPs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError

V1_ROOT = Path("/sys/fs/cgroup/memory")
# "+memory" in the v2 root's subtree_control is host-wide and shared by concurrent runs: whoever enables it leaves
# this marker; the run that removes the last holecheck group (under the lock) takes it back and drops the marker.
SUBTREE_LOCK = Path("/run/holecheck-memcg.lock")
SUBTREE_MARK = Path("/run/holecheck-memcg-enabled-memory")
V2_CANDIDATES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
PREFIX = "holecheck-"


def v2_root() -> Path | None:
    """The cgroup2 mount whose root offers the memory controller to children, if any."""
    for root in V2_CANDIDATES:
        ctrl = root / "cgroup.controllers"
        if ctrl.exists() and "memory" in ctrl.read_text().split():
            return root
    return None


def available() -> str | None:
    """'v2', 'v1' or None: which memory controller can scope a reclaim on this kernel."""
    if v2_root() is not None:
        return "v2"
    if (V1_ROOT / "memory.force_empty").exists():
        return "v1"
    return None


@dataclass
class Memcg:
    path: Path
    version: str  # "v1" or "v2"

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self, argv: list[str]) -> list[str]:
        """argv that runs ``argv`` inside this group from its first instruction (charges land here)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs), *argv]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs.read_text().split()]
        except FileNotFoundError:
            return []

    def reclaim(self) -> None:
        """Reclaim this group: shrinks its deferred-split queue (and its page cache)."""
        if self.version == "v2":
            # no swap: anon cannot go, so the write ends in EAGAIN after the shrinkers ran
            with contextlib.suppress(OSError):
                (self.path / "memory.reclaim").write_text("1G")
        else:
            with contextlib.suppress(OSError):
                (self.path / "memory.force_empty").write_text("0")


@contextlib.contextmanager
def scope(name: str = "") -> Iterator[Memcg]:
    """A fresh child memcg, removed on exit (its tasks moved back to the root group first)."""
    version = available()
    if version is None:
        raise SetupError("no memory cgroup controller (v2 memory or v1 memory.force_empty) to scope the shrinker")
    root = v2_root() if version == "v2" else V1_ROOT
    assert root is not None
    path = root / f"{PREFIX}{name + '-' if name else ''}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with subtree_lock():
        if version == "v2":
            enable_memory(root)
        path.mkdir()
    cg = Memcg(path, version)
    try:
        yield cg
    finally:
        with subtree_lock():
            remove(cg, root)
            if version == "v2":
                restore_subtree(root)


@contextlib.contextmanager
def subtree_lock() -> Iterator[None]:
    try:
        fd = os.open(SUBTREE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # no writable /run: nothing to share it with either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a mkdir/rmdir and one sysfs write: never long
        yield
    finally:
        os.close(fd)


def enable_memory(root: Path) -> None:
    """Let children use the memory controller; mark that holecheck did (it was not on before)."""
    ctl = root / "cgroup.subtree_control"
    if "memory" in ctl.read_text().split():
        return
    with contextlib.suppress(OSError):
        SUBTREE_MARK.write_text(f"{os.getpid()}\n")
        ctl.write_text("+memory")


def restore_subtree(root: Path) -> None:
    """Take "+memory" back if holecheck enabled it and no holecheck group is left (call under the lock)."""
    if not SUBTREE_MARK.exists() or any(p.is_dir() for p in root.glob(PREFIX + "*")):
        return
    with contextlib.suppress(OSError):
        (root / "cgroup.subtree_control").write_text("-memory")
    SUBTREE_MARK.unlink(missing_ok=True)


def remove(cg: Memcg, root: Path) -> None:
    for pid in cg.pids():  # survivors (should be none): move out so the group can go
        with contextlib.suppress(OSError):
            (root / "cgroup.procs").write_text(str(pid))
    with contextlib.suppress(FileNotFoundError):
        cg.path.rmdir()


def leftovers() -> list[Path]:
    """Groups a crashed run left behind (removed by the session fixture): those whose creator is gone. A live
    run's group may be empty for a moment (made, its process not yet in it): it is not a leftover."""
    roots = [r for r in (v2_root(), V1_ROOT) if r is not None and r.exists()]
    return [p for r in roots for p in r.glob(PREFIX + "*") if p.is_dir() and not _creator_alive(p.name)]


def _creator_alive(name: str) -> bool:
    """Is the process that made group ``holecheck-[name-]PID-xxxxxx`` (``scope``) still running?"""
    parts = name.split("-")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    return Path(f"/proc/{parts[-2]}").exists()


