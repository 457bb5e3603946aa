"""Interrupted at any moment: Ctrl-C or SIGTERM at a chosen point of a holecheck run leaves nothing behind.

Each test runs holecheck itself in a subprocess, as a user would (pytest, ``python -m suite.bisect``,
``python -m kernels.build``), with a private TMPDIR (every socket and private dir holecheck makes lands there)
and a private ``--artifacts`` dir, and where a cold cache is the point, a private ``HOLECHECK_CACHE``. It waits
(bounded) until the run reaches the point — the L1 QEMU is up but the agent has not answered; a scenario runs
inside L1; ``apt-get download`` is fetching into an empty cache; a bisection step's VM runs; ``make bzImage``
compiles; strace holds a real-QEMU destination on the host — then interrupts it the two ways a run ends early:

- ``ctrl-c``: SIGINT to the run's whole process group, as a terminal does;
- ``sigterm``: SIGTERM to the run's process only, as ``kill``, CI timeouts and ``timeout(1)`` do.

After the run has exited (bounded), ``machine_state.leftovers`` checks the machine: no process it started, no
THP knob changed, no cgroup, mount, socket or temp dir left, no half-written cache entry; and the next run
must not trust anything the interrupted one half-wrote.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from machine_state import Baseline, Proc, ProcessWatch, cache_temporaries, leftovers, processes_mentioning

from suite.uffd import cache_root
from suite.waits import wait_for

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "debian:newest-6.12+deb12"
CELL = "tests/test_synthetic.py::test_snapshot_style[shrink@after-protect-mpn409]"
# A real-QEMU cell: inside a TCG L1 it runs for half a minute, long enough to be interrupted mid-way.
L1_CELL = "tests/test_snapshot.py::test_snapshot[shrink@before-snapshot-mpn409-spread8]"
# On the host: strace holds the destination QEMU's uffd registration open for up to 30 s.
STRACE_CELL = "tests/test_postcopy.py::test_postcopy[shrink@nohugepage-window-mpn409-spread8]"
SMALL_DEBIAN = "6.12.57"  # ~34 MB
REACH_TIMEOUT = 300.0  # fetch + boot under TCG on a busy machine; a cold kconfig build
EXIT_TIMEOUT = 300.0  # unwinding: the agent's shutdown (10 s), the session's THP knob lock (shared with other runs)
PYTEST_INTERRUPTED, CLI_INTERRUPTED = 2, 130
SIGNALS = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM}
by_signal = pytest.mark.parametrize("sig", SIGNALS.values(), ids=SIGNALS.keys())


class Point(NamedTuple):
    reached: bool
    seen: str


@dataclass(frozen=True)
class Private:
    """A run's own directories; their paths are how its processes and files are told from anyone else's."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


@pytest.fixture
def private() -> Iterator[Private]:
    # Short and under /tmp: unix socket paths inside it must stay below 108 bytes.
    p = Private(Path(tempfile.mkdtemp(prefix="hcint-", dir="/tmp")))
    p.tmp.mkdir()
    p.artifacts.mkdir()
    yield p
    shutil.rmtree(p.root, ignore_errors=True)


