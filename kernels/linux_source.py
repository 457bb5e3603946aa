"""Debian's ``linux-source-SERIES`` (6.12 from bookworm-backports, 7.3 from trixie-backports, fetched through the
private apt configuration of ``kernels.debian``): the pristine tree, extracted once, and the patched tree a patch
(series) makes of it.

    build/src/<version>/pristine/     Debian's tree, extracted once
    build/src/<version>/patched/      hard links to pristine + private patched files

The patched tree shares inodes with pristine: never edit its files in place (that would edit pristine too);
change the patch, and the next build re-applies it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from suite import locks
from suite.errors import SetupError

from . import debian
from .kbuild import build_root, run
from .recipe import safe_name

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "linux-source-6.12"  # the default series: the known-bad patch was made against it
SOURCE_RELEASE = "bookworm-backports"  # the release the patch was made against; an exact version may be pinned
# Series → the suite whose newest linux-source-SERIES is built when no version is pinned.
SOURCE_RELEASES = {"6.12": SOURCE_RELEASE, "7.3": "trixie-backports"}
EXTRACT_TIMEOUT = 900.0
PATCH_TIMEOUT = 120.0


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


def package_of(version: str) -> str:
    """The source package a Debian version comes in: 7.3.4-1~bpo13+1 → linux-source-7.3."""
    m = re.match(r"(\d+\.\d+)", version)
    if not m:
        raise SetupError(f"{version!r}: not a Debian kernel source version (want e.g. 7.3.4-1~bpo13+1)")
    return f"linux-source-{m[1]}"


def parse_apt_version(show: str) -> str:
    """The Version of the first stanza of ``apt-cache show`` output ("" if none)."""
    m = re.search(r"^Version: (\S+)$", show, re.M)
    return m[1] if m else ""


def patch_files(patch_text: str) -> list[str]:
    """Paths (relative to the tree, -p1) a unified diff touches."""
    files: list[str] = []
    for line in patch_text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            path = line[4:].split("\t")[0].strip()
            if path != "/dev/null" and path.startswith(("a/", "b/")) and path[2:] not in files:
                files.append(path[2:])
    return files


def _apt(apt: debian.Apt, tool: str, *args: str, cwd: Path | None = None) -> str:
    # debian.Apt.download() globs for an exact package name, so a /release or =version pin goes through here.
    return run([tool, *apt.options(), *args], f"{tool} {' '.join(args)}", debian.APT_TIMEOUT, cwd=cwd,
               capture=True)


def source_version(pin: str | None = None, apt: debian.Apt | None = None, series: str = "6.12") -> str:
    """The linux-source version to build: ``pin`` if it is a Debian version (7.3.4-1~bpo13+1); else the newest of
    a series (``pin`` 7.3, or ``series`` when no pin) in its suite (SOURCE_RELEASES), which for a release pin
    (7.3.4) must be that release."""
    if pin and "-" in pin:
        return pin
    release = pin if pin and re.fullmatch(r"\d+\.\d+\.\d+", pin) else None
    if pin and not release and not re.fullmatch(r"\d+\.\d+", pin):
        raise SetupError(f"{pin!r}: not a source version (want a series 7.3, a release 7.3.4 or a Debian version "
                         "7.3.4-1~bpo13+1)")
    if pin:
        series = ".".join(pin.split(".")[:2])
    if series not in SOURCE_RELEASES:
        raise SetupError(f"no Debian source series {series!r} known (have {', '.join(SOURCE_RELEASES)})")
    package, suite = f"linux-source-{series}", SOURCE_RELEASES[series]
    apt = apt or debian.Apt.default()
    with apt.locked():
        apt.update()
        version = parse_apt_version(_apt(apt, "apt-cache", "show", f"{package}/{suite}"))
    if not version:
        raise SetupError(f"apt-cache show {package}/{suite}: no version in the package lists")
    if release and not version.startswith(release + "-"):
        raise SetupError(f"{package} in {suite} is {version}, not {release}: pin the full Debian version")
    return version


def fetch_source(version: str, apt: debian.Apt | None = None) -> Source:
    """Download ``linux-source-SERIES=version`` and extract its tarball into build/src/<version>/pristine (once)."""
    package = package_of(version)
    tarball_path = f"usr/src/{package}.tar.xz"
    src = Source(version, build_root() / "src" / safe_name(version))
    done = src.root / "pristine.complete"
    if done.exists():
        return src
    apt = apt or debian.Apt.default()
    with locks.held(src.root.with_name(src.root.name + ".extract.lock"), f"{package} {version} being "
                    "extracted by another holecheck run", EXTRACT_TIMEOUT + debian.APT_TIMEOUT):
        if done.exists():
            return src
        t0 = time.monotonic()
        src.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=src.root, prefix=".fetch.") as tmp_name:
            tmp = Path(tmp_name)
            with apt.locked():
                apt.update()
                _apt(apt, "apt-get", "download", f"{package}={version}", cwd=tmp)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if not debs:
                raise SetupError(f"apt-get download {package}={version}: no .deb appeared")
            run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "deb")], f"dpkg-deb -x {debs[0].name}",
                EXTRACT_TIMEOUT)
            tarball = tmp / "deb" / tarball_path
            if not tarball.is_file():
                raise SetupError(f"{debs[0].name} has no {tarball_path}")
            tree = tmp / "tree"
            tree.mkdir()
            run(["tar", "-xJf", str(tarball), "-C", str(tree), "--strip-components=1"], f"tar -x {tarball.name}",
                EXTRACT_TIMEOUT)
            shutil.rmtree(src.pristine, ignore_errors=True)
            tree.rename(src.pristine)
        done.write_text(version + "\n")
        log.info("extracted %s %s in %.0f s into %s", package, version, time.monotonic() - t0, src.pristine)
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


def series_text(patches: Sequence[Path]) -> str:
    """A patch series as one diff, in order (``patch -p1`` applies the files one after another)."""
    return "".join(p.read_text() for p in patches)


def patched_tree(src: Source, patch: Path | Sequence[Path]) -> Path:
    """The patched source tree for ``patch`` (one file or a series, in order; caller holds the patched tree's lock).

    Made once as a hard-link farm of pristine; when the patch changes, the files either version touches are
    restored from pristine as private copies (mtime now, so make recompiles them) and the new patch applied.
    """
    patches = [patch] if isinstance(patch, Path) else list(patch)
    text = series_text(patches)
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
    for one in patches:
        run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-d", str(farm), "-i", str(one)],
            f"patch -p1 < {one.name} (against {package_of(src.version)} {src.version})", PATCH_TIMEOUT, capture=True)
    state_path.write_text(json.dumps({"patch": " ".join(p.name for p in patches), "patch_sha256": sha,
                                      "files": files}, indent=1) + "\n")
    return farm
