"""Debian's kernel packages by version (``--kernel=debian:SPEC``), fetched and unpacked into a cache.

Specs and their order are in ``kernels.versions``; the package indexes and downloads in ``kernels.apt`` (its own
apt configuration over bookworm, -updates, -security, -backports, trixie, -security, -backports and forky). A
kernel is unpacked with ``dpkg-deb -x`` into ``<cache>/kernels/<abi>-<flavour>/`` laid out as the old packaging
ships it, whichever packaging it came in:

    boot/vmlinuz-R   boot/config-R   (usr/)lib/modules/R/kernel/…

A tree counts only with its ``.complete`` marker, written last, before the tree is renamed into place.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from suite.cache import cache_root
from suite.errors import SetupError

from .apt import APT_TIMEOUT, Apt, host_mirror  # noqa: F401  (kernels.linux_source and callers use them from here)
from .packages import PART_RE, KernelIndex
from .versions import (  # noqa: F401  (the spec API, as callers know it)
    FLAVOURS,
    VersionSpec,
    abi_key,
    by_series,
    package_name,
    parse_spec,
    preference,
    select,
    split_package,
)

log = logging.getLogger(__name__)
MARKER = ".complete"
UNPACK_TIMEOUT = 300


def kernels_dir() -> Path:
    return cache_root() / "kernels"


def is_complete(tree: Path) -> bool:
    return (tree / MARKER).is_file()


# --- what is there ------------------------------------------------------------------------------------------------

def spelt(package: str) -> str:
    """``linux-image-7.3.4+deb13-cloud-amd64`` → ``7.3.4+deb13-cloud``: the ABI as ``debian:SPEC`` names it."""
    abi, flavour = split_package(package)
    return abi + ("-cloud" if flavour == FLAVOURS["cloud"] else "")


def abis(index: KernelIndex) -> list[str]:
    """Every listed ``debian:SPEC`` by exact ABI (``-cloud`` for that flavour), in version order; ``unfetchable``
    says which of them cannot be fetched."""
    pairs = [split_package(p) for p in index.images()]
    return [abi + ("-cloud" if flavour == FLAVOURS["cloud"] else "")
            for abi, flavour in sorted(pairs, key=lambda af: (abi_key(af[0]), af[1]))]


def unfetchable(index: KernelIndex) -> dict[str, str]:
    """ABI (as ``abis`` spells it) → why it cannot be fetched: the index still lists its image, but a part the
    image depends on is gone from every suite (trixie-backports dropped the older builds' -base/-modules)."""
    out = {}
    for package in index.images():
        if missing := index.missing(package):
            kinds = sorted({m["part"] for name in missing if (m := PART_RE.match(name))})
            out[spelt(package)] = f"{', '.join(f'linux-{k}-*' for k in kinds)} gone from the archive"
    return out


def series_lines(index: KernelIndex) -> list[str]:
    """One line per series, oldest first; each run of versions from the same suites (and as fetchable) is followed
    by them: ``6.19: 6.19.6+deb13, 6.19.8+deb13 (trixie-backports)``; a version that cannot be fetched says why."""
    generic = {split_package(p)[0]: p for p in index.images() if split_package(p)[1] == FLAVOURS[""]}
    gone = unfetchable(index)
    lines = []
    for name, group in by_series(generic).items():
        runs: list[tuple[str, list[str]]] = []
        for abi in group:
            suites = ", ".join(index.suites(generic[abi])) + (f"; not fetchable: {gone[abi]}" if abi in gone else "")
            if runs and runs[-1][0] == suites:
                runs[-1][1].append(abi)
            else:
                runs.append((suites, [abi]))
        lines.append(f"{name}: " + ", ".join(f"{', '.join(abis)} ({suites})" for suites, abis in runs))
    if newest := pick(parse_spec("newest"), index):
        lines.append(f"newest: {split_package(newest)[0]}; newest-SERIES (newest-6.12, newest-6.12+deb12) picks in a "
                     "series; add -cloud for the cloud flavour")
    if dropped := [abi for abi in generic if abi in gone]:
        lines.append(f"not fetchable: {len(dropped)} of {len(generic)} versions; newest-* and bisection skip them")
    return lines


def available(apt: Apt | None = None) -> KernelIndex:
    apt = apt or Apt.default()
    with apt.locked():
        apt.update()
        return apt.index()


def list_versions(apt: Apt | None = None) -> list[str]:
    """What ``debian:list`` prints: the kernels of every suite, one line per series."""
    return series_lines(available(apt))


# --- fetching -----------------------------------------------------------------------------------------------------

def pick(spec: VersionSpec, index: KernelIndex) -> str | None:
    """The package ``spec`` names: an exact ABI as listed (fetching says why it cannot be), else (``newest*``, an
    upstream version) the best among those that can be fetched."""
    return select(spec, index.images() if spec.exact else index.fetchable())


def resolve_package(spec: VersionSpec, apt: Apt) -> tuple[str, KernelIndex]:
    """The package name for ``spec`` (with the index it came from); refreshes the lists once if nothing matches
    (a new upload)."""
    apt.update()
    index = apt.index()
    if not (found := pick(spec, index)):
        apt.update(force=True)
        index = apt.index()
        found = pick(spec, index)
    if found:
        return found, index
    if listed := select(spec, index.images()):
        raise SetupError(f"{listed} is the match, but it is not fetchable ({unfetchable(index)[spelt(listed)]}); "
                         "debian:list marks which are")
    near = [a for a, f in map(split_package, index.images()) if f == spec.flavour]
    hint = ", ".join(sorted(near, key=abi_key)[-4:])
    raise SetupError(f"no Debian kernel package {package_name(spec.abi or 'newest', spec.flavour)} in any suite "
                     f"holecheck reads (bookworm … forky); newest there: {hint or 'none'} (debian:list shows all)")


def fetch(text: str, apt: Apt | None = None) -> Path:
    """Fetch and unpack ``debian:TEXT``; return the unpacked tree (``boot/``, ``(usr/)lib/modules/``).

    Unpacked once: a complete tree is reused without asking apt anything when the spec names its ABI exactly.
    """
    spec = parse_spec(text)
    apt = apt or Apt.default()
    if spec.exact and is_complete(tree := kernels_dir() / f"{spec.exact}-{spec.flavour}"):
        return tree
    with apt.locked():
        package, index = resolve_package(spec, apt)
        release = package.removeprefix("linux-image-")
        tree = kernels_dir() / release
        if is_complete(tree):
            return tree
        t0 = time.monotonic()
        try:
            parts = index.parts(package)
        except LookupError as exc:
            raise SetupError(f"debian:{text}: {exc}") from None
        debs = [apt.download(p) for p in parts]
        install(debs, tree, release)
        for deb in debs:  # the tree is the cache; a verified .deb outlives only a run killed before this point
            deb.unlink(missing_ok=True)
        log.info("fetched %s (%s) in %.1f s into %s", package, ", ".join(p.package for p in parts),
                 time.monotonic() - t0, tree)
    return tree


def arrange(root: Path, release: str) -> None:
    """The split packaging's ``usr/lib/modules/R/{vmlinuz,config}`` → ``boot/vmlinuz-R``, ``boot/config-R``, where
    the rest of holecheck (and /boot-style tools) look for them. The old packaging is left as it is."""
    for name in ("vmlinuz", "config", "System.map"):
        src, dst = root / "usr" / "lib" / "modules" / release / name, root / "boot" / f"{name}-{release}"
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(exist_ok=True)
            src.rename(dst)


def extract(debs: list[Path], into: Path) -> None:
    """``dpkg-deb -x`` every .deb into ``into`` (no maintainer scripts, no dpkg database)."""
    if not shutil.which("dpkg-deb"):
        raise SetupError("dpkg-deb not found: unpacking Debian packages needs dpkg")
    for deb in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True,
                              timeout=UNPACK_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise SetupError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip().splitlines()[-1:]}")


