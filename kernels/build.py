"""Build a kernel under test from source, configured for holecheck.

Two kinds of tree:

- Debian's ``linux-source-6.12`` (bookworm-backports, fetched through the private apt configuration of
  ``kernels.debian``): the *twin* as Debian ships it, and the *patched* kernel, the same source plus a known-bad
  patch from ``kernels/patches/`` (by default the re-creation of the series' v1 behaviour, which leaves holes).
  ``build(patched)`` returns the bzImage.
- A user's git tree (``--kernel=build:LINUX_TREE``, bisection): ``build_tree(tree)``.

Config recipe, the same for all: ``make allnoconfig`` with ``minimal.config``, ``holecheck.config`` and
``EXTRAS`` (no modules, PVH entry, /proc/config.gz, no PCI) forced through ``KCONFIG_ALLCONFIG``, and every
requested option checked in the final ``.config``: nothing holecheck does not need is compiled (a cold build is
minutes on 2 cores; a defconfig took 20-50). ``make -j N bzImage`` runs under ``nice -n 19``: the machines are
shared.

Cache (``$HOLECHECK_CACHE``, default ``~/.cache/holecheck``)::

    build/<key>/{bzImage,vmlinux,.config,build.log,build.json}   key: source version, patch sha256, recipe sha256
    build/src/<version>/pristine/                                Debian's tree, extracted once
    build/src/<version>/patched/                                 hard links to pristine + private patched files
    build/src/<version>/{pristine,patched}/_obj-*/               make O= output dirs (kept: incremental rebuilds)
    build/trees/<path hash>-<recipe>/                            O= output dir of a user's tree

The output dirs sit directly inside their source tree on purpose: Kbuild then names the source ``..`` in every
command line instead of an absolute path, so a patched output dir can start as a copy of the twin's (``_seed``)
and recompile only what the patch touches. The patched tree shares inodes with pristine: never edit its files in
place (that would edit pristine too); change the patch, and the next build re-applies it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from suite import locks
from suite.cache import cache_root
from suite.errors import SetupError
from suite.procs import sigterm_unwinds, stop_group

from . import config_check, debian

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FRAGMENT = HERE / "holecheck.config"
BASE_FRAGMENT = HERE / "minimal.config"
DEFAULT_PATCH = HERE / "patches" / "0001-mm-leave-zero-subpages-pte_none-after-underused-split.patch"
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_RELEASE = "bookworm-backports"  # the release the patch was made against; an exact version may be pinned
TARBALL = f"usr/src/{SOURCE_PACKAGE}.tar.xz"

BASE_TARGETS = ("allnoconfig",)
# On top of the fragments: MODULES=n so the kernel boots with no initramfs modules; PVH so QEMU can boot the
# uncompressed vmlinux on microvm (which has no PCI: holecheck.config's optional VIRTIO_PCI is left out);
# IKCONFIG_PROC so a booted kernel shows its config.
EXTRAS: dict[str, str] = {"MODULES": "n", "PVH": "y", "IKCONFIG": "y", "IKCONFIG_PROC": "y", "VIRTIO_PCI": "n"}
# uname -r tells which kernel booted: 6.12.95-holecheck-holes vs 6.12.95-holecheck-twin.
LOCALVERSION = {"patched": "-holecheck-holes", "twin": "-holecheck-twin", "tree": "-holecheck"}
RECIPE_VERSION = 2  # bump when the recipe changes in a way the texts below do not show

TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "perl", "patch", "tar", "xz", "nice")
HEADERS = {"/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
APT_PACKAGES = "flex bison bc libelf-dev libssl-dev build-essential"

CONFIG_TIMEOUT = 600.0  # defconfig builds the kconfig tools first
EXTRACT_TIMEOUT = 900.0
PATCH_TIMEOUT = 120.0
COPY_TIMEOUT = 900.0
GIT_TIMEOUT = 60.0
BUILD_TIMEOUT = 4 * 3600.0  # a cold build is ~20-25 min on 2 shared cores; nice 19 can stretch that a lot
BUILT_MARK = ".holecheck-built"  # in an output dir: a make bzImage there has completed (a seed candidate)


# --- pure parts -------------------------------------------------------------------------------------------------

def recipe_text() -> str:
    """What the recipe forces onto allnoconfig: the minimal base, then holecheck.config (later lines win)."""
    return BASE_FRAGMENT.read_text().rstrip("\n") + "\n\n" + FRAGMENT.read_text()


def recipe_fragment(fragment_text: str, localversion: str) -> str:
    """The fragment KCONFIG_ALLCONFIG forces onto allnoconfig: the recipe text, then EXTRAS and LOCALVERSION
    (later lines win)."""
    lines = [fragment_text.rstrip("\n"), "", "# --- kernels/build.py EXTRAS"]
    for option, value in EXTRAS.items():
        lines.append(f"# CONFIG_{option} is not set" if value == "n" else f"CONFIG_{option}={value}")
    lines.append(f'CONFIG_LOCALVERSION="{localversion}"')
    return "\n".join(lines) + "\n"


def recipe_sha(fragment_text: str) -> str:
    """sha256 of everything that shapes the config: base targets, the fragment, EXTRAS, the recipe version."""
    blob = json.dumps({"base": BASE_TARGETS, "fragment": fragment_text, "extras": EXTRAS,
                       "version": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(text: str) -> str:
    """A version as a path component Kbuild and shells are happy with: 6.12.95-1~bpo12+1 → 6.12.95-1_bpo12+1."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def cache_key(version: str, patch_sha: str | None, config_sha: str) -> str:
    """Artefact dir name: what was built (source version, patch) and how (recipe)."""
    what = f"patched-{patch_sha[:12]}" if patch_sha else "twin"
    return f"{safe_name(version)}-{what}-cfg{config_sha[:12]}"


