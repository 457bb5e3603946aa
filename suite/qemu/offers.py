"""What a QEMU offers the migration scenarios, asked of that QEMU: ``probe(path) -> Offers``.

One short-lived RAM machine (a migration destination, 64 MiB) per QEMU: its capability list, its migration
parameters, whether it accepts each postcopy variant of ``migration.VARIANTS`` (its own refusal text if not),
and how it opens userfaultfds (/dev/userfaultfd or the syscall, seen in its fds after the postcopy probe).
``file:`` migration URIs go by version (QEMU 8.2 added them; a destination cannot try one without migrating).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import HolecheckError
from . import migration
from .machine import MachineConfig, QmpError, RamMachine

FILE_URI = (8, 2, 0)


@dataclass(frozen=True)
class Offers:
    version: str  # "11.1.3"
    package: str = ""  # "Debian 1:11.1.3+ds-2~bpo13+1"
    refusals: dict[str, str] = field(default_factory=dict)  # variant → QEMU's refusal; absent: accepted
    uffd: str = ""  # "dev" (/dev/userfaultfd) or "syscall"
    file_uri: bool = False
    zero_page_detection: bool = False
    problem: str = ""  # the probe itself failed

    def refusal(self, variant: str) -> str:
        """"" if this QEMU runs ``variant``, else why not in one line (a skip reason)."""
        if self.problem:
            return f"QEMU {self.version}: could not ask what it offers: {self.problem}"
        if variant in self.refusals:
            return f"QEMU {self.version} refuses {migration.VARIANTS[variant].what}: {self.refusals[variant]}"
        return ""

    def line(self) -> str:
        """For the terminal summary: the version and what it offers the scenarios."""
        if self.problem:
            return f"QEMU {self.version}: probe failed: {self.problem}"
        names = {"multifd": "multifd+postcopy", "preempt": "postcopy-preempt"}
        offered = [names[v] for v in names if v not in self.refusals]
        offered += ["zero-page-detection"] if self.zero_page_detection else []
        offered += ["file: URIs"] if self.file_uri else []
        offered += ["/dev/userfaultfd" if self.uffd == "dev" else "userfaultfd(2)"]
        lacks = [names[v] for v in names if v in self.refusals] + ([] if self.file_uri else ["file: URIs"])
        return (f"QEMU {self.version}" + (f" ({self.package})" if self.package else "") + ", offers "
                + ", ".join(offered) + (f"; lacks {', '.join(lacks)}" if lacks else ""))


@functools.cache
def probe(qemu: str) -> Offers:
    version = "?"
    try:
        with RamMachine(MachineConfig(mem_mib=64, qemu=qemu, incoming=True), name="probe") as m:
            version = m.version
            package = str(m.qmp("query-version").get("package", "")).strip()
            params = m.qmp("query-migrate-parameters")
            migration.set_variant(m, "")  # postcopy-ram: the destination probes userfaultfd here
            uffd = migration.uffd_open_mode(m)
            refusals = {}
            for name in migration.VARIANTS:
                if name:
                    try:
                        migration.set_variant(m, name)
                    except QmpError as exc:
                        refusals[name] = exc.desc
                    off = {k: False for k in migration.VARIANTS[name].caps}
                    migration.set_capabilities(m, postcopy_ram=True, **off)
    except HolecheckError as exc:
        return Offers(version, problem=str(exc))
    return Offers(version, package, refusals, uffd, m.version_tuple >= FILE_URI, "zero-page-detection" in params)
