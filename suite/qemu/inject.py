"""Change another process's memory state from outside, for negative controls that re-create a buggy kernel's
effect inside a real QEMU: madvise() runs in the target, injected through ptrace.

gdb's ``call madvise(…)`` did this before, but gdb 13 cannot restore a thread's registers on CPUs with AMX
("Couldn't write extended state status: Bad address": its XSAVE buffer is smaller than the kernel's), and the
inferior call then fails. A system call needs no vector registers, so the general registers are enough: seize
the target's main thread (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: no SIGSTOP, the other threads run on), point
it at a ``syscall`` instruction with madvise's arguments, single-step it, read the result, put every register back
(an interrupted system call then restarts as the kernel would have restarted it) and detach.
"""
from __future__ import annotations

import ctypes
import os
import signal

from ..errors import HolecheckError
from ..waits import wait_for

MADV_DONTNEED = 4
SYS_MADVISE = 28
SYSCALL = b"\x0f\x05"
MAX_STEPS = 100

PTRACE_PEEKTEXT, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_SINGLESTEP, PTRACE_DETACH = 1, 12, 13, 9, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class Regs(ctypes.Structure):
    """x86-64 ``struct user_regs_struct``."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


def _ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
    ctypes.set_errno(0)
    ret = _libc.ptrace(request, pid, ctypes.c_void_p(addr), data if isinstance(data, ctypes.c_void_p)
                       else ctypes.c_void_p(data))
    if ret == -1 and (err := ctypes.get_errno()):
        raise HolecheckError(f"ptrace({request:#x}) on pid {pid} failed: {os.strerror(err)}")
    return ret


def _wait_stop(pid: int, timeout: float) -> int:
    """The signal of ``pid``'s next ptrace stop (bounded: a thread that never stops is a StallError)."""
    _, status = wait_for(lambda: os.waitpid(pid, os.WNOHANG | WALL), lambda r: r[0] == pid,
                         what=f"pid {pid} to stop for ptrace", timeout=timeout, interval=0.001, max_interval=0.05)
    if not os.WIFSTOPPED(status):
        raise HolecheckError(f"pid {pid} ended while madvise() was injected (status {status:#x})")
    return os.WSTOPSIG(status)


def _syscall_at(pid: int, regs: Regs) -> int:
    """Address of a ``syscall`` instruction in the target: the one it sits in, else one in its vDSO."""
    if regs.orig_rax < (1 << 63):  # stopped inside a system call: rip is just past its instruction
        word = _ptrace(PTRACE_PEEKTEXT, pid, regs.rip - 2) & 0xFFFF
        if word.to_bytes(2, "little") == SYSCALL:
            return regs.rip - 2
    with open(f"/proc/{pid}/maps") as f:
        vdso = next((line.split()[0] for line in f if line.rstrip().endswith("[vdso]")), None)
    if vdso is not None:
        lo, hi = (int(x, 16) for x in vdso.split("-"))
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(lo)
            if (at := mem.read(hi - lo).find(SYSCALL)) >= 0:
                return lo + at
    raise HolecheckError(f"no syscall instruction found in pid {pid} to run madvise() with")


def madvise_in(pid: int, ranges: list[tuple[int, int]], advice: int = MADV_DONTNEED, timeout: float = 30.0) -> None:
    """madvise(addr, length, advice) for each (addr, length) inside process ``pid`` (its main thread)."""
    _ptrace(PTRACE_SEIZE, pid)
    pending = 0  # a signal that arrived while we stepped: delivered at detach
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stop(pid, timeout)
        saved = Regs()
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(saved)))
        at = _syscall_at(pid, saved)
        results = []
        for addr, length in ranges:
            regs = Regs.from_buffer_copy(saved)
            regs.rip, regs.rax, regs.orig_rax = at, SYS_MADVISE, (1 << 64) - 1  # -1: no restart of a syscall
            regs.rdi, regs.rsi, regs.rdx = addr, length, advice
            _ptrace(PTRACE_SETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
            for _ in range(MAX_STEPS):  # each signal that stops it first costs one more step
                _ptrace(PTRACE_SINGLESTEP, pid)
                sig = _wait_stop(pid, timeout)
                _ptrace(PTRACE_GETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
                if regs.rip == at + len(SYSCALL):
                    break
                if sig != signal.SIGTRAP:  # a signal stopped it before the syscall ran: keep it for later
                    pending = sig
                    regs.rip, regs.rax, regs.orig_rax = at, SYS_MADVISE, (1 << 64) - 1
                    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
            else:
                raise HolecheckError(f"pid {pid}: madvise() did not run in {MAX_STEPS} steps (signals kept arriving)")
            results.append(ctypes.c_longlong(regs.rax).value)
        _ptrace(PTRACE_SETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(saved)))
    finally:
        _detach(pid, pending, timeout)
    if bad := [f"{a:#x}+{n:#x}: {os.strerror(-r)}" for (a, n), r in zip(ranges, results, strict=True) if r != 0]:
        raise HolecheckError(f"madvise() in pid {pid} failed: {', '.join(bad)}")


def _detach(pid: int, sig: int, timeout: float) -> None:
    """Detach, also from a tracee that is not stopped yet (a seized thread stays ours until detached)."""
    try:
        _ptrace(PTRACE_DETACH, pid, 0, sig)
        return
    except HolecheckError:
        pass
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stop(pid, timeout)
        _ptrace(PTRACE_DETACH, pid, 0, sig)
    except HolecheckError:
        pass  # the tracee is gone
