"""Can this kernel run scenarios at all (each problem one line for a human), and what does it offer?"""
from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from .. import pagemap, thp
from . import ksm_probe

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
    return {"soft_dirty": pagemap.soft_dirty_supported(), "shrink_underused": thp.KNOBS["shrink_underused"].exists(),
            **memory_features(), "ksm_merge_keeps_uffd_wp": ksm_probe.ksm_merge_keeps_uffd_wp()}


# UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api {u64 api, features, ioctls}); PAGEMAP_SCAN = _IOWR('f', 16, 96 B)
UFFDIO_API, UFFD_API = 0xC018AA3F, 0xAA
UFFD_FEATURES = {"uffd_minor_shmem": 1 << 10, "uffd_wp_shmem": 1 << 12, "uffd_wp_unpopulated": 1 << 13,
                 "uffd_wp_async": 1 << 15}
PAGEMAP_SCAN = 0xC0606610


def memory_features() -> dict[str, bool]:
    """The uffd features the memory axes use (UFFDIO_API on a throw-away userfaultfd), PAGEMAP_SCAN (an ioctl
    with a bad size answers EINVAL where it exists, ENOTTY where not) and shmem THPs (the shmem_enabled knob)."""
    libc = ctypes.CDLL(None, use_errno=True)
    have = 0
    fd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC)
    if fd >= 0:
        api = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
        if libc.ioctl(fd, ctypes.c_ulong(UFFDIO_API), api) == 0:
            have = api[1]
        os.close(fd)
    out = {name: bool(have & bit) for name, bit in UFFD_FEATURES.items()}
    arg = (ctypes.c_uint64 * 12)()  # size 0: EINVAL from a kernel that has the ioctl
    pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        rc = libc.ioctl(pm, ctypes.c_ulong(PAGEMAP_SCAN), arg)
        out["pagemap_scan"] = rc == 0 or ctypes.get_errno() != errno.ENOTTY
    finally:
        os.close(pm)
    out["shmem_thp"] = thp.KNOBS["shmem_enabled"].exists()
    return out
