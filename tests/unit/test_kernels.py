"""Pure parts of booting a kernel under test: version specs, ELF notes and .modinfo, module order, vmlinux
extraction, kconfig checks, the cpio writer. No network, no VM."""
from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from images import cpio, initramfs
from kernels import config_check, debian, elf, kernel, modules, vmlinux
from suite.errors import SetupError

# --- a tiny ELF64 builder: just what the readers look at --------------------------------------------------------


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(sections: dict[str, bytes], notes: bytes = b"") -> bytes:
    """ELF64 LE with the given sections (+ .shstrtab) and, if ``notes``, one PT_NOTE segment holding them."""
    names = ["", *sections, ".shstrtab"]
    shstrtab = b"".join(n.encode() + b"\0" for n in names)
    name_off = {n: shstrtab.index(n.encode() + b"\0") if n else 0 for n in names}
    blobs = [b"", *sections.values(), shstrtab]
    body = bytearray(b"\0" * 64)
    phoff = len(body) if notes else 0
    if notes:
        body += b"\0" * 56
    note_off = len(body)
    body += notes
    offsets = []
    for blob in blobs:
        offsets.append(len(body))
        body += blob
    shoff = len(body)
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        stype = 0 if i == 0 else 3 if name == ".shstrtab" else 1
        body += struct.pack("<IIQQQQIIQQ", name_off[name], stype, 0, 0, offsets[i], len(blob), 0, 0, 1, 0)
    body[:16] = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    struct.pack_into("<HHIQQQIHHHHHH", body, 16, 2, 62, 1, 0, phoff, shoff, 0, 64, 56, 1 if notes else 0,
                     64, len(blobs), len(blobs) - 1)
    if notes:
        struct.pack_into("<IIQQQQQQ", body, phoff, elf.PT_NOTE, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return bytes(body)


def modinfo_blob(**fields: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())


# --- version specs → package names ------------------------------------------------------------------------------

PACKAGES = [
    "linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-cloud-amd64",
    "linux-image-6.12.57+deb12-amd64", "linux-image-6.12.57+deb12-cloud-amd64",
    "linux-image-6.12.90+deb12-amd64", "linux-image-6.12.90+deb12.1-amd64",
    "linux-image-6.12.95+deb12-amd64", "linux-image-6.12.95+deb13-amd64", "linux-image-6.12.117+deb13-amd64",
]


@pytest.mark.parametrize(("spec", "package"), [
    ("6.12.57", "linux-image-6.12.57+deb12-amd64"),
    ("6.12.57-cloud", "linux-image-6.12.57+deb12-cloud-amd64"),
    ("6.1.0-56", "linux-image-6.1.0-56-amd64"),
    ("6.1.0-56-cloud", "linux-image-6.1.0-56-cloud-amd64"),
    ("6.12.90", "linux-image-6.12.90+deb12.1-amd64"),  # the newest rebuild of one upstream version
    ("6.12.90+deb12", "linux-image-6.12.90+deb12-amd64"),  # exactly that ABI
    ("6.12.95", "linux-image-6.12.95+deb12-amd64"),  # bookworm-backports before trixie for one upstream version
    ("6.12.95+deb13", "linux-image-6.12.95+deb13-amd64"),
    ("6.12.117", "linux-image-6.12.117+deb13-amd64"),  # trixie only
    ("newest-6.12", "linux-image-6.12.117+deb13-amd64"),
    ("newest-6.12+deb12", "linux-image-6.12.95+deb12-amd64"),
    ("newest-6.1", "linux-image-6.1.0-56-amd64"),  # numeric, not string, order: -56 after -9
])
def test_spec_selects_package(spec: str, package: str) -> None:
    assert debian.select(debian.parse_spec(spec), PACKAGES) == package


def test_spec_without_package_selects_nothing() -> None:
    assert debian.select(debian.parse_spec("6.12.58"), PACKAGES) is None
    assert debian.select(debian.parse_spec("newest-6.6"), PACKAGES) is None


@pytest.mark.parametrize("bad", ["6.12", "latest", "6.12.57-rt", "6.1.0", "6.12.57;rm", ""])
def test_bad_spec_is_one_line_setup_error(bad: str) -> None:
    with pytest.raises(SetupError) as err:
        debian.parse_spec(bad)
    assert "\n" not in str(err.value)


def test_package_name() -> None:
    assert debian.package_name("6.12.57+deb12") == "linux-image-6.12.57+deb12-amd64"
    assert debian.package_name("6.1.0-56", "cloud-amd64") == "linux-image-6.1.0-56-cloud-amd64"


def test_host_mirror_is_a_debian_url() -> None:
    assert debian.host_mirror().startswith(("http://", "https://", "file://"))


# --- ELF: PVH note, .modinfo ------------------------------------------------------------------------------------


def test_pvh_note_found() -> None:
    image = make_elf({".text": b"\x90" * 16}, notes=note(b"Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY, b"\0" * 8))
    assert elf.has_pvh_entry(image)


def test_other_notes_are_not_pvh() -> None:
    image = make_elf({".text": b"\x90"}, notes=note(b"GNU", 3, b"\1" * 20) + note(b"Xen", 5, b"xen-3.0\0"))
    assert not elf.has_pvh_entry(image)
    assert [n.name for n in elf.notes(image)] == [b"GNU", b"Xen"]


def test_not_elf_is_rejected() -> None:
    with pytest.raises(elf.ElfError):
        elf.notes(b"MZ" + b"\0" * 100)


def test_modinfo_parsing() -> None:
    blob = modinfo_blob(license="GPL", depends="virtio,virtio_ring", name="virtio_mmio", alias="of:N*T*Cvirtio,mmio")
    data = make_elf({".text": b"\xc3", ".modinfo": blob + b"alias=virtio:d*\0"})
    info = modules.modinfo(data)
    assert info["name"] == ["virtio_mmio"]
    assert info["alias"] == ["of:N*T*Cvirtio,mmio", "virtio:d*"]
    assert modules.depends(info) == ["virtio", "virtio_ring"]
    assert modules.depends(modules.modinfo(make_elf({".modinfo": modinfo_blob(depends="")}))) == []


def write_module(root: Path, rel: str, depends: str, compress: str = "") -> None:
    data = make_elf({".modinfo": modinfo_blob(depends=depends, name=Path(rel).name)})
    path = root / (rel + ".ko" + compress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ) if compress == ".xz"
                     else gzip.compress(data) if compress == ".gz" else data)


def test_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    write_module(tmp_path, "kernel/drivers/virtio/virtio_ring", "", ".xz")
    write_module(tmp_path, "kernel/drivers/virtio/virtio", "virtio_ring", ".xz")
    write_module(tmp_path, "kernel/drivers/virtio/virtio_mmio", "virtio,virtio_ring", ".xz")
    write_module(tmp_path, "kernel/fs/fuse/fuse", "")
    write_module(tmp_path, "kernel/fs/fuse/virtiofs", "fuse,virtio,virtio_ring", ".gz")
    tree = modules.ModuleTree(tmp_path)
    order = [m.name for m in tree.load_order(["virtiofs", "virtio-mmio"])]
    assert order == ["fuse", "virtio_ring", "virtio", "virtiofs", "virtio_mmio"]
    assert all(m.data[:4] == b"\x7fELF" for m in tree.load_order(["virtiofs"]))  # decompressed for insmod


def test_missing_module_and_cycles_are_setup_errors(tmp_path: Path) -> None:
    write_module(tmp_path, "a", "b")
    write_module(tmp_path, "b", "a")
    tree = modules.ModuleTree(tmp_path)
    with pytest.raises(SetupError, match="cycle"):
        tree.load_order(["a"])
    with pytest.raises(SetupError, match="not found"):
        tree.load_order(["nope"])


def test_needed_modules_follow_the_config() -> None:
    cfg = {"VIRTIO": "m", "VIRTIO_MMIO": "m", "VIRTIO_PCI": "m", "VIRTIO_FS": "y", "FUSE_FS": "m"}
    assert kernel.needed_modules(cfg, "microvm") == ["virtio", "virtio_mmio", "fuse"]
    assert kernel.needed_modules(cfg, "pc") == ["virtio", "virtio_pci", "fuse"]


# --- vmlinux out of a bzImage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress],
                         ids=["xz", "gzip"])
def test_extract_vmlinux(compress) -> None:
    payload = make_elf({".text": b"\x90" * 4096}, notes=note(b"Xen", 18, b"\0" * 4))
    # a false magic before the payload, the bzImage's trailer after it
    image = b"MZ" + b"\0" * 500 + vmlinux.XZ_MAGIC + b"junk" + compress(payload) + b"\xaa" * 64
    found = vmlinux.extract(image)
    assert found is not None and found[0] == payload


def test_extract_vmlinux_none_without_payload() -> None:
    assert vmlinux.extract(b"MZ" + b"\0" * 1000) is None


def test_bzimage_release_from_setup_header(tmp_path: Path) -> None:
    img = bytearray(0x1000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x600)  # version string at 0x200 + 0x600
    img[0x800:0x840] = b"6.12.57+deb12-amd64 (debian-kernel@lists.debian.org) #1\0".ljust(0x40, b"\0")
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(img))
    assert kernel.bzimage_release(path) == "6.12.57+deb12-amd64"
    path.write_bytes(b"\0" * 0x1000)
    assert kernel.bzimage_release(path) == ""


