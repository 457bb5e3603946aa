"""Parsing ``--kernel`` values: what kernel a scenario runs on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError

KINDS = ("host", "debian", "path", "build", "patched")


@dataclass(frozen=True)
class KernelSpec:
    """``host`` (the running kernel), ``debian:VERSION`` (Debian's package), a bzImage/vmlinux PATH,
    ``build:LINUX_TREE`` (configured with kernels/holecheck.config and built), or ``patched:VERSION:SERIES``
    (Debian's linux-source VERSION plus the patch series kernels/patches/SERIES/, built with the same recipe)."""

    kind: str
    value: str = ""

    @property
    def id(self) -> str:
        """Parametrize id: 'host', 'debian-6.12.57', 'bzImage', 'build-linux'."""
        if self.kind == "host":
            return "host"
        if self.kind in ("path", "build"):
            name = Path(self.value).name or self.value
            return name if self.kind == "path" else f"build-{name}"
        return f"{self.kind}-{self.value.replace(':', '-')}"

    def __str__(self) -> str:
        return "host" if self.kind == "host" else (self.value if self.kind == "path" else f"{self.kind}:{self.value}")


def parse(text: str) -> KernelSpec:
    text = text.strip()
    if text == "host":
        return KernelSpec("host")
    kind, sep, value = text.partition(":")
    if sep and kind in ("debian", "build"):
        if not value:
            raise SetupError(f"--kernel={text}: missing {'version' if kind == 'debian' else 'tree'} after '{kind}:'")
        return KernelSpec(kind, value)
    if sep and kind == "patched":
        version, _, series = value.partition(":")
        if not version or not series:
            raise SetupError(f"--kernel={text}: want patched:VERSION:SERIES (e.g. patched:7.3.4:ksm-keep-uffd-wp: "
                             "Debian's linux-source 7.3.4 plus kernels/patches/ksm-keep-uffd-wp/)")
        return KernelSpec(kind, value)
    path = Path(text).expanduser()
    if not path.exists():
        raise SetupError(f"--kernel={text}: no such kernel image (expected host, debian:VERSION, build:TREE, "
                         "patched:VERSION:SERIES or PATH)")
    if path.is_dir():
        raise SetupError(f"--kernel={text}: a directory, not a kernel image: give build:{text} to build that tree, "
                         "or PATH/bzImage")
    from kernels.kernel import image_problem

    if problem := image_problem(path):
        raise SetupError(f"--kernel={text}: not a kernel image: {problem}; give a bzImage/vmlinuz or vmlinux")
    return KernelSpec("path", str(path.resolve()))


def parse_many(values: list[str]) -> list[KernelSpec]:
    """Each --kernel may be repeated or comma-separated: a matrix."""
    specs = [parse(v) for raw in values for v in raw.split(",") if v.strip()]
    return list(dict.fromkeys(specs)) or [KernelSpec("host")]
