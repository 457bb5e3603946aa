"""Build a kernel under test from source, configured for holecheck.

Two kinds of tree:

- Debian's ``linux-source-6.12`` (``kernels.linux_source``): the *twin* as Debian ships it, and the *patched*
  kernel, the same source plus a known-bad patch from ``kernels/patches/`` (by default the re-creation of the
  series' v1 behaviour, which leaves holes). ``build(patched)`` returns the bzImage.
- A patch *series* ``kernels/patches/NAME/*.patch`` on any Debian linux-source (``--kernel=patched:VERSION:NAME``,
  e.g. ``patched:7.3.4:ksm-keep-uffd-wp``, a candidate fix): ``build(True, series_name=NAME, version=…)``; its
  release ends in ``-holecheck-NAME``.
- A user's git tree (``--kernel=build:LINUX_TREE``, bisection): ``kernels.git_tree.build_tree(tree)``.

Config recipe, the same for all (``kernels.recipe``): ``make allnoconfig`` with ``minimal.config``,
``holecheck.config`` and ``EXTRAS`` (no modules, PVH entry, /proc/config.gz, no PCI) forced through
``KCONFIG_ALLCONFIG``, and every requested option checked in the final ``.config``: nothing holecheck does not
need is compiled (a cold build is minutes on 2 cores; a defconfig took 20-50). ``make -j N bzImage`` runs under
``nice -n 19``: the machines are shared (``kernels.kbuild``).

Cache (``$HOLECHECK_CACHE``, default ``~/.cache/holecheck``)::

    build/<key>/{bzImage,vmlinux,.config,build.log,build.json}   key: source version, patch sha256, recipe sha256
    build/src/<version>/pristine/                                Debian's tree, extracted once
    build/src/<version>/patched/                                 hard links to pristine + private patched files
    build/src/<version>/{pristine,patched}/_obj-*/               make O= output dirs (kept: incremental rebuilds)
    build/trees/<path hash>-<recipe>/                            O= output dir of a user's tree

The output dirs sit directly inside their source tree on purpose: Kbuild then names the source ``..`` in every
command line instead of an absolute path, so a patched output dir can start as a copy of the twin's
(``kbuild.seed``) and recompile only what the patch touches. The patched tree shares inodes with pristine: never
edit its files in place (that would edit pristine too); change the patch, and the next build re-applies it.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from suite import locks
from suite.errors import SetupError
from suite.procs import sigterm_unwinds

from .git_tree import build_tree
from .kbuild import BUILD_TIMEOUT, build_root, configure_and_build, preflight, published, seed
from .linux_source import (
    SOURCE_PACKAGE,
    SOURCE_RELEASE,
    fetch_source,
    package_of,
    patch_files,
    patched_tree,
    series_text,
    source_version,
)
from .recipe import cache_key, recipe_sha, recipe_text

DEFAULT_PATCH = Path(__file__).parent / "patches" / "0001-mm-leave-zero-subpages-pte_none-after-underused-split.patch"
PATCHES_DIR = DEFAULT_PATCH.parent
SERIES_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def series(name: str) -> list[Path]:
    """The patches of the series ``kernels/patches/NAME/``, in file-name order (0001-…, 0002-…)."""
    folder = PATCHES_DIR / name
    patches = sorted(folder.glob("*.patch")) if SERIES_NAME.fullmatch(name) and folder.is_dir() else []
    if not patches:
        have = sorted(d.name for d in PATCHES_DIR.iterdir() if d.is_dir() and any(d.glob("*.patch")))
        raise SetupError(f"no patch series {name!r} in {PATCHES_DIR} (have: {', '.join(have) or 'none'})")
    return patches


def _patches(patched: bool, patch: Path, series_name: str | None) -> list[Path]:
    if series_name:
        return series(series_name)
    if patched and not patch.is_file():
        raise SetupError(f"no such patch: {patch}")
    return [patch] if patched else []


def _output(patches: Sequence[Path], version: str | None) -> tuple[str, Path]:
    """(source version, the cache directory its build lands in)."""
    patch_sha = hashlib.sha256(series_text(patches).encode()).hexdigest() if patches else None
    version = source_version(version)
    return version, build_root() / cache_key(version, patch_sha, recipe_sha(recipe_text()))


def cached(patched: bool, *, patch: Path = DEFAULT_PATCH, version: str | None = None,
           series_name: str | None = None) -> Path | None:
    """The known-bad kernel (``patched``), a series' kernel or the twin if the cache has it; never builds."""
    return published(_output(_patches(patched, patch, series_name), version)[1])


def build(patched: bool, jobs: int = os.cpu_count() or 1, *, patch: Path = DEFAULT_PATCH,
          version: str | None = None, timeout: float = BUILD_TIMEOUT, force: bool = False,
          series_name: str | None = None) -> Path:
    """Build Debian's linux-source (6.12 unless ``version`` names another; ``patched``: plus ``patch``, or the
    series ``kernels/patches/series_name/``) with holecheck's config; the bzImage path.

    Cached by (source version, patch sha256, recipe sha256); ``force`` re-runs make in the kept output dir.
    """
    patches = _patches(patched, patch, series_name)
    patched = bool(patches)
    kind = "patched" if patched else "twin"
    fragment_text = recipe_text()
    cfg = recipe_sha(fragment_text)
    patch_sha = hashlib.sha256(series_text(patches).encode()).hexdigest() if patched else None
    version, out = _output(patches, version)
    if not force and (hit := published(out)):
        return hit
    preflight()
    src = fetch_source(version)
    tree = src.patched if patched else src.pristine
    # A series gets its own output dir and release suffix (switching from the known-bad patch to it and back
    # must not rebuild everything for a changed LOCALVERSION)
    obj = tree / f"_obj-{series_name or kind}-cfg{cfg[:12]}"
    # One lock per source tree, held for the whole build: the patched tree is re-patched under it.
    with locks.held(src.root / f"{kind}.lock", f"the {kind} kernel build of another holecheck run", timeout):
        if not force and (hit := published(out)):
            return hit
        seeded = None
        if patched:
            patched_tree(src, patches)
            twin_obj = src.pristine / f"_obj-twin-cfg{cfg[:12]}"
            touched = [tree / f for f in patch_files(series_text(patches))]
            if seed(obj, twin_obj, src.root / "twin.lock", touched):
                seeded = str(twin_obj)
        return configure_and_build(tree, obj, out, fragment_text, kind, jobs, timeout, seeded,
                                   source=f"{package_of(version)} {version}",
                                   patch_name=series_name or (patches[0].name if patched else None),
                                   patch_sha=patch_sha,
                                   localversion=f"-holecheck-{series_name}" if series_name else None)


# --- CLI -----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--patched", action="store_true", help="Debian's 6.12 source + the known-bad patch")
    what.add_argument("--twin", action="store_true", help="Debian's 6.12 source as shipped")
    what.add_argument("--tree", type=Path, help="a Linux git tree (what --kernel=build:LINUX_TREE builds)")
    what.add_argument("--series", help="a patch series kernels/patches/NAME/ on --source-version (what "
                                       "--kernel=patched:VERSION:NAME builds)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--patch", type=Path, default=DEFAULT_PATCH, help="patch for --patched (-p1)")
    parser.add_argument("--source-version", help=f"pin the source's Debian version, or a series (7.3) or release "
                                                 f"(7.3.4) of it (default: {SOURCE_PACKAGE}'s newest in "
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
                          timeout=args.timeout, force=args.force, series_name=args.series)
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
