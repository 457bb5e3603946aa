"""Just enough ELF64 reading for holecheck: section contents by name and the notes of an image.

Used for the PVH entry note of a vmlinux and the ``.modinfo`` section of kernel modules; the host may have
neither binutils nor kmod, and both questions are a few struct reads.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\x7fELF"
PT_NOTE = 4
SHT_NOTE = 7
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point (arch/x86/platform/pvh/head.S)


class ElfError(ValueError):
    """Not a little-endian ELF64 file, or a truncated one."""


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


def _check(data: bytes | memoryview) -> None:
    if len(data) < 64 or bytes(data[:4]) != MAGIC:
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("not a little-endian ELF64 file")


def _sections(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(name offset, type, file offset, size) of each section header."""
    _check(data)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        base = shoff + i * shentsize
        if base + 64 > len(data):
            raise ElfError("section header table runs past the end of the file")
        name, stype = struct.unpack_from("<II", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        yield name, stype, offset, size


def required_size(head: bytes | memoryview) -> int:
    """How long the ELF64 file starting with ``head`` must be: the end of its section header table and of every
    segment's file data (a longer file is fine; a shorter one was truncated). ``head`` must hold the program
    header table (it follows the ELF header in a vmlinux)."""
    _check(head)
    phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
    end = max(64, phoff + phnum * phentsize, shoff + shnum * shentsize if shnum else 0)
    if phoff + phnum * phentsize > len(head):
        return end  # the program headers themselves lie beyond what we were given
    for i in range(phnum):
        offset, = struct.unpack_from("<Q", head, phoff + i * phentsize + 8)
        filesz, = struct.unpack_from("<Q", head, phoff + i * phentsize + 32)
        end = max(end, offset + filesz)
    return end


def section(data: bytes | memoryview, wanted: str) -> bytes | None:
    """The contents of the section named ``wanted``, or None if there is none."""
    headers = list(_sections(data))
    shstrndx, = struct.unpack_from("<H", data, 0x3E)
    if shstrndx >= len(headers):
        return None
    _, _, str_off, str_size = headers[shstrndx]
    names = bytes(data[str_off : str_off + str_size])
    for name_off, _, offset, size in headers:
        end = names.find(b"\0", name_off)
        if names[name_off:end].decode(errors="replace") == wanted:
            return bytes(data[offset : offset + size])
    return None


def _parse_notes(blob: bytes) -> Iterator[Note]:
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = blob[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        yield Note(name, ntype, desc)


def notes(data: bytes | memoryview) -> list[Note]:
    """Every note in the PT_NOTE segments (and, if there are none, the SHT_NOTE sections)."""
    _check(data)
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    found: list[Note] = []
    for i in range(phnum):
        ptype, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if ptype == PT_NOTE:
            offset, = struct.unpack_from("<Q", data, phoff + i * phentsize + 8)
            filesz, = struct.unpack_from("<Q", data, phoff + i * phentsize + 32)
            found += _parse_notes(bytes(data[offset : offset + filesz]))
    if not found:
        for _, stype, offset, size in _sections(data):
            if stype == SHT_NOTE:
                found += _parse_notes(bytes(data[offset : offset + size]))
    return found


def has_pvh_entry(data: bytes | memoryview) -> bool:
    """Does this vmlinux carry XEN_ELFNOTE_PHYS32_ENTRY (QEMU boots it directly, skipping the decompressor)?"""
    return any(n.name == b"Xen" and n.type == XEN_ELFNOTE_PHYS32_ENTRY for n in notes(data))
