"""One kernel build in one ``make O=`` output dir: the recipe configured in, ``make bzImage`` under ``nice -n 19``
(the machines are shared), the artefacts published into the cache; and the process and lock helpers the
builders share.

Cache (``$HOLECHECK_CACHE``, default ``~/.cache/holecheck``): ``build/<key>/{bzImage,vmlinux,.config,build.log,
build.json}``, ``<key>`` from ``kernels.recipe``. An output dir that completed a ``make bzImage`` carries
``BUILT_MARK``; another output dir of a sibling tree can start as a copy of it (``seed``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from suite.cache import cache_root
from suite.errors import SetupError
from suite.procs import stop_group

from .recipe import BASE_TARGETS, LOCALVERSION, config_problems, recipe_fragment, recipe_sha, wanted_options

log = logging.getLogger(__name__)

TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "perl", "patch", "tar", "xz", "nice")
HEADERS = {"/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
APT_PACKAGES = "flex bison bc libelf-dev libssl-dev build-essential"

CONFIG_TIMEOUT = 600.0  # defconfig builds the kconfig tools first
COPY_TIMEOUT = 900.0
BUILD_TIMEOUT = 4 * 3600.0  # a cold build is ~20-25 min on 2 shared cores; nice 19 can stretch that a lot
BUILT_MARK = ".holecheck-built"  # in an output dir: a make bzImage there has completed (a seed candidate)


def build_root() -> Path:
    return cache_root() / "build"


# --- processes, locks -------------------------------------------------------------------------------------------

def _tail_error(text: str) -> str:
    """The most telling line of a failed build's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"\berror\b", r"\*\*\*", r"Error \d+"):
        hits = [ln for ln in lines if re.search(pattern, ln, re.I)]
        if hits:
            return hits[0] if pattern == r"\berror\b" else hits[-1]
    return lines[-1] if lines else "no output"


def run(argv: list[str], what: str, timeout: float, cwd: Path | None = None, log_path: Path | None = None,
        env: Mapping[str, str] | None = None, capture: bool = False) -> str:
    """Run ``argv`` in its own process group (a timeout kills make's whole tree, not just make).

    Output goes to ``log_path`` (appended) or, with ``capture``, is returned. Failure → one-line SetupError.
    """
    full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
    sink = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed in finally)
    try:
        if sink:
            sink.write(f"\n$ {' '.join(argv)}\n".encode())
            sink.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=sink or subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            where = f"; see {log_path}" if log_path else ""
            raise SetupError(f"{what}: not done within {timeout:g} s, stopped{where}") from None
        except BaseException:  # Ctrl-C, SIGTERM: its own session never saw the signal, so make would go on
            stop_group(proc)
            raise
    finally:
        if sink:
            sink.close()
    text = out.decode(errors="replace") if out is not None else ""
    if proc.returncode != 0:
        if log_path:
            text = log_path.read_text(errors="replace")[-20000:]
        where = f"; see {log_path}" if log_path else ""
        raise SetupError(f"{what} failed (exit {proc.returncode}): {_tail_error(text)}{where}")
    return text if capture else ""


@contextlib.contextmanager
def _try_locked(path: Path) -> Iterator[bool]:
    """flock on ``path`` if free at once: yields False when another process holds it (never waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def preflight() -> None:
    """Every tool and header a kernel build needs, or one line naming what is missing."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    missing += [f"{header} ({pkg})" for header, pkg in HEADERS.items() if not Path(header).exists()]
    if missing:
        raise SetupError(f"cannot build a kernel, missing: {', '.join(missing)} (apt-get install {APT_PACKAGES})")


# --- configure and build ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildInfo:
    """build.json beside the artefacts: what was built, how, and how long it took."""

    key: str
    kind: str  # patched | twin | tree
    source: str  # "linux-source-6.12 6.12.95-1~bpo12+1" or the tree path and HEAD
    patch: str | None
    patch_sha256: str | None
    recipe_sha256: str
    release: str  # uname -r of the built kernel
    jobs: int
    seconds: float
    seeded_from: str | None  # output dir copied before make (patched builds after a twin build)
    finished: str


