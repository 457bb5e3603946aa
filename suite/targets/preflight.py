"""Can this kernel run scenarios at all (each problem one line for a human), and what does it offer?"""
from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from .. import pagemap, thp

NR_USERFAULTFD = 323  # x86_64


def userfaultfd_problem() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC)
    if fd >= 0:
        os.close(fd)
        return ""
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return "kernel lacks CONFIG_USERFAULTFD (userfaultfd syscall: ENOSYS)"
    if Path("/dev/userfaultfd").exists():
        return ""  # the syscall is restricted (unprivileged_userfaultfd) but the device works
    return f"userfaultfd unusable: {os.strerror(err)}"


def root_problem() -> str:
    """Why scenarios cannot run as this user ("" as root)."""
    if os.geteuid() == 0:
        return ""
    return ("holecheck needs root: scenarios read page frame numbers from pagemap and kpageflags, set THP knobs "
            "and create memory cgroups; run it as root (unprivileged, only tests/unit runs)")


def host_problems() -> list[str]:
    problems = []
    if problem := root_problem():
        problems.append(problem)
    if not thp.SYSFS.exists():
        problems.append("kernel lacks CONFIG_TRANSPARENT_HUGEPAGE (no /sys/kernel/mm/transparent_hugepage)")
    if not Path("/proc/self/pagemap").exists():
        problems.append("kernel lacks CONFIG_PROC_PAGE_MONITOR (no /proc/self/pagemap)")
    if problem := userfaultfd_problem():
        problems.append(problem)
    if not problems:
        try:
            pagemap.zero_pfns()
        except OSError as exc:
            problems.append(f"cannot read PFNs from pagemap: {exc}")
    return problems


def local_features() -> dict[str, bool]:
    """Target.features() answered by the kernel this process runs on (the host's, or the guest's in the agent)."""
    return {"soft_dirty": pagemap.soft_dirty_supported(), "shrink_underused": thp.KNOBS["shrink_underused"].exists()}