# --- kconfig check ----------------------------------------------------------------------------------------------

GOOD = {o: "y" for o in config_check.fragment().required}


def test_config_parse() -> None:
    cfg = config_check.parse('CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D="x y"\n# comment\n')
    assert cfg == {"A": "y", "B": "m", "C": "n", "D": "x y"}


def test_config_complete_has_no_problems() -> None:
    assert config_check.problems(GOOD) == []
    assert config_check.problems({**GOOD, "VIRTIO_FS": "m", "FUSE_FS": "m"}) == []  # drivers may be modules


def test_config_one_line_per_missing_option() -> None:
    cfg = {**GOOD, "USERFAULTFD": "n", "TRANSPARENT_HUGEPAGE": "n", "MEMCG": "m"}
    cfg.pop("DEVTMPFS")
    lines = config_check.problems(cfg)
    assert lines == [
        "CONFIG_TRANSPARENT_HUGEPAGE is not set: holecheck needs =y",
        "CONFIG_USERFAULTFD is not set: holecheck needs =y",
        "CONFIG_MEMCG=m: holecheck needs =y",
        "CONFIG_DEVTMPFS is not set: holecheck needs =y",
    ]


def test_config_missing_optional_is_one_warning_line_each_saying_what_is_skipped() -> None:
    optional = {o: "y" for o in [*config_check.fragment().optional, *config_check.FEATURES]}
    assert config_check.missing_optional({**GOOD, **optional}) == []
    assert config_check.missing_optional({**GOOD, **optional, "ZRAM": "m"}) == []  # loaded from the initramfs
    cfg = {**GOOD, **optional, "KSM": "n"}
    cfg.pop("DEBUG_FS")
    assert config_check.missing_optional(cfg) == [
        "CONFIG_KSM is not set: the KSM split cells (ksm, ksm-zero, -same-by-ksm) are skipped without it",
        "CONFIG_DEBUG_FS is not set: the debugfs split trigger (split_huge_pages) is skipped without it",
    ]
    assert config_check.problems(cfg) == []  # never stops the session
    no_soft_dirty = {**GOOD, **optional, "MEM_SOFT_DIRTY": "n", "IKCONFIG": "n"}  # IKCONFIG costs no cell
    assert config_check.missing_optional(no_soft_dirty) == [
        "CONFIG_MEM_SOFT_DIRTY is not set: soft-dirty scenarios are skipped without it"]
    frag = config_check.fragment()  # warned about, never forced onto holecheck's own builds (their config hash)
    assert not set(config_check.FEATURES) & (set(frag.required) | set(frag.optional))


