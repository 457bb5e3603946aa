"""Can this kernel run scenarios at all (each problem one line for a human), and what does it offer?"""
from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

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


def local_features() -> dict[str, Any]:
    """Target.features() answered by the kernel this process runs on (the host's, or the guest's in the agent).

    Booleans, except ``mthp_kb`` (the mTHP sizes with a ``hugepages-<N>kB`` knob, PMD size included, ascending)
    and ``numa_nodes`` (online nodes). Each probe reads, never changes, the kernel's state, but for
    ``ksm_merge_keeps_uffd_wp``, which runs ksmd on two pages of its own (every KSM knob restored)."""
    return {"soft_dirty": pagemap.soft_dirty_supported(), "shrink_underused": thp.KNOBS["shrink_underused"].exists(),
            **{f"mthp_{kb}kB": thp.size_knob(kb).exists() for kb in thp.MTHP_SIZES_KB},  # per-size mTHP knobs
            **memory_features(), **optional_features(),
            "ksm_merge_keeps_uffd_wp": ksm_probe.ksm_merge_keeps_uffd_wp()}  # measured: a merge of two WP pages


def optional_features() -> dict[str, Any]:
    """What a kernel may be built without: a cell needing it skips naming it (conftest ``need_feature``)."""
    sizes = sorted(int(k.parent.name[len("hugepages-"):-len("kB")]) for k in thp.SYSFS.glob("hugepages-*kB/enabled"))
    return {
        "ksm": Path("/sys/kernel/mm/ksm/run").exists(),  # CONFIG_KSM
        # CONFIG_DEBUG_FS (split_huge_pages comes with THP); mounted or mountable, not locked down to "none" access
        "debugfs_split": Path("/sys/kernel/debug/split_huge_pages").exists()
        or ("\tdebugfs\n" in Path("/proc/filesystems").read_text() and not _debugfs_locked_down()),
        "zram": Path("/sys/block/zram0").is_dir() or Path("/sys/class/zram-control").is_dir(),  # CONFIG_ZRAM, loaded
        "mthp_kb": sizes,
        "numa_nodes": numa_nodes(),
    }


# the optional feature each split trigger needs, and how a kernel comes to lack it
SPLIT_NEEDS = {"ksm": "ksm", "ksm-zero": "ksm", "debugfs": "debugfs_split", "pageout-swap": "zram"}
LACKS = {"ksm": "no KSM (CONFIG_KSM: no /sys/kernel/mm/ksm)",
         "debugfs_split": "no debugfs split_huge_pages (CONFIG_DEBUG_FS, or lockdown confidentiality)",
         "zram": "no zram device (CONFIG_ZRAM, or its module not loaded)"}


def lacking(features: dict[str, Any], split: str = "", mthp_kb: int = 0) -> str:
    """Why a cell cannot run on the kernel whose ``features`` these are ('' if it can): the cell skips saying
    so, instead of failing half-way on an interface that is not there."""
    why = []
    if (need := SPLIT_NEEDS.get(split)) and not features[need]:
        why.append(f"the {split} split trigger needs what this kernel lacks: {LACKS[need]}")
    if mthp_kb and mthp_kb not in features["mthp_kb"]:
        sizes = ", ".join(f"{kb}kB" for kb in features["mthp_kb"]) or "none (mTHP came with 6.8)"
        why.append(f"this kernel has no hugepages-{mthp_kb}kB knob (sizes with a knob: {sizes})")
    return "; ".join(why)


def _debugfs_locked_down() -> bool:
    """Lockdown "confidentiality" makes split_huge_pages refuse (EPERM)."""
    lockdown = Path("/sys/kernel/security/lockdown")
    return lockdown.exists() and "[confidentiality]" in lockdown.read_text()


def numa_nodes(online: Path = Path("/sys/devices/system/node/online")) -> int:
    """Online NUMA nodes (1 on a kernel without CONFIG_NUMA: it has no node directory)."""
    if not online.exists():
        return 1
    count = 0
    for part in online.read_text().strip().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


# UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api {u64 api, features, ioctls}); PAGEMAP_SCAN = _IOWR('f', 16, 96 B)
UFFDIO_API, UFFD_API = 0xC018AA3F, 0xAA
UFFD_FEATURES = {"uffd_minor_shmem": 1 << 10, "uffd_wp_shmem": 1 << 12, "uffd_wp_unpopulated": 1 << 13,
                 "uffd_wp_async": 1 << 15,
                 "uffd_rwp": 1 << 17, "uffd_rwp_async": 1 << 18}  # RWP: Linux 7.3 (UFFD_FEATURE_RWP, RWP_ASYNC)
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