def tree_key(head: str, dirty_diff: bytes, config_sha: str) -> str:
    """Artefact dir name of a user's tree: HEAD, plus the hash of ``git diff HEAD`` when the tree is dirty."""
    dirty = "dirty" + hashlib.sha256(dirty_diff).hexdigest()[:12] if dirty_diff else "clean"
    return f"tree-{head[:12]}-{dirty}-cfg{config_sha[:12]}"


def wanted_options(fragment_text: str, localversion: str) -> dict[str, str]:
    """Every option the recipe asks for, as config_check.parse reads a .config (name → y / n / string)."""
    return config_check.parse(recipe_fragment(fragment_text, localversion))


def config_problems(config_text: str, wanted: Mapping[str, str]) -> list[str]:
    """One line per requested option the final .config does not have as asked (a dependency turned it off)."""
    have = config_check.parse(config_text)
    out = []
    for option, want in wanted.items():
        got = have.get(option, "n")
        if got != want:
            shown = {"n": "is not set"}.get(got, f"={got}")
            out.append(f"CONFIG_{option}: asked for {'not set' if want == 'n' else '=' + want}, "
                       f"final .config has it {shown}")
    return out


def patch_files(patch_text: str) -> list[str]:
    """Paths (relative to the tree, -p1) a unified diff touches."""
    files: list[str] = []
    for line in patch_text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            path = line[4:].split("\t")[0].strip()
            if path != "/dev/null" and path.startswith(("a/", "b/")) and path[2:] not in files:
                files.append(path[2:])
    return files


def parse_apt_version(show: str) -> str:
    """The Version of the first stanza of ``apt-cache show`` output ("" if none)."""
    m = re.search(r"^Version: (\S+)$", show, re.M)
    return m[1] if m else ""


