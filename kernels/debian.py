"""Debian's kernel packages by version, through an apt configuration of holecheck's own.

The host's apt state is never touched: a private sources list (bookworm, its updates, security and backports,
and trixie, from the mirror the host's sources use), state and cache dirs under ``<cache>/apt``; packages are
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into ``<cache>/kernels/<version>/``.

Version specs (``--kernel=debian:SPEC``):

- ``6.12.57``        → ``linux-image-6.12.57+deb12-amd64`` (bookworm-backports) or ``…+deb13-amd64`` (trixie);
  where both a ``+debN`` and a ``+debN.M`` rebuild exist, the newest build is taken.
- ``6.12.90+deb12.1`` → exactly that ABI.
- ``6.1.0-56``       → ``linux-image-6.1.0-56-amd64`` (bookworm's old ABI naming).
- a ``-cloud`` suffix (``6.12.57-cloud``) picks the ``-cloud-amd64`` flavour. The generic flavour is the default
  because the cloud 6.12 flavour oopses under TCG.
- ``newest-6.12``, ``newest-6.1``: the newest available in that series; ``newest-6.12+deb12``: the newest
  bookworm-backports build (``list`` shows them all).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from suite.errors import SetupError
from suite.uffd import cache_root

log = logging.getLogger(__name__)

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# (mirror kind, suite): "main" suites come from the Debian mirror, "security" ones from its -security twin.
SUITES = (("main", "bookworm"), ("main", "bookworm-updates"), ("security", "bookworm-security"),
          ("main", "bookworm-backports"), ("main", "trixie"), ("security", "trixie-security"))
LISTS_MAX_AGE = 24 * 3600.0  # refresh the package lists once a day, or when a version is not found
APT_TIMEOUT = 600.0
FLAVOURS = {"": "amd64", "cloud": "cloud-amd64"}
# linux-image-<abi>-<flavour>; abi is "6.1.0-56" (old naming) or "6.12.57+deb12" / "6.12.90+deb12.1" (new)
PACKAGE_RE = re.compile(
    r"^linux-image-(?P<abi>\d+\.\d+\.\d+(?:-\d+|\+deb\d+(?:\.\d+)?))-(?P<flavour>amd64|cloud-amd64)$")
SPEC_RE = re.compile(r"^(?P<abi>\d+\.\d+\.\d+(?:-\d+|\+deb\d+(?:\.\d+)?)?)(?:-(?P<flavour>cloud))?$")
NEWEST_RE = re.compile(r"^newest-(?P<series>\d+\.\d+)(?P<build>\+deb\d+)?(?:-(?P<flavour>cloud))?$")


@dataclass(frozen=True)
class VersionSpec:
    """A parsed ``debian:SPEC``: an ABI (exact, or an upstream version to match) and a flavour."""

    abi: str  # "6.1.0-56" or "6.12.90+deb12.1" (exact), "6.12.57" (any +debN build), or a series "6.12"
    flavour: str  # "amd64" or "cloud-amd64"
    newest: bool = False  # abi is a series ("6.12", "6.12+deb12"): the newest package in it

    def matches(self, package: str) -> bool:
        m = PACKAGE_RE.match(package)
        if not m or m["flavour"] != self.flavour:
            return False
        abi = m["abi"]
        if self.newest:
            series, _, build = self.abi.partition("+")
            in_build = not build or re.fullmatch(rf"\+{build}(\.\d+)?", abi[len(_upstream(abi)):]) is not None
            return _upstream(abi).startswith(series + ".") and in_build
        return abi == self.abi or ("-" not in self.abi and "+" not in self.abi and abi.startswith(self.abi + "+"))


def parse_spec(text: str) -> VersionSpec:
    """``6.12.57``, ``6.12.57-cloud``, ``6.1.0-56``, ``6.12.90+deb12.1``, ``newest-6.12(+deb12)`` → VersionSpec."""
    text = text.strip()
    if m := NEWEST_RE.match(text):
        return VersionSpec(m["series"] + (m["build"] or ""), FLAVOURS[m["flavour"] or ""], newest=True)
    m = SPEC_RE.match(text)
    if not m:
        raise SetupError(f"debian:{text}: not a Debian kernel version (e.g. 6.12.57, 6.12.57-cloud, 6.1.0-56, "
                         "newest-6.12+deb12; debian:list shows what is available)")
    abi = m["abi"]
    if re.fullmatch(r"\d+\.\d+\.0", abi) and abi.startswith("6.1."):
        raise SetupError(f"debian:{text}: 6.1 kernels are named by ABI, e.g. debian:6.1.0-56")
    return VersionSpec(abi, FLAVOURS[m["flavour"] or ""])


def package_name(abi: str, flavour: str = "amd64") -> str:
    return f"linux-image-{abi}-{flavour}"


def _upstream(abi: str) -> str:
    return abi.split("+")[0] if "+" in abi else abi


def abi_key(abi: str) -> tuple[int, ...]:
    """Sort key: 6.1.0-47 < 6.1.0-56 < 6.12.57+deb12 < 6.12.90+deb12 < 6.12.90+deb12.1 < 6.12.107+deb13."""
    return tuple(int(x) for x in re.findall(r"\d+", abi))


def preference(abi: str) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Among matches, the newest upstream version; for one upstream version built for several releases, the
    bookworm-backports build (+deb12, the host's release) before trixie's (+deb13); then the newest rebuild."""
    upstream, _, build = abi.partition("+deb")
    major, _, minor = build.partition(".")
    return abi_key(upstream), -int(major or 0), abi_key(minor)


