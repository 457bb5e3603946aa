"""The kernel stanzas of Debian's ``Packages`` indexes: which kernel is in which suite, and which .debs make it.

Two packagings exist. Up to 6.18 ``linux-image-R`` holds ``boot/vmlinuz-R``, ``boot/config-R`` and the modules.
From 6.19 (trixie-backports, forky) ``linux-image-R`` is an empty meta package that depends on
``linux-binary-R`` (the kernel), ``linux-modules-R`` and ``linux-base-R`` (the config), which put everything under
``usr/lib/modules/R/``. ``KernelIndex.parts`` names the .debs to fetch for either.
"""
from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cmp_to_key

from .versions import ABI, split_package

PART_RE = re.compile(rf"^linux-(?P<part>image|binary|modules|base)-(?P<abi>{ABI})-(?P<flavour>amd64|cloud-amd64)$")
SPLIT_PARTS = ("binary", "modules", "base")
FIELDS = ("Package", "Version", "Depends", "Filename", "Size", "SHA256")


@dataclass(frozen=True)
class Stanza:
    """One package version in one suite's index (only the fields holecheck reads)."""

    package: str
    version: str
    suite: str
    depends: tuple[str, ...] = ()  # package names (version constraints dropped, alternatives flattened)
    filename: str = ""  # pool/main/l/linux/…deb
    size: int = 0
    sha256: str = ""


def depends(field: str) -> tuple[str, ...]:
    """``a | b (>= 1), c (= 2)`` → (a, b, c)."""
    return tuple(alt.split()[0] for item in field.split(",") for alt in item.split("|") if alt.strip())


def parse(text: str, suite: str, prefix: str = "linux-", accept: re.Pattern[str] = PART_RE) -> list[Stanza]:
    """The stanzas of one Packages index whose name starts with ``prefix`` and matches ``accept``: by default the
    kernel stanzas (linux-image/-binary/-modules/-base-<abi>-<flavour>); ``kernels.qemu`` asks for QEMU's.

    The indexes are up to 60 MB; looking only at stanzas that start with ``Package: PREFIX`` keeps this ~0.1 s.
    """
    found = []
    lead = re.escape(prefix)
    first = re.match(rf"Package: ({lead}[^\n]*)", text)  # the rest start after a newline: a literal-led search
    for m in itertools.chain([first] if first else [], re.finditer(rf"\nPackage: ({lead}[^\n]*)", text)):
        if not accept.match(name := m[1].strip()):
            continue
        end = text.find("\n\n", m.end())
        block = text[m.start():end if end >= 0 else len(text)]
        fields = dict(re.findall(rf"^({'|'.join(FIELDS)}): (.*)$", block, re.M))
        found.append(Stanza(name, fields.get("Version", ""), suite, depends(fields.get("Depends", "")),
                            fields.get("Filename", ""), int(fields.get("Size", 0)), fields.get("SHA256", "")))
    return found


def dpkg_compare(a: str, b: str) -> int:
    """Debian version order (``dpkg --compare-versions``): only asked when one package has two versions."""
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], capture_output=True, timeout=10, check=False)
    return -1 if lt.returncode == 0 else 1


class KernelIndex:
    """The kernel stanzas of every suite in the private apt configuration."""

    def __init__(self, stanzas: Iterable[Stanza]) -> None:
        self.by_name: dict[str, list[Stanza]] = {}
        for s in stanzas:
            self.by_name.setdefault(s.package, []).append(s)

    def images(self) -> list[str]:
        """Every ``linux-image-<abi>-<flavour>`` package name."""
        return sorted(n for n in self.by_name if split_package(n)[0])

    def suites(self, package: str) -> list[str]:
        return list(dict.fromkeys(s.suite for s in self.by_name.get(package, [])))

    def stanza(self, package: str) -> Stanza | None:
        """The newest version of ``package`` in any suite (the first suite that carries it among equals)."""
        found = self.by_name.get(package, [])
        if len({s.version for s in found}) > 1:
            return max(found, key=cmp_to_key(lambda a, b: dpkg_compare(a.version, b.version)))
        return found[0] if found else None

    def _split_parts(self, top: Stanza) -> list[str]:
        """The linux-binary/-modules/-base package names of ``top``'s ABI that it depends on (split packaging)."""
        m = PART_RE.match(top.package)
        assert m is not None
        wanted = {f"linux-{part}-{m['abi']}-{m['flavour']}" for part in SPLIT_PARTS}
        return [name for name in top.depends if name in wanted]

    def missing(self, image: str) -> list[str]:
        """The parts ``image`` depends on that no suite carries (the archive dropped them): empty if fetchable."""
        top = self.stanza(image)
        return [name for name in self._split_parts(top) if name not in self.by_name] if top else []

    def fetchable(self) -> list[str]:
        """The images whose every part some suite carries: what ``newest*`` and bisection may pick."""
        return [name for name in self.images() if not self.missing(name)]

    def parts(self, image: str) -> list[Stanza]:
        """The .debs that hold ``image``'s kernel, config and modules: the image itself (old packaging), or the
        linux-binary/-modules/-base packages of its ABI that it depends on (split packaging)."""
        top = self.stanza(image)
        if top is None:
            return []
        if not (split := self._split_parts(top)):
            return [top]
        if missing := self.missing(image):
            raise LookupError(f"{image} depends on {', '.join(missing)}, which no suite carries")
        return [s for s in map(self.stanza, split) if s is not None]
