"""``Kernel``: everything an L1 VM boots from, resolved from ``debian:VERSION`` or a kernel image path.

The image QEMU gets is the extracted PVH ``vmlinux`` where the kernel has one (booted on ``-M microvm``, no
decompressor), else the bzImage itself (booted on ``-M pc``). The modules are the virtio/fuse drivers the
kernel's config builds as modules, with their dependencies, decompressed and in load order.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

from suite.cache import cache_root
from suite.errors import SetupError

from . import config_check, debian, vmlinux
from .modules import Module, ModuleTree, modules_dir

log = logging.getLogger(__name__)

# The drivers a boot needs, by the config option that builds them (only =m ones go into the initramfs).
DRIVERS = {"VIRTIO": "virtio", "VIRTIO_MMIO": "virtio_mmio", "VIRTIO_PCI": "virtio_pci",
           "VIRTIO_CONSOLE": "virtio_console", "FUSE_FS": "fuse", "VIRTIO_FS": "virtiofs"}
# Optional extras, loaded when =m and found beside the required ones (a boot never fails for want of them):
# zram gives the ``pageout-swap`` split trigger a swap device that lives and dies inside the L1 VM.
OPTIONAL = {"ZRAM": "zram"}
UNUSED_TRANSPORT = {"microvm": "VIRTIO_PCI", "pc": "VIRTIO_MMIO"}
HEAD_BYTES = 1 << 16  # a kernel's setup header, or an ELF header with its program headers
ET_EXEC, EM_X86_64 = 2, 62


@dataclass(frozen=True)
class Kernel:
    name: str  # as the user named it: "debian:6.12.95", or the image path
    release: str  # uname -r, as far as the image tells ("" if it does not)
    image: Path  # what QEMU's -kernel gets
    pvh: bool  # image is an ELF vmlinux with a PVH entry
    config_path: Path | None
    config: dict[str, str] = field(default_factory=dict, repr=False)
    modules: tuple[Module, ...] = field(default=(), repr=False)

    @property
    def machine(self) -> str:
        """QEMU machine type: microvm boots a PVH vmlinux; a bzImage without one boots on pc."""
        return "microvm" if self.pvh else "pc"

    @property
    def acpi(self) -> bool:
        """Give the VM ACPI tables? A kernel built without ACPI (holecheck's minimal config) finds microvm's
        virtio-mmio devices on its command line instead, which QEMU writes there only when ACPI is off."""
        return not self.config or self.config.get("ACPI") == "y"


def bzimage_release(path: Path) -> str:
    """The release string in a bzImage's setup header (the first word of its kernel_version string)."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return ""
    ptr, = struct.unpack_from("<H", head, 0x20E)
    text = head[0x200 + ptr : 0x200 + ptr + 256].split(b"\0")[0].decode(errors="replace")
    return text.split()[0] if text.strip() else ""


def image_problem(path: Path) -> str:
    """Why ``path`` is not a kernel QEMU can boot ("" if it looks like one): neither a bzImage (setup header
    "HdrS") nor an x86-64 ELF vmlinux, or shorter than its own headers say (truncated)."""
    from . import elf

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if size == 0:
        return "it is empty"
    if head[:4] == elf.MAGIC:
        try:
            need = elf.required_size(head)
        except (elf.ElfError, struct.error) as exc:
            return f"a broken ELF file ({exc})"
        if need > size:
            return f"a truncated ELF file ({size} bytes; its headers need {need})"
        e_type, e_machine = struct.unpack_from("<HH", head, 0x10)
        if (e_type, e_machine) != (ET_EXEC, EM_X86_64):
            return "an ELF file but not an x86-64 vmlinux (not a fixed-address executable)"
        return ""
    if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
        setup_sects = head[0x1F1] or 4  # 0 means 4 (the boot protocol's oldest rule)
        syssize, = struct.unpack_from("<I", head, 0x1F4)
        need = (setup_sects + 1) * 512 + syssize * 16
        return f"a truncated bzImage ({size} bytes; its setup header needs {need})" if need > size else ""
    return "neither a bzImage (no 'HdrS' setup header) nor an ELF vmlinux"


def _boot_image(bzimage: Path) -> tuple[Path, bool]:
    """(image for -kernel, is PVH vmlinux)."""
    with open(bzimage, "rb") as f:
        magic = f.read(4)
    if magic == b"\x7fELF":  # already a vmlinux
        from . import elf

        return bzimage, elf.has_pvh_entry(bzimage.read_bytes())
    found = vmlinux.cached_vmlinux(bzimage, cache_root() / "vmlinux")
    return (found, True) if found else (bzimage, False)


def _module_trees(image: Path, release: str, config_path: Path | None) -> list[Path]:
    dirs = []
    if release:
        # <tree>/boot/vmlinuz-R beside <tree>/lib/modules/R (an unpacked package), then the host's /lib/modules/R
        for root in (image.parent.parent, Path("/")):
            if (d := modules_dir(root, release)) is not None:
                dirs.append(d)
    if config_path is not None and config_path.name == ".config":
        dirs.append(config_path.parent)  # a build tree: modules sit beside their sources
    return dirs


def needed_modules(config: dict[str, str], machine: str) -> list[str]:
    skip = UNUSED_TRANSPORT[machine]
    return [mod for opt, mod in DRIVERS.items() if opt != skip and config.get(opt) == "m"]


def optional_modules(config: dict[str, str], tree: ModuleTree) -> list[str]:
    """``OPTIONAL`` modules this kernel builds as modules and whose dependencies ``tree`` holds too."""
    out = []
    for opt, mod in OPTIONAL.items():
        if config.get(opt) != "m" or mod not in tree.index:
            continue
        try:
            tree.load_order([mod])
        except SetupError as exc:
            log.info("optional module %s left out: %s", mod, exc)
            continue
        out.append(mod)
    return out


def from_image(name: str, image: Path, release: str = "", config_path: Path | None = None) -> Kernel:
    """Resolve a kernel image (bzImage/vmlinuz or vmlinux) into a bootable ``Kernel``; check its config."""
    if not image.is_file():
        raise SetupError(f"{name}: no such kernel image {image}")
    if problem := image_problem(image):
        raise SetupError(f"{name}: not a kernel image: {problem}; give a bzImage/vmlinuz or vmlinux")
    release = release or bzimage_release(image)
    config_path = config_path or config_check.find_config(image)
    boot, pvh = _boot_image(image)
    machine = "microvm" if pvh else "pc"
    config: dict[str, str] = {}
    if config_path is None:
        log.warning("%s: no kernel config found beside %s: not checked, no modules loaded", name, image)
    else:
        config = config_check.parse(config_path.read_text())
        if problems := config_check.problems(config, machine):
            raise SetupError(f"{name}: kernel config {config_path} lacks what holecheck needs:\n  "
                             + "\n  ".join(problems))
    modules: list[Module] = []
    if wanted := needed_modules(config, machine):
        trees = _module_trees(image, release, config_path)
        for d in trees:
            tree = ModuleTree(d)
            if all(w in tree.index for w in wanted):
                modules = tree.load_order(wanted + optional_modules(config, tree))
                break
        else:
            raise SetupError(f"{name}: modules {', '.join(wanted)} (=m in its config) not found in "
                             f"{', '.join(map(str, trees)) or 'any modules tree (release unknown)'}")
    log.info("%s: release %s, booting %s on %s, modules %s", name, release or "?", boot.name, machine,
             " ".join(m.name for m in modules) or "none")
    return Kernel(name, release, boot, pvh, config_path, config, tuple(modules))


def from_debian(version: str) -> Kernel:
    if version == "list":  # --kernel=debian:list: what could be booted, as the one-line answer
        raise SetupError("Debian kernels available (debian:SPEC):\n  " + "\n  ".join(debian.list_versions()))
    tree = debian.fetch(version)
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise SetupError(f"debian:{version}: the package unpacked in {tree} has no boot/vmlinuz-*")
    release = images[0].name.removeprefix("vmlinuz-")
    return from_image(f"debian:{version}", images[0], release, tree / "boot" / f"config-{release}")


def resolve(kind: str, value: str) -> Kernel:
    """A ``suite.kernelspec.KernelSpec``'s kind/value → Kernel."""
    if kind == "debian":
        return from_debian(value)
    if kind == "path":
        return from_image(value, Path(value).expanduser())
    raise SetupError(f"kernel kind {kind!r} cannot be booted in a VM (debian:VERSION or a kernel image path)")