def split_package(name: str) -> tuple[str, str]:
    """``linux-image-6.12.57+deb12-cloud-amd64`` → (``6.12.57+deb12``, ``cloud-amd64``); ("", "") if not one."""
    m = PACKAGE_RE.match(name)
    return (m["abi"], m["flavour"]) if m else ("", "")


def select(spec: VersionSpec, packages: list[str]) -> str | None:
    """The preferred package among ``packages`` that ``spec`` matches."""
    found = [p for p in packages if spec.matches(p)]
    return max(found, key=lambda p: preference(split_package(p)[0])) if found else None


# --- the private apt configuration ------------------------------------------------------------------------------

def host_mirror() -> str:
    """The Debian mirror the host's apt sources use (deb822 .sources or one-line .list), else deb.debian.org."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            with contextlib.suppress(OSError):
                texts.append(path.read_text())
    for text in texts:
        for url in re.findall(r"(?:https?|file)://\S+", text):
            url = url.rstrip("/")
            if url.endswith("/debian") and "security" not in url:
                return url
    return DEFAULT_MIRROR


@dataclass(frozen=True)
class Apt:
    """apt-get / apt-cache with holecheck's own sources, state and cache (the host's apt state is left alone)."""

    root: Path

    @classmethod
    def default(cls) -> Apt:
        return cls(cache_root() / "apt")

    @property
    def sources(self) -> Path:
        return self.root / "sources.list"

    @property
    def lists(self) -> Path:
        return self.root / "state" / "lists"

    def options(self) -> list[str]:
        return ["-o", f"Dir::Etc::sourcelist={self.sources}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State={self.root / 'state'}", "-o", f"Dir::Cache={self.root / 'cache'}",
                "-o", "APT::Get::List-Cleanup=0", "-o", "Acquire::Retries=2"]

    def write_sources(self) -> None:
        mirror = host_mirror()
        security = mirror.removesuffix("/debian") + "/debian-security"
        lines = [f"deb [signed-by={KEYRING}] {security if kind == 'security' else mirror} {suite} main"
                 for kind, suite in SUITES]
        text = "\n".join(lines) + "\n"
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)
            (self.lists / "stamp").unlink(missing_ok=True)  # new sources: the lists are stale

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        if not shutil.which(tool):
            raise SetupError(f"{tool} not found: fetching Debian kernels needs apt (a Debian or Ubuntu host)")
        argv = [tool, *self.options(), *args]
        try:
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise SetupError(f"{tool} {' '.join(args)}: no result within {APT_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "W:"))] or proc.stderr.splitlines()
            raise SetupError(f"{tool} {' '.join(args)} failed: {err[-1] if err else f'exit {proc.returncode}'}")
        return proc.stdout

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One holecheck apt user at a time (pytest-xdist workers share the cache)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def update(self, force: bool = False) -> None:
        for d in (self.lists / "partial", self.root / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        self.write_sources()
        stamp = self.lists / "stamp"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        log.info("apt-get update (private configuration in %s)", self.root)
        try:
            self._run("apt-get", "update")
        except SetupError as exc:
            if not any(self.lists.glob("*_Packages*")):
                raise
            # offline, or a mirror hiccup: the lists we have still name every kernel cached so far
            log.warning("%s; going on with the package lists from %s", exc, time.ctime(stamp.stat().st_mtime)
                        if stamp.exists() else "an earlier update")
            return
        stamp.touch()

    def kernel_packages(self) -> list[str]:
        out = self._run("apt-cache", "search", "--names-only", r"^linux-image-[0-9]")
        names = {ln.split()[0] for ln in out.splitlines() if ln.strip()}
        return sorted((n for n in names if split_package(n)[0]), key=lambda p: (abi_key(split_package(p)[0]), p))

    def download(self, package: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        self._run("apt-get", "download", package, cwd=into)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise SetupError(f"apt-get download {package}: no .deb appeared in {into}")
        return debs[-1]


# --- fetching and unpacking --------------------------------------------------------------------------------------

def kernels_dir() -> Path:
    return cache_root() / "kernels"


def list_versions(apt: Apt | None = None) -> list[str]:
    """Every ``debian:SPEC`` the private apt configuration can fetch (generic and cloud flavours), oldest first."""
    apt = apt or Apt.default()
    with apt.locked():
        apt.update()
        packages = apt.kernel_packages()
    return [abi + ("-cloud" if flavour == "cloud-amd64" else "") for abi, flavour in map(split_package, packages)]


def resolve_package(spec: VersionSpec, apt: Apt) -> str:
    """The package name for ``spec``; refreshes the lists once if nothing matches (a new upload)."""
    apt.update()
    if found := select(spec, apt.kernel_packages()):
        return found
    apt.update(force=True)
    if found := select(spec, apt.kernel_packages()):
        return found
    near = [abi for abi, flavour in map(split_package, apt.kernel_packages()) if flavour == spec.flavour]
    hint = ", ".join(near[-6:])
    raise SetupError(f"no Debian kernel package {package_name(spec.abi, spec.flavour)} in bookworm(-updates, "
                     f"-security, -backports) or trixie(-security); newest there: {hint or 'none'}")


def fetch(text: str, apt: Apt | None = None) -> Path:
    """Fetch and unpack ``debian:TEXT``; return the unpacked tree (``boot/``, ``lib/modules/``).

    Unpacked once: a tree with a ``.complete`` marker is reused without asking apt anything.
    """
    spec = parse_spec(text)
    apt = apt or Apt.default()
    # The exact-ABI specs name their directory up front, so a cached tree needs no apt lookup at all.
    exact = spec.abi if ("-" in spec.abi or "+" in spec.abi) and not spec.newest else None
    if exact:
        tree = kernels_dir() / f"{exact}-{spec.flavour}"
        if (tree / ".complete").exists():
            return tree
    with apt.locked():
        package = resolve_package(spec, apt)
        abi_flavour = package.removeprefix("linux-image-")
        tree = kernels_dir() / abi_flavour
        if (tree / ".complete").exists():
            return tree
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=apt.root) as tmp:
            deb = apt.download(package, Path(tmp))
            unpack(deb, tree)
        log.info("fetched %s in %.1f s into %s", package, time.monotonic() - t0, tree)
    return tree


def unpack(deb: Path, tree: Path) -> None:
    """``dpkg-deb -x`` into a temporary sibling, then rename: a half-unpacked tree is never seen."""
    if not shutil.which("dpkg-deb"):
        raise SetupError("dpkg-deb not found: unpacking Debian kernels needs dpkg")
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tree.name}.", dir=tree.parent))
    try:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise SetupError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        (tmp / ".complete").write_text(deb.name + "\n")
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """``python -m kernels.debian list`` | ``python -m kernels.debian fetch SPEC``."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


if __name__ == "__main__":
    main()
