"""Debian kernel ABIs and the ``debian:SPEC`` that picks one: parsing, the one version order, selection.

An ABI is what a ``linux-image-<abi>-<flavour>`` package name carries: ``6.1.0-56`` (bookworm's old naming: upstream
6.1.x, ABI 56), ``6.12.57+deb12`` (upstream 6.12.57 built for Debian 12), ``6.12.90+deb12.1`` (a rebuild of it).
Specs (``--kernel=debian:SPEC``):

- ``6.12.57``         → that upstream version; where several builds exist (``+deb12``, ``+deb12.1``, ``+deb13``),
  the oldest release's (+deb12, the host's) first, then its newest rebuild (``preference``).
- ``6.12.90+deb12.1``, ``6.1.0-56`` → exactly that ABI.
- ``newest``, ``newest-7.3``, ``newest-6.12+deb12`` → the newest of all, of a series, of a series' +debN builds.
- a ``-cloud`` suffix (``6.12.57-cloud``, ``newest-6.12-cloud``) picks the ``-cloud-amd64`` flavour; the generic
  flavour is the default because the cloud 6.12 flavour oopses under TCG.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from suite.errors import SetupError

FLAVOURS = {"": "amd64", "cloud": "cloud-amd64"}
ABI = r"\d+\.\d+\.\d+(?:-\d+|\+deb\d+(?:\.\d+)?)"
PACKAGE_RE = re.compile(rf"^linux-image-(?P<abi>{ABI})-(?P<flavour>amd64|cloud-amd64)$")
SPEC_RE = re.compile(r"^(?P<abi>\d+\.\d+\.\d+(?:-\d+|\+deb\d+(?:\.\d+)?)?)(?:-(?P<flavour>cloud))?$")
NEWEST_RE = re.compile(r"^newest(?:-(?P<series>\d+\.\d+)(?P<build>\+deb\d+)?)?(?:-(?P<flavour>cloud))?$")


def upstream(abi: str) -> str:
    """``6.12.57+deb12`` → ``6.12.57``; bookworm's ``6.1.0-56`` names no upstream release: the ABI itself."""
    return abi.partition("+")[0]


def series(abi: str) -> str:
    """``6.12.57+deb12`` → ``6.12``, ``6.1.0-56`` → ``6.1``, ``7.3.4+deb13`` → ``7.3``."""
    return ".".join(abi.split(".")[:2])


def abi_key(abi: str) -> tuple[tuple[int, ...], int, int]:
    """The version order of ABIs (and of their upstream parts), numeric throughout:
    6.1.0-9 < 6.1.0-56 < 6.12.90+deb12 < 6.12.90+deb12.1 < 6.12.90+deb13 < 6.12.118+deb12 < 6.19.14+deb13 < 7.0.4+deb13.
    """
    up, _, build = abi.partition("+deb")
    major, _, rebuild = build.partition(".")
    return tuple(int(x) for x in re.findall(r"\d+", up)), int(major or 0), int(rebuild or 0)


def preference(abi: str) -> tuple[tuple[int, ...], int, int]:
    """Which build to take: the newest upstream version; for one upstream version built for several releases,
    the oldest release's (+deb12 bookworm-backports, the host's, before +deb13 trixie before +deb14 forky);
    then the newest rebuild (+deb12.1 before +deb12)."""
    nums, major, rebuild = abi_key(abi)
    return nums, -major, rebuild


@dataclass(frozen=True)
class VersionSpec:
    """A parsed ``debian:SPEC``: an ABI (exact, or an upstream version to match) or a series, and a flavour."""

    abi: str  # "6.1.0-56" or "6.12.90+deb12.1" (exact), "6.12.57" (any +debN build), a series "6.12(+deb12)" or ""
    flavour: str  # "amd64" or "cloud-amd64"
    newest: bool = False  # abi is a series ("" = all): the newest package in it

    @property
    def exact(self) -> str | None:
        """The ABI when the spec names exactly one (its cache entry is known without asking apt)."""
        return self.abi if not self.newest and ("-" in self.abi or "+" in self.abi) else None

    def matches(self, package: str) -> bool:
        abi, flavour = split_package(package)
        if not abi or flavour != self.flavour:
            return False
        if self.newest:
            wanted, _, build = self.abi.partition("+")
            in_build = not build or re.fullmatch(rf"\+{build}(\.\d+)?", abi[len(upstream(abi)):]) is not None
            return (not wanted or series(abi) == wanted) and in_build
        return abi == self.abi or ("-" not in self.abi and "+" not in self.abi and abi.startswith(self.abi + "+"))


def parse_spec(text: str) -> VersionSpec:
    """``6.12.57``, ``6.12.57-cloud``, ``6.1.0-56``, ``6.12.90+deb12.1``, ``newest(-7.3)(-cloud)`` → VersionSpec."""
    text = text.strip()
    if m := NEWEST_RE.match(text):
        return VersionSpec((m["series"] or "") + (m["build"] or ""), FLAVOURS[m["flavour"] or ""], newest=True)
    m = SPEC_RE.match(text)
    if not m:
        raise SetupError(f"debian:{text}: not a Debian kernel version (e.g. 7.3.4, 6.12.57-cloud, 6.1.0-56, "
                         "newest, newest-6.12+deb12; debian:list shows what is available)")
    abi = m["abi"]
    if re.fullmatch(r"\d+\.\d+\.0", abi) and abi.startswith("6.1."):
        raise SetupError(f"debian:{text}: 6.1 kernels are named by ABI, e.g. debian:6.1.0-56")
    return VersionSpec(abi, FLAVOURS[m["flavour"] or ""])


def package_name(abi: str, flavour: str = "amd64") -> str:
    return f"linux-image-{abi}-{flavour}"


def split_package(name: str) -> tuple[str, str]:
    """``linux-image-6.12.57+deb12-cloud-amd64`` → (``6.12.57+deb12``, ``cloud-amd64``); ("", "") if not one."""
    m = PACKAGE_RE.match(name)
    return (m["abi"], m["flavour"]) if m else ("", "")


def select(spec: VersionSpec, packages: Iterable[str]) -> str | None:
    """The preferred package among ``packages`` that ``spec`` matches."""
    found = [p for p in packages if spec.matches(p)]
    return max(found, key=lambda p: preference(split_package(p)[0])) if found else None


def by_series(abis: Iterable[str]) -> dict[str, list[str]]:
    """ABIs grouped by series, series and ABIs each in version order."""
    groups: dict[str, list[str]] = {}
    for abi in sorted(set(abis), key=abi_key):
        groups.setdefault(series(abi), []).append(abi)
    return dict(sorted(groups.items(), key=lambda kv: abi_key(kv[0])))