def test_config_transport_follows_machine() -> None:
    cfg = {**GOOD, "VIRTIO_MMIO": "n"}
    assert config_check.problems(cfg, "microvm") == ["CONFIG_VIRTIO_MMIO is not set: holecheck needs =y or m"]
    assert config_check.problems(cfg, "pc") == ["CONFIG_VIRTIO_PCI is not set: holecheck needs =y or m"]


def test_find_config(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.12.57+deb12-amd64").write_bytes(b"")
    (boot / "config-6.12.57+deb12-amd64").write_text("CONFIG_A=y\n")
    assert config_check.find_config(boot / "vmlinuz-6.12.57+deb12-amd64") == boot / "config-6.12.57+deb12-amd64"
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"")
    (tree / ".config").write_text("CONFIG_A=y\n")
    assert config_check.find_config(tree / "arch/x86/boot/bzImage") == tree / ".config"


def test_missing_kernel_path_is_setup_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="no such kernel image"):
        kernel.resolve("path", str(tmp_path / "bzImage"))


# --- cpio newc --------------------------------------------------------------------------------------------------


def test_cpio_round_trip() -> None:
    w = cpio.CpioWriter()
    w.directory("bin")
    w.file("bin/busybox", b"\x7fELF" + b"x" * 4093, 0o755)  # odd size: padding
    w.symlink("bin/sh", "busybox")
    w.char_device("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\n", 0o755)
    data = bytes(w)
    assert len(data) % 4 == 0 and data.startswith(b"070701")
    entries = {e.name: e for e in cpio.read(data)}
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
    assert entries["bin/busybox"].data == b"\x7fELF" + b"x" * 4093
    assert entries["bin/busybox"].mode == 0o100755
    assert entries["bin/sh"].data == b"busybox" and entries["bin/sh"].mode == 0o120777
    assert entries["dev/console"].rdev == (5, 1)
    assert data.endswith(b"\0") and b"TRAILER!!!" in data[-128:]


