"""Kernel modules a boot needs: found in a modules tree, decompressed, ordered so that dependencies load first.

The host may lack kmod (no modinfo/modprobe), and the initramfs loads modules with busybox ``insmod``, which
resolves nothing itself: so dependencies come from each module's ELF ``.modinfo`` section (``depends=``).
"""
from __future__ import annotations

import lzma
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from suite.errors import SetupError

from . import elf

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's .modinfo section (keys may repeat: alias=, parm=)."""
    blob = elf.section(data, ".modinfo")
    if blob is None:
        raise elf.ElfError("no .modinfo section")
    info: dict[str, list[str]] = {}
    for entry in blob.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def depends(info: dict[str, list[str]]) -> list[str]:
    return [d for v in info.get("depends", []) for d in v.split(",") if d]


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike (virtio-mmio == virtio_mmio)."""
    return name.replace("-", "_")


def decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise SetupError(f"{path.name}: zstd-compressed module and no zstd program (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60).stdout
    return data


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    data: bytes  # decompressed: busybox insmod loads plain ELF only
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one kernel release: ``<root>/lib/modules/<release>/kernel/**``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index: dict[str, Path] = {}
        for path in sorted(directory.rglob("*.ko*")):
            for suffix in SUFFIXES:
                if path.name.endswith(suffix):
                    self.index[normalize(path.name.removesuffix(suffix))] = path

    def load(self, name: str) -> Module:
        path = self.index.get(normalize(name))
        if path is None:
            raise SetupError(f"kernel module {name} not found under {self.directory}")
        data = decompress(path)
        try:
            deps = tuple(normalize(d) for d in depends(modinfo(data)))
        except elf.ElfError as exc:
            raise SetupError(f"kernel module {path}: {exc}") from None
        return Module(normalize(name), path, data, deps)

    def load_order(self, names: list[str]) -> list[Module]:
        """``names`` and everything they depend on, each after its dependencies (depth-first post-order)."""
        ordered: dict[str, Module] = {}
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = normalize(name)
            if name in ordered:
                return
            if name in visiting:
                raise SetupError(f"kernel modules: dependency cycle through {name}")
            visiting.add(name)
            mod = self.load(name)
            for dep in mod.depends:
                visit(dep)
            visiting.discard(name)
            ordered[name] = mod

        for n in names:
            visit(n)
        return list(ordered.values())


def modules_dir(tree: Path, release: str) -> Path | None:
    """``lib/modules/<release>`` of an unpacked package (merged-/usr packages put it under ``usr/``)."""
    for base in (tree / "lib" / "modules" / release, tree / "usr" / "lib" / "modules" / release):
        if base.is_dir():
            return base
    return None