def install(debs: list[Path], tree: Path, release: str) -> None:
    """``dpkg-deb -x`` every .deb into a temporary sibling of ``tree``, arrange it, write the marker, rename it
    into place: an interrupted run leaves no tree that counts."""
    tree.parent.mkdir(parents=True, exist_ok=True)
    for stale in tree.parent.glob(f".{tree.name}.*"):  # a run killed mid-unpack (callers hold the apt lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tree.name}.", dir=tree.parent))
    try:
        extract(debs, tmp)
        arrange(tmp, release)
        if not (tmp / "boot" / f"vmlinuz-{release}").is_file():
            raise SetupError(f"{', '.join(d.name for d in debs)}: no boot/vmlinuz-{release} nor "
                             f"usr/lib/modules/{release}/vmlinuz inside")
        (tmp / MARKER).write_text("".join(d.name + "\n" for d in debs))
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """``python -m kernels.debian list`` | ``python -m kernels.debian fetch SPEC``."""
    import sys

    from suite.procs import sigterm_unwinds

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sigterm_unwinds()  # a kill unwinds too: the temporary download dir goes, apt-get is stopped
    args = sys.argv[1:] or ["list"]
    try:
        if args[0] == "list":
            print("\n".join(list_versions()))
        elif args[0] == "fetch" and len(args) == 2:
            print(fetch(args[1]))
        else:
            raise SystemExit("usage: python -m kernels.debian list | fetch SPEC")
    except SetupError as exc:
        raise SystemExit(f"holecheck: {exc}") from None
    except KeyboardInterrupt:
        print("holecheck: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