def test_cpio_is_deterministic() -> None:
    def build() -> bytes:
        w = cpio.CpioWriter()
        w.file("a", b"1")
        return bytes(w)

    assert build() == build()


def test_initramfs_archive_layout(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(make_elf({".text": b"\x90"}))  # no PT_INTERP: static
    assert initramfs.is_static(busybox)
    mods = [modules.Module("virtio_mmio", Path("x"), b"\x7fELFmod", ())]
    entries = {e.name: e for e in cpio.read(initramfs.archive(mods, busybox=busybox, init=b"#!/bin/sh\n"))}
    assert entries["init"].mode & 0o777 == 0o755
    assert entries["lib/modules/00-virtio_mmio.ko"].data == b"\x7fELFmod"
    assert entries["etc/modules.order"].data == b"00-virtio_mmio.ko\n"
    assert entries["dev/console"].rdev == (5, 1)


def test_optional_modules_only_when_built_as_modules_and_loadable(tmp_path: Path) -> None:
    """zram rides along (for pageout-swap) when =m and its dependencies are there; never breaks a boot otherwise."""
    write_module(tmp_path, "kernel/drivers/block/zram/zram", "lz4hc_compress", ".xz")
    tree = modules.ModuleTree(tmp_path)
    assert kernel.optional_modules({"ZRAM": "m"}, tree) == []  # lz4hc_compress missing: left out
    write_module(tmp_path, "kernel/crypto/lz4hc_compress", "", ".xz")
    tree = modules.ModuleTree(tmp_path)
    assert kernel.optional_modules({"ZRAM": "m"}, tree) == ["zram"]
    assert kernel.optional_modules({"ZRAM": "y"}, tree) == []
    assert kernel.optional_modules({}, tree) == []
