"""apt with holecheck's own configuration: Debian's kernel packages without touching the host's apt state.

A private sources list (every Debian suite that carries kernels, from the mirror the host's sources use), state
and cache under ``<cache>/apt``. The kernel stanzas come from the downloaded ``Packages`` indexes (so each
package is known with its suite, dependencies and SHA256); .debs come from ``apt-get download NAME=VERSION``
into a temporary directory and are moved into ``<cache>/apt/debs`` only after their SHA256 matched the index.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from suite import locks
from suite.cache import cache_root
from suite.errors import SetupError

from .packages import PART_RE, KernelIndex, Stanza, parse

log = logging.getLogger(__name__)

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_HELPER = "/usr/lib/apt/apt-helper"  # cat-file: reads an index whatever apt compressed it with
# (mirror kind, suite): "main" suites come from the Debian mirror, "security" ones from its -security twin.
SUITES = (("main", "bookworm"), ("main", "bookworm-updates"), ("security", "bookworm-security"),
          ("main", "bookworm-backports"), ("main", "trixie"), ("security", "trixie-security"),
          ("main", "trixie-backports"), ("main", "forky"))
LISTS_MAX_AGE = 24 * 3600.0  # refresh the package lists once a day, or when a version is not found
APT_TIMEOUT = 600.0
LOCK_TIMEOUT = 3 * APT_TIMEOUT  # the holder may be downloading three .debs of a split kernel


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


def check_deb(path: Path, stanza: Stanza) -> str:
    """"" if ``path`` is the .deb the index describes, else what is wrong with it (truncated, corrupt)."""
    try:
        size = path.stat().st_size
        if stanza.size and size != stanza.size:
            return f"{size} bytes, the index says {stanza.size} (truncated or corrupt)"
        if stanza.sha256:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            return "" if digest == stanza.sha256 else f"SHA256 {digest[:16]}…, the index says {stanza.sha256[:16]}…"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    # no checksum to compare (an index without SHA256): at least dpkg must be able to read it
    proc = subprocess.run(["dpkg-deb", "--info", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return "" if proc.returncode == 0 else f"dpkg-deb --info: {proc.stderr.strip().splitlines()[-1:]}"


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

    @property
    def debs(self) -> Path:
        return self.root / "debs"

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
        if not shutil.which(tool) and not Path(tool).is_file():
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
        """One holecheck apt user at a time (pytest-xdist workers and parallel runs share the cache)."""
        with locks.held(self.root / ".lock", f"holecheck's apt cache {self.root}", LOCK_TIMEOUT):
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

    def index(self, prefix: str = "linux-", accept: re.Pattern[str] = PART_RE) -> KernelIndex:
        """The kernel stanzas (or those ``prefix`` and ``accept`` pick) of every suite's downloaded Packages index."""
        self.write_sources()  # indextargets lists the suites of the sources file: ours, whoever wrote it last
        out = self._run("apt-get", "indextargets", "--format", "$(FILENAME)\t$(CODENAME)", "Identifier: Packages")
        stanzas: list[Stanza] = []
        for line in out.splitlines():
            path, _, suite = line.partition("\t")
            if path and Path(path).is_file():
                stanzas += parse(self._run(APT_HELPER, "cat-file", path), suite, prefix, accept)
        return KernelIndex(stanzas)

    def download(self, stanza: Stanza) -> Path:
        """The verified .deb of ``stanza`` in ``debs/``: a cached one whose SHA256 matches, else a fresh download
        (into a temporary directory, checked, then moved in: a partial or corrupt file is never used)."""
        self.debs.mkdir(parents=True, exist_ok=True)
        final = self.debs / (Path(stanza.filename).name or f"{stanza.package}_{stanza.version}.deb")
        if final.exists():
            if not (problem := check_deb(final, stanza)):
                return final
            log.warning("cached %s: %s; fetching it again", final.name, problem)
            final.unlink()
        for stale in self.debs.glob(".partial-*"):  # left by a run killed mid-download (we hold the apt lock)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".partial-", dir=self.debs) as tmp:
            self._run("apt-get", "download", f"{stanza.package}={stanza.version}", cwd=Path(tmp))
            got = sorted(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise SetupError(f"apt-get download {stanza.package}={stanza.version}: expected one .deb, got "
                                 f"{[p.name for p in got]}")
            if problem := check_deb(got[0], stanza):
                raise SetupError(f"apt-get download {stanza.package}={stanza.version}: {problem}; try again "
                                 "(a mirror still syncing?)")
            os.replace(got[0], final)
        return final
