"""A writer of cpio "newc" archives, the format the kernel unpacks into its initramfs.

Pure Python because the host may lack ``cpio``; deterministic (inode numbers in order, mtime 0) so that an
image's bytes, and thus its cache name, depend on its contents only.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass
class CpioWriter:
    """Collects entries; ``bytes()`` returns the archive. Parents must be added before their children."""

    chunks: list[bytes] = field(default_factory=list)
    ino: int = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.lstrip("/").encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self.chunks.append(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))
        self.chunks.append(data + b"\0" * _pad4(len(data)))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def __bytes__(self) -> bytes:
        trailer = CpioWriter(ino=self.ino)
        trailer._entry(TRAILER, 0, nlink=1)
        return b"".join(self.chunks + trailer.chunks)


@dataclass(frozen=True)
class Entry:
    """One parsed archive member (for tests and debugging)."""

    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int]


def read(archive: bytes) -> list[Entry]:
    """Parse a newc archive up to its trailer."""
    out, pos = [], 0
    while True:
        if archive[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(110 + namesize)
        data = archive[data_start : data_start + filesize]
        pos = data_start + filesize + _pad4(filesize)
        if name == TRAILER:
            return out
        out.append(Entry(name, f[1], data, (f[9], f[10])))