def configure(src_tree: Path, obj: Path, fragment_text: str, localversion: str, log_path: Path) -> None:
    """allnoconfig with the recipe fragment forced in (KCONFIG_ALLCONFIG), then check every option stuck."""
    obj.mkdir(parents=True, exist_ok=True)
    frag = obj / "holecheck-recipe.config"
    frag.write_text(recipe_fragment(fragment_text, localversion))
    run(["nice", "-n", "19", "make", "-C", str(src_tree), f"O={obj}", f"KCONFIG_ALLCONFIG={frag}", *BASE_TARGETS],
        f"make {' '.join(BASE_TARGETS)} (KCONFIG_ALLCONFIG={frag.name})", CONFIG_TIMEOUT, log_path=log_path)
    problems = config_problems((obj / ".config").read_text(), wanted_options(fragment_text, localversion))
    for line in problems:
        log.error("kconfig: %s", line)
    if problems:
        raise SetupError(f"{len(problems)} kconfig option(s) did not stick after {' '.join(BASE_TARGETS)} "
                         f"({', '.join(p.split(':')[0] for p in problems)}); see {obj / '.config'}")


def _make_bzimage(src_tree: Path, obj: Path, jobs: int, timeout: float, log_path: Path) -> float:
    (obj / BUILT_MARK).unlink(missing_ok=True)
    t0 = time.monotonic()
    # KBUILD_BUILD_USER/HOST: the banner names holecheck, not this machine.
    run(["nice", "-n", "19", "make", "-C", str(src_tree), f"O={obj}", "-j", str(jobs), "bzImage"],
        f"make -j {jobs} bzImage in {obj}", timeout, log_path=log_path,
        env={"KBUILD_BUILD_USER": "holecheck", "KBUILD_BUILD_HOST": "holecheck"})
    seconds = time.monotonic() - t0
    (obj / BUILT_MARK).write_text(f"{seconds:.0f}\n")
    return seconds


def seed(obj: Path, base: Path, base_lock: Path, touch: list[Path]) -> bool:
    """Start ``obj`` as a copy of a completed output dir ``base`` (Kbuild names sources by relative path, so the
    objects stay valid in a sibling tree); ``touch`` the files that differ so make sees them as newer than any
    copied object. False if there is nothing to seed from or the base is busy (a build is running there)."""
    if obj.exists() or not (base / BUILT_MARK).exists():
        return False
    with _try_locked(base_lock) as got:
        if not got:
            return False
        tmp = obj.with_name(obj.name + ".seeding")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            run(["cp", "-a", str(base), str(tmp)], f"cp -a {base} (seeding {obj.name})", COPY_TIMEOUT)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(obj)
    now = time.time()
    for path in touch:
        os.utime(path, (now, now))
    return True


def _release(obj: Path) -> str:
    path = obj / "include/config/kernel.release"
    return path.read_text().strip() if path.exists() else ""


def _publish(obj: Path, out: Path, build_log: Path, info: BuildInfo) -> Path:
    """Copy the artefacts into ``out`` through a temporary sibling: a half-written cache entry is never seen."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the artefacts are for every user of the cache
    try:
        shutil.copy2(obj / "arch/x86/boot/bzImage", tmp / "bzImage")
        shutil.copy2(obj / "vmlinux", tmp / "vmlinux")
        shutil.copy2(obj / ".config", tmp / ".config")
        shutil.copy2(build_log, tmp / "build.log")
        (tmp / "build.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "bzImage"


def published(out: Path) -> Path | None:
    """The bzImage of the cache entry ``out`` if a build completed it."""
    return out / "bzImage" if (out / "build.json").exists() and (out / "bzImage").exists() else None


def configure_and_build(tree: Path, obj: Path, out: Path, fragment_text: str, kind: str, jobs: int,
                        timeout: float, seeded: str | None, source: str, patch_name: str | None = None,
                        patch_sha: str | None = None, localversion: str | None = None) -> Path:
    """Configure ``tree`` into ``obj``, make bzImage there, publish to ``out``; the bzImage path (caller holds
    the output dir's lock). ``localversion``: the release suffix, else the kind's (``LOCALVERSION``)."""
    obj.mkdir(parents=True, exist_ok=True)
    build_log = obj / "holecheck-build.log"
    build_log.write_text(f"# holecheck {kind} build of {source}; output dir {obj}"
                         f"{'; seeded from ' + seeded if seeded else ''}\n")
    log.info("building %s (%s) with -j%d under nice 19 (cold: minutes on 2 idle cores, longer on busy ones); "
             "log: %s", kind, source, jobs, build_log)
    configure(tree, obj, fragment_text, localversion or LOCALVERSION[kind], build_log)
    seconds = _make_bzimage(tree, obj, jobs, timeout, build_log)
    info = BuildInfo(key=out.name, kind=kind, source=source, patch=patch_name, patch_sha256=patch_sha,
                     recipe_sha256=recipe_sha(fragment_text), release=_release(obj), jobs=jobs,
                     seconds=round(seconds, 1), seeded_from=seeded,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    image = _publish(obj, out, build_log, info)
    log.info("built %s %s in %.0f s: %s", kind, info.release, seconds, image)
    return image