class Run:
    """holecheck in a subprocess (its own process group), its output in a log, its process tree watched."""

    def __init__(self, argv: list[str], private: Private, env: dict[str, str] | None = None,
                 host_knobs: bool = False) -> None:
        self.argv, self.private = argv, private
        self.log = private.root / "run.log"
        self.before = Baseline.take(host_knobs)
        with open(self.log, "wb") as out:
            # SIGINT as a terminal's foreground job has it: a run started from a script's background job (`&`)
            # inherits it ignored, and Ctrl-C would then test nothing
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                         env={**os.environ, "TMPDIR": str(private.tmp), **(env or {})})
        self.watch = ProcessWatch(self.proc.pid)
        self.t0 = time.monotonic()
        self.timeline: list[str] = []  # "reached 21.3 s" …: printed, shown with -s or on failure

    def mark(self, what: str) -> None:
        self.timeline.append(f"{what} {time.monotonic() - self.t0:.1f} s")

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def until(self, what: str, probe: Callable[[list[Proc]], Point], timeout: float = REACH_TIMEOUT) -> str:
        """Wait until ``probe(the run's processes)`` says the point is reached; fail if the run ends first."""

        def look() -> Point:
            procs = self.watch.poll()
            if self.proc.poll() is not None:
                return Point(True, f"exited with {self.proc.returncode}")
            return probe(procs)

        # a tight poll: some points (strace's hold on the host) last a fraction of a second, and a loaded machine
        # walks the process tree slowly
        point = wait_for(look, lambda p: p.reached, what=what, timeout=timeout, interval=0.01, max_interval=0.02)
        self.mark("reached")
        if self.proc.poll() is not None:
            pytest.fail(f"holecheck ended (exit {self.proc.returncode}) before {what}:\n{self.output()}",
                        pytrace=False)
        return point.seen

    def interrupt(self, sig: signal.Signals) -> None:
        self.watch.poll()
        self.mark("interrupted")
        if sig is signal.SIGINT:
            os.killpg(self.proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status, watching the tree until the run has exited."""

        def look() -> int | None:
            self.watch.poll()
            return self.proc.poll()

        wait_for(look, lambda rc: rc is not None, what=f"{self.argv[2]} to exit after the interrupt",
                 timeout=timeout, interval=0.05, max_interval=0.3)
        self.mark("exited")
        return self.proc.returncode

    def kill_all(self) -> None:
        """After a failed test: nothing of ours may outlive it (by pid, only what this run started)."""
        for p in [*self.watch.survivors(), *([self.watch.root] if self.proc.poll() is None else [])]:
            pid = p if isinstance(p, int) else p.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    def assert_unwound(self, exit_code: int, caches: tuple[Path, ...] = (), markers: tuple[str, ...] = ()) -> None:
        """The run exited as an interrupted run of its kind does, and left the machine as it found it."""
        rc = self.finish()
        print(f"{self.argv[2]}: " + ", ".join(self.timeline))
        problems = leftovers(self.before, self.watch, (str(self.private.root), *markers), self.private.tmp, caches)
        if rc != exit_code:
            how = f"killed by signal {-rc}: it did not unwind" if rc < 0 else f"exit status {rc}"
            problems.insert(0, f"{how}; an interrupted run exits with {exit_code}")
        if exit_code == CLI_INTERRUPTED and "Traceback" in self.output():
            problems.append("a traceback instead of one line")
        assert not problems, "the interrupted run:\n  " + "\n  ".join(problems) + f"\nits output:\n{self.output()}"


@pytest.fixture
def start(private: Private) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(argv: list[str], env: dict[str, str] | None = None, host_knobs: bool = False) -> Run:
        runs.append(Run(argv, private, env, host_knobs))
        return runs[-1]

    yield _start
    for r in runs:
        r.kill_all()


def pytest_argv(private: Private, kernel: str, cell: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--kernel={kernel}",
            f"--artifacts={private.artifacts}", cell]


def named(procs: list[Proc], program: str, *words: str) -> list[Proc]:
    """Processes whose command line runs ``program`` and contains every one of ``words``."""
    return [p for p in procs if program in p.cmdline.split(" ", 1)[0] and all(w in p.cmdline for w in words)]


def saw(run: Run, program: str) -> bool:
    return any(program in p.cmdline.split(" ", 1)[0] for p in run.watch.seen.values())


def seen(procs: list[Proc]) -> str:
    return ", ".join(sorted({Path(p.cmdline.split(" ", 1)[0]).name for p in procs})) or "no child yet"


def cpu_seconds(p: Proc) -> float | None:
    """CPU time ``p`` used so far (a VM's vCPUs are its QEMU's threads, under TCG and KVM alike); None: gone."""
    try:
        fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def until_worked(run: Run, what: str, who: Callable[[list[Proc]], list[Proc]], seconds: float) -> None:
    """Wait until ``who`` (of the run's processes) used ``seconds`` more CPU: work under way, measured as work,
    not as wall-clock time (fast with KVM, slow on a loaded machine under TCG). Short-lived processes (compilers)
    count with the last CPU time seen of them."""
    used: dict[tuple[int, int], float] = {}
    start: list[float] = []

    def worked(procs: list[Proc]) -> Point:
        for p in who(procs):
            if (t := cpu_seconds(p)) is not None:
                used[(p.pid, p.start)] = t
        total = sum(used.values())
        start[:] = start or [total]
        return Point(total - start[0] >= seconds, f"{seen(procs)}; {total - start[0]:.1f} CPU s")

    run.until(f"{what} ({seconds:g} CPU s of it)", worked)


def console_says(root: Path, text: str) -> bool:
    """An L1 VM's console (vm/*/console.log under ``root``) shows ``text``."""
    return any(text in log.read_text(errors="replace") for log in root.glob("vm/*/console.log"))


# --- the points ------------------------------------------------------------------------------------------------------

@pytest.mark.vm
@by_signal
def test_during_l1_boot(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    run = start(pytest_argv(private, KERNEL, CELL))
    boot_records = lambda: list(private.artifacts.glob("vm/*/boot.json"))  # noqa: E731 (written at the hello)

    def booting(procs: list[Proc]) -> Point:
        qemu = named(procs, "qemu-system", str(private.artifacts))
        return Point(bool(qemu) and console_says(private.artifacts, "holecheck-init:") and not boot_records(),
                     seen(procs))

    run.until("the L1 VM's init to run (its lines on the console) before the agent answered", booting)
    run.interrupt(sig)
    run.assert_unwound(PYTEST_INTERRUPTED)
    assert not boot_records(), "the agent answered before the interrupt: the boot was not interrupted"
    assert saw(run, "virtiofsd") and saw(run, "qemu-system")


@pytest.mark.vm
@by_signal
def test_during_l1_boot_libvirt(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    """--backend=libvirt: the QEMU libvirt starts is not our descendant (libvirt daemonizes it); it is found by the
    private TMPDIR its command line names (the embed root), and must be gone after the interrupt all the same."""
    run = start([*pytest_argv(private, KERNEL, CELL), "--backend=libvirt"])
    boot_records = lambda: list(private.artifacts.glob("vm/*/boot.json"))  # noqa: E731

    def booting(procs: list[Proc]) -> Point:
        qemu = named(processes_mentioning([str(private.tmp)]), "qemu-system")
        return Point(bool(qemu) and console_says(private.artifacts, "holecheck-init:") and not boot_records(),
                     seen(procs) + f"; libvirt's QEMU: {len(qemu)}")

    run.until("libvirt's L1 VM's init to run (its lines on the console) before the agent answered", booting)
    run.interrupt(sig)
    run.assert_unwound(PYTEST_INTERRUPTED)
    assert not boot_records(), "the agent answered before the interrupt: the boot was not interrupted"
    assert not named(processes_mentioning([str(private.tmp)]), "qemu-system"), "libvirt's QEMU outlived the run"


@pytest.mark.vm
@by_signal
def test_during_scenario_in_l1(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    run = start(pytest_argv(private, KERNEL, L1_CELL))
    # The test's artifacts dir is made once the L1 VM is up; verdict.json is written when the scenario is over.
    cell_dirs = lambda: [d for d in private.artifacts.iterdir() if d.name != "vm"]  # noqa: E731

    def running(procs: list[Proc]) -> Point:
        return Point(bool(cell_dirs()), f"{seen(procs)}; artifacts: {[d.name for d in private.artifacts.iterdir()]}")

    run.until("the scenario to be sent to the agent in L1", running)
    # the agent's runner starts L2 QEMUs inside L1: guest work, seen as the L1 QEMU's CPU time
    until_worked(run, "the scenario to run in L1", lambda procs: named(procs, "qemu-system"), 2.0)
    run.interrupt(sig)
    run.assert_unwound(PYTEST_INTERRUPTED)
    assert not any((d / "verdict.json").exists() for d in cell_dirs()), \
        "the scenario finished before the interrupt: it was not interrupted mid-way"


def _private_apt(cache: Path) -> None:
    """A cold kernel cache whose apt package lists are warm (copied): the point is the download, not the lists."""
    from kernels.apt import Apt

    real = cache_root() / "apt"
    default = Apt.default()
    with default.locked():
        default.update()  # a fresh machine has none yet: the lists are not what this test is about
    shutil.copytree(real, cache / "apt", ignore=shutil.ignore_patterns("archives", "debs", "tmp*", ".lock*"))


@by_signal
def test_during_debian_download(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    _private_apt(private.cache)
    # The mirror is fast here: unthrottled, the 34 MB can land between two looks and the point is never seen.
    # apt reads APT_CONFIG before its own configuration; a rate limit keeps the download going ~10 s.
    (slow := private.root / "apt-slow.conf").write_text(
        'Acquire::http::Dl-Limit "3000";\nAcquire::https::Dl-Limit "3000";\n')
    env = {"HOLECHECK_CACHE": str(private.cache), "APT_CONFIG": str(slow)}
    run = start(pytest_argv(private, f"debian:{SMALL_DEBIAN}", CELL), env)

    def downloading(procs: list[Proc]) -> Point:
        part = [f for f in (private.cache / "apt").glob("debs/.partial-*/*") if f.stat().st_size > 0]
        return Point(bool(named(procs, "apt-get", "download")) and bool(part),
                     f"{seen(procs)}; partial files: {[f'{f.name} {f.stat().st_size}' for f in part]}")

    run.until(f"apt-get download of {SMALL_DEBIAN} to have written some bytes", downloading)
    run.interrupt(sig)
    run.assert_unwound(PYTEST_INTERRUPTED, caches=(private.cache,))
    assert not list((private.cache / "kernels").glob("*/.complete")), "a kernel tree counts as unpacked"
    # The next run must fetch it afresh and get a whole, bootable image.
    fast = {**os.environ, "HOLECHECK_CACHE": env["HOLECHECK_CACHE"], "TMPDIR": str(private.tmp)}
    refetch = subprocess.run([sys.executable, "-m", "kernels.debian", "fetch", SMALL_DEBIAN], cwd=ROOT, env=fast,
                             capture_output=True, text=True, timeout=REACH_TIMEOUT)
    assert refetch.returncode == 0, refetch.stderr
    from kernels.kernel import bzimage_release

    tree = Path(refetch.stdout.strip().splitlines()[-1])
    (image,) = tree.glob("boot/vmlinuz-*")
    assert bzimage_release(image) == image.name.removeprefix("vmlinuz-"), f"{image} is not a whole bzImage"
    assert cache_temporaries(private.cache) == []


@pytest.mark.vm
@by_signal
def test_during_bisect_step(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    bisect_dir = ROOT / ".holecheck" / "bisect"
    before = set(bisect_dir.glob("*")) if bisect_dir.exists() else set()
    run = start([sys.executable, "-m", "suite.bisect", "debian", "--good", "debian:6.12.57", "--bad",
                 "debian:6.12.43", "-k", "snapshot_style and after-protect and mpn409"])
    try:
        def step_vm(procs: list[Proc]) -> Point:
            return Point(bool(named(procs, "qemu-system")), seen(procs))

        run.until("a bisection step's L1 VM to run", step_vm)
        until_worked(run, "the step's L1 VM to boot", lambda procs: named(procs, "qemu-system"), 1.0)
        run.interrupt(sig)
        run.assert_unwound(CLI_INTERRUPTED, markers=tuple(str(p) for p in set(bisect_dir.glob("*")) - before))
        assert any("pytest" in p.cmdline for p in run.watch.seen.values()), "no bisection step ran"
    finally:
        for p in set(bisect_dir.glob("*")) - before:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def build_cache() -> Iterator[tuple[Path, str]]:
    """A private cache whose Debian source tree is the real cache's (a symlink: only read, never copied), so a build
    there starts at once and publishes nothing the real cache would see. Shared by both signals: the second
    build finds the patched tree made and configured."""
    from kernels import linux_source

    # once per machine (~1 min); the power tests build from it too. The version the build picks: the shared cache
    # may hold other versions' sources (another run's pin), against which the patch does not apply
    real = linux_source.fetch_source(linux_source.source_version())
    version = (real.root / "pristine.complete").read_text().strip()
    root = Path(tempfile.mkdtemp(prefix="hcint-build-", dir="/tmp"))
    src = root / "build" / "src" / real.root.name
    src.mkdir(parents=True)
    (src / "pristine").symlink_to(real.root / "pristine")
    shutil.copy(real.root / "pristine.complete", src / "pristine.complete")
    yield root, version
    shutil.rmtree(root, ignore_errors=True)


@by_signal
def test_during_kernel_build(sig: signal.Signals, private: Private, start: Callable[..., Run],
                             build_cache: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, version = build_cache
    run = start([sys.executable, "-m", "kernels.build", "--patched", "--source-version", version, "-j2"],
                {"HOLECHECK_CACHE": str(cache)})
    make_started: list[float] = []

    def compiling(procs: list[Proc]) -> Point:
        if named(procs, "make", "bzImage", str(cache)) and not make_started:
            make_started.append(time.monotonic())
        compilers = named(procs, "cc1") + named(procs, "gcc")
        # interrupt a few seconds into make, with compilers running: never near the end of a build
        return Point(bool(make_started) and (bool(compilers) or time.monotonic() - make_started[0] > 5),
                     seen(procs))

    run.until("make bzImage to compile", compiling)
    until_worked(run, "the compilers to work", lambda procs: named(procs, "cc1") + named(procs, "gcc"), 2.0)
    run.interrupt(sig)
    run.assert_unwound(CLI_INTERRUPTED, caches=(cache,), markers=(str(cache),))
    monkeypatch.setenv("HOLECHECK_CACHE", str(cache))
    from kernels import build, recipe

    assert build.cached(True, version=version) is None, "an interrupted build counts as built"
    assert not list((cache / "build").glob(f"*{recipe.safe_name(version)}-patched-*")), "a cache entry appeared"


@pytest.mark.qemu
@by_signal
def test_during_strace_hold_on_host(sig: signal.Signals, private: Private, start: Callable[..., Run]) -> None:
    """The host as target: THP knobs set, QEMUs in memory cgroups, strace holding the destination."""
    run = start(pytest_argv(private, "host", STRACE_CELL), host_knobs=True)

    def held(procs: list[Proc]) -> Point:
        return Point(bool(named(procs, "strace")), seen(procs))

    run.until("strace to hold the destination QEMU in the nohugepage window", held)
    run.interrupt(sig)
    run.assert_unwound(PYTEST_INTERRUPTED)
    assert saw(run, "qemu-system") and saw(run, "strace")