def _tail_error(text: str) -> str:
    """The most telling line of a failed build's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"\berror\b", r"\*\*\*", r"Error \d+"):
        hits = [ln for ln in lines if re.search(pattern, ln, re.I)]
        if hits:
            return hits[0] if pattern == r"\berror\b" else hits[-1]
    return lines[-1] if lines else "no output"


# --- processes, locks -------------------------------------------------------------------------------------------

def _run(argv: list[str], what: str, timeout: float, cwd: Path | None = None, log_path: Path | None = None,
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


# --- Debian's source ---------------------------------------------------------------------------------------------

def build_root() -> Path:
    return cache_root() / "build"


@dataclass(frozen=True)
class Source:
    version: str  # Debian package version, e.g. 6.12.95-1~bpo12+1
    root: Path  # build/src/<version>/

    @property
    def pristine(self) -> Path:
        return self.root / "pristine"

    @property
    def patched(self) -> Path:
        return self.root / "patched"


def _apt(apt: debian.Apt, tool: str, *args: str, cwd: Path | None = None) -> str:
    # debian.Apt.download() globs for an exact package name, so a /release or =version pin goes through here.
    return _run([tool, *apt.options(), *args], f"{tool} {' '.join(args)}", debian.APT_TIMEOUT, cwd=cwd,
                capture=True)


def source_version(pin: str | None = None, apt: debian.Apt | None = None) -> str:
    """The linux-source-6.12 version to build: ``pin``, else the newest in bookworm-backports."""
    if pin:
        return pin
    apt = apt or debian.Apt.default()
    with apt.locked():
        apt.update()
        version = parse_apt_version(_apt(apt, "apt-cache", "show", f"{SOURCE_PACKAGE}/{SOURCE_RELEASE}"))
    if not version:
        raise SetupError(f"apt-cache show {SOURCE_PACKAGE}/{SOURCE_RELEASE}: no version in the package lists")
    return version


def fetch_source(version: str, apt: debian.Apt | None = None) -> Source:
    """Download ``linux-source-6.12=version`` and extract its tarball into build/src/<version>/pristine (once)."""
    src = Source(version, build_root() / "src" / safe_name(version))
    done = src.root / "pristine.complete"
    if done.exists():
        return src
    apt = apt or debian.Apt.default()
    with locks.held(src.root.with_name(src.root.name + ".extract.lock"), f"{SOURCE_PACKAGE} {version} being "
                    "extracted by another holecheck run", EXTRACT_TIMEOUT + debian.APT_TIMEOUT):
        if done.exists():
            return src
        t0 = time.monotonic()
        src.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=src.root, prefix=".fetch.") as tmp_name:
            tmp = Path(tmp_name)
            with apt.locked():
                apt.update()
                _apt(apt, "apt-get", "download", f"{SOURCE_PACKAGE}={version}", cwd=tmp)
            debs = sorted(tmp.glob(f"{SOURCE_PACKAGE}_*.deb"))
            if not debs:
                raise SetupError(f"apt-get download {SOURCE_PACKAGE}={version}: no .deb appeared")
            _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "deb")], f"dpkg-deb -x {debs[0].name}",
                 EXTRACT_TIMEOUT)
            tarball = tmp / "deb" / TARBALL
            if not tarball.is_file():
                raise SetupError(f"{debs[0].name} has no {TARBALL}")
            tree = tmp / "tree"
            tree.mkdir()
            _run(["tar", "-xJf", str(tarball), "-C", str(tree), "--strip-components=1"], f"tar -x {tarball.name}",
                 EXTRACT_TIMEOUT)
            shutil.rmtree(src.pristine, ignore_errors=True)
            tree.rename(src.pristine)
        done.write_text(version + "\n")
        log.info("extracted %s %s in %.0f s into %s", SOURCE_PACKAGE, version, time.monotonic() - t0, src.pristine)
    return src


def _link_farm(pristine: Path, farm: Path) -> None:
    """``farm`` as hard links to every file of ``pristine`` (its _obj-* output dirs left out)."""
    for dirpath, dirnames, filenames in os.walk(pristine):
        rel = Path(dirpath).relative_to(pristine)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if not d.startswith("_obj-")]
        (farm / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src = Path(dirpath) / name
            if src.is_symlink():
                (farm / rel / name).symlink_to(os.readlink(src))
            else:
                os.link(src, farm / rel / name)


def patched_tree(src: Source, patch: Path) -> Path:
    """The patched source tree for ``patch`` (caller holds the patched tree's lock).

    Made once as a hard-link farm of pristine; when the patch changes, the files either version touches are
    restored from pristine as private copies (mtime now, so make recompiles them) and the new patch applied.
    """
    text = patch.read_text()
    sha = hashlib.sha256(text.encode()).hexdigest()
    state_path = src.root / "patched.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    farm = src.patched
    if state.get("patch_sha256") == sha and farm.is_dir():
        return farm
    files = patch_files(text)
    if not files:
        raise SetupError(f"{patch.name}: not a unified diff (no ---/+++ lines)")
    state_path.unlink(missing_ok=True)  # a half-patched farm must never look current
    if not (farm / "Makefile").exists():
        shutil.rmtree(farm, ignore_errors=True)
        # Linked under a temporary name: an interrupted walk must not leave a farm that lacks files.
        partial = farm.with_name(farm.name + ".linking")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _link_farm(src.pristine, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(farm)
    for rel in sorted(set(files) | set(state.get("files", []))):
        # A file of its own (patching must not write through a hard link into pristine), with mtime now (make
        # must see it newer than any object built from another version of it).
        target, original = farm / rel, src.pristine / rel
        target.unlink(missing_ok=True)
        if original.is_file():
            shutil.copyfile(original, target)
            shutil.copymode(original, target)
    _run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-d", str(farm), "-i", str(patch)],
         f"patch -p1 < {patch.name} (against {SOURCE_PACKAGE} {src.version})", PATCH_TIMEOUT, capture=True)
    state_path.write_text(json.dumps({"patch": patch.name, "patch_sha256": sha, "files": files}, indent=1) + "\n")
    return farm


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
    _run(["nice", "-n", "19", "make", "-C", str(src_tree), f"O={obj}", f"KCONFIG_ALLCONFIG={frag}", *BASE_TARGETS],
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
    _run(["nice", "-n", "19", "make", "-C", str(src_tree), f"O={obj}", "-j", str(jobs), "bzImage"],
         f"make -j {jobs} bzImage in {obj}", timeout, log_path=log_path,
         env={"KBUILD_BUILD_USER": "holecheck", "KBUILD_BUILD_HOST": "holecheck"})
    seconds = time.monotonic() - t0
    (obj / BUILT_MARK).write_text(f"{seconds:.0f}\n")
    return seconds


def _seed(obj: Path, base: Path, base_lock: Path, touch: list[Path]) -> bool:
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
            _run(["cp", "-a", str(base), str(tmp)], f"cp -a {base} (seeding {obj.name})", COPY_TIMEOUT)
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


def _cached(out: Path) -> Path | None:
    return out / "bzImage" if (out / "build.json").exists() and (out / "bzImage").exists() else None


def _output(patched: bool, patch: Path, version: str | None) -> tuple[str, Path]:
    """(source version, the cache directory its build lands in)."""
    patch_sha = hashlib.sha256(patch.read_bytes()).hexdigest() if patched else None
    version = source_version(version)
    return version, build_root() / cache_key(version, patch_sha, recipe_sha(recipe_text()))


def cached(patched: bool, *, patch: Path = DEFAULT_PATCH, version: str | None = None) -> Path | None:
    """The known-bad kernel (``patched``) or its twin if the cache has it; never builds."""
    return _cached(_output(patched, patch, version)[1])


def build(patched: bool, jobs: int = os.cpu_count() or 1, *, patch: Path = DEFAULT_PATCH,
          version: str | None = None, timeout: float = BUILD_TIMEOUT, force: bool = False) -> Path:
    """Build Debian's linux-source-6.12 (``patched``: plus ``patch``) with holecheck's config; the bzImage path.

    Cached by (source version, patch sha256, recipe sha256); ``force`` re-runs make in the kept output dir.
    """
    kind = "patched" if patched else "twin"
    if patched and not patch.is_file():
        raise SetupError(f"no such patch: {patch}")
    fragment_text = recipe_text()
    cfg = recipe_sha(fragment_text)
    patch_sha = hashlib.sha256(patch.read_bytes()).hexdigest() if patched else None
    version, out = _output(patched, patch, version)
    if not force and (hit := _cached(out)):
        return hit
    preflight()
    src = fetch_source(version)
    tree = src.patched if patched else src.pristine
    obj = tree / f"_obj-{kind}-cfg{cfg[:12]}"
    # One lock per source tree, held for the whole build: the patched tree is re-patched under it.
    with locks.held(src.root / f"{kind}.lock", f"the {kind} kernel build of another holecheck run", timeout):
        if not force and (hit := _cached(out)):
            return hit
        seeded = None
        if patched:
            patched_tree(src, patch)
            twin_obj = src.pristine / f"_obj-twin-cfg{cfg[:12]}"
            touched = [tree / f for f in patch_files(patch.read_text())]
            if _seed(obj, twin_obj, src.root / "twin.lock", touched):
                seeded = str(twin_obj)
        return _configure_and_build(tree, obj, out, fragment_text, kind, jobs, timeout, seeded,
                                    source=f"{SOURCE_PACKAGE} {version}",
                                    patch_name=patch.name if patched else None, patch_sha=patch_sha)


def _configure_and_build(tree: Path, obj: Path, out: Path, fragment_text: str, kind: str, jobs: int,
                         timeout: float, seeded: str | None, source: str, patch_name: str | None = None,
                         patch_sha: str | None = None) -> Path:
    obj.mkdir(parents=True, exist_ok=True)
    build_log = obj / "holecheck-build.log"
    build_log.write_text(f"# holecheck {kind} build of {source}; output dir {obj}"
                         f"{'; seeded from ' + seeded if seeded else ''}\n")
    log.info("building %s (%s) with -j%d under nice 19 (cold: minutes on 2 idle cores, longer on busy ones); "
             "log: %s", kind, source, jobs, build_log)
    configure(tree, obj, fragment_text, LOCALVERSION[kind], build_log)
    seconds = _make_bzimage(tree, obj, jobs, timeout, build_log)
    info = BuildInfo(key=out.name, kind=kind, source=source, patch=patch_name, patch_sha256=patch_sha,
                     recipe_sha256=recipe_sha(fragment_text), release=_release(obj), jobs=jobs,
                     seconds=round(seconds, 1), seeded_from=seeded,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    image = _publish(obj, out, build_log, info)
    log.info("built %s %s in %.0f s: %s", kind, info.release, seconds, image)
    return image


# --- a user's tree (--kernel=build:LINUX_TREE) ----------------------------------------------------------------------

def _git(tree: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SetupError("git not found: build:LINUX_TREE needs git") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"git -C {tree} {' '.join(args)}: no answer within {GIT_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SetupError(f"build:{tree}: git {' '.join(args)} failed: {err[-1] if err else proc.returncode}")
    return proc.stdout


def build_tree(tree: Path, jobs: int = os.cpu_count() or 1, *, timeout: float = BUILD_TIMEOUT,
               force: bool = False) -> Path:
    """Configure and build a user's kernel git tree out of tree; the bzImage path.

    Artefacts are keyed by HEAD and the hash of ``git diff HEAD`` (untracked files do not count). The output dir
    is one per tree, not per commit, so bisection steps rebuild incrementally (git checkout updates mtimes).
    """
    tree = tree.expanduser().resolve()
    if not (tree / "Makefile").is_file() or not (tree / "mm").is_dir():
        raise SetupError(f"build:{tree}: not a Linux source tree (no Makefile and mm/)")
    if (tree / ".config").exists() or (tree / "include/config").exists():
        raise SetupError(f"build:{tree}: the tree has an in-tree build (.config); out-of-tree builds need "
                         f"'make mrproper' there first")
    head = _git(tree, "rev-parse", "HEAD").decode().strip()
    diff = _git(tree, "diff", "HEAD", "--binary")
    fragment_text = recipe_text()
    cfg = recipe_sha(fragment_text)
    out = build_root() / tree_key(head, diff, cfg)
    if not force and (hit := _cached(out)):
        return hit
    preflight()
    obj = build_root() / "trees" / f"{hashlib.sha256(str(tree).encode()).hexdigest()[:12]}-cfg{cfg[:12]}"
    with locks.held(obj.with_name(obj.name + ".lock"), f"another holecheck run's build of {tree}", timeout):
        if not force and (hit := _cached(out)):
            return hit
        dirty = f" + diff {hashlib.sha256(diff).hexdigest()[:12]}" if diff else ""
        return _configure_and_build(tree, obj, out, fragment_text, "tree", jobs, timeout, None,
                                    source=f"{tree} {head[:12]}{dirty}")


# --- CLI -----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--patched", action="store_true", help="Debian's 6.12 source + the known-bad patch")
    what.add_argument("--twin", action="store_true", help="Debian's 6.12 source as shipped")
    what.add_argument("--tree", type=Path, help="a Linux git tree (what --kernel=build:LINUX_TREE builds)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--patch", type=Path, default=DEFAULT_PATCH, help="patch for --patched (-p1)")
    parser.add_argument("--source-version", help=f"pin {SOURCE_PACKAGE}'s version (default: newest in "
                                                 f"{SOURCE_RELEASE})")
    parser.add_argument("--timeout", type=float, default=BUILD_TIMEOUT, help="seconds make bzImage may take")
    parser.add_argument("--force", action="store_true", help="re-run make even if the artefacts are cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sigterm_unwinds()
    try:
        if args.tree:
            image = build_tree(args.tree, args.jobs, timeout=args.timeout, force=args.force)
        else:
            image = build(args.patched, args.jobs, patch=args.patch.resolve(), version=args.source_version,
                          timeout=args.timeout, force=args.force)
    except SetupError as exc:
        print(f"holecheck: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("holecheck: build interrupted: make stopped, nothing published (the output dir is kept for the "
              "next, incremental build)", file=sys.stderr)
        return 130
    print(image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
