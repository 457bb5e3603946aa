"""The userfaultfd helper against the real kernel: real mmap, real userfaultfd, no mocks."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from suite import content, uffd
from suite.errors import HelperError, SetupError, StallError
from suite.uffd import Faults, Mismatch, UffdHelper

pytestmark = pytest.mark.host

PAGE = 4096
MIB = 1 << 20


def gone(pid: int) -> bool:
    """True when no process (not even a zombie) has this pid."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def helper() -> Iterator[UffdHelper]:
    with UffdHelper(timeout=5.0) as h:
        yield h


def test_place_then_verify_without_faults(helper: UffdHelper) -> None:
    addr = helper.map(4 * MIB)
    assert addr % (2 * MIB) == 0 and helper.size == 4 * MIB
    helper.madvise("hugepage", 0, 4 * MIB)
    assert helper.place(0, 4 * MIB) == Faults(missing=[], wp=[])
    assert helper.verify(0, 4 * MIB) == ([], Faults(missing=[], wp=[]))


def test_unplaced_pages_verify_as_zero(helper: UffdHelper) -> None:
    helper.map(2 * MIB)
    helper.place(0, 4 * PAGE)
    mismatch, _ = helper.verify(0, 2 * MIB)
    assert mismatch == []


def test_missing_fault_resupplies_discarded_page(helper: UffdHelper) -> None:
    helper.map(4 * MIB)
    helper.madvise("nohugepage", 0, 4 * MIB)  # 4 KiB pages whatever the THP setting: page 100 stays a hole
    helper.place(0, 8 * PAGE)
    info = helper.register("missing")
    assert info["features"] and info["ioctls"]
    helper.madvise("dontneed", 3 * PAGE, PAGE)
    faults = helper.touch("read", 0, 8 * PAGE)
    assert faults == Faults(missing=[3], wp=[])
    # never placed: resolved with UFFDIO_ZEROPAGE
    assert helper.touch("read", 100 * PAGE, PAGE) == Faults(missing=[100], wp=[])
    assert helper.verify(0, 8 * PAGE) == ([], Faults(missing=[], wp=[]))
    # reading the never-touched rest is itself a missing fault per page, each resolved as zeros
    mismatch, faults = helper.verify(0, 4 * MIB)
    assert mismatch == []
    assert faults.missing == [p for p in range(8, 1024) if p != 100]


def test_missing_fault_on_write_supplies_then_writes(helper: UffdHelper) -> None:
    helper.map(2 * MIB)
    helper.place(0, 2 * MIB)
    helper.register("missing")
    helper.madvise("dontneed", 0, 4 * PAGE)
    assert helper.touch("write", 0, 8 * PAGE).missing == [0, 1, 2, 3]
    assert helper.verify(0, 2 * MIB)[0] == []


def test_wp_fault_on_every_protected_page(helper: UffdHelper) -> None:
    helper.map(4 * MIB)
    helper.madvise("hugepage", 0, 4 * MIB)
    helper.place(0, 4 * MIB)
    helper.register("wp")
    assert helper.wp(0, 4 * MIB, True) == Faults(missing=[], wp=[])
    faults = helper.touch("write", 0, 4 * MIB)
    assert faults == Faults(missing=[], wp=list(range(1024)))
    # un-protected by the handler: writing again does not fault
    assert helper.touch("write", 0, 4 * MIB) == Faults(missing=[], wp=[])
    assert helper.verify(0, 4 * MIB)[0] == []


def test_unprotected_pages_do_not_fault(helper: UffdHelper) -> None:
    helper.map(2 * MIB)
    helper.place(0, 2 * MIB)
    helper.register("wp")
    helper.wp(0, 2 * MIB, True)
    helper.wp(10 * PAGE, 10 * PAGE, False)
    faults = helper.touch("write", 0, 2 * MIB)
    assert faults.wp == [p for p in range(512) if not 10 <= p < 20]
    assert faults.missing == []
    # reads never raise WP faults
    helper.wp(0, 2 * MIB, True)
    assert helper.touch("read", 0, 2 * MIB) == Faults(missing=[], wp=[])


def test_missing_and_wp_together(helper: UffdHelper) -> None:
    helper.map(2 * MIB)
    helper.place(0, 2 * MIB)
    helper.register("missing,wp")
    helper.wp(0, 2 * MIB, True)
    helper.madvise("dontneed", 5 * PAGE, PAGE)
    faults = helper.touch("write", 0, 16 * PAGE)
    # the discarded page faults as missing (supplied unprotected), the others as wp
    assert faults.missing == [5]
    assert faults.wp == [p for p in range(16) if p != 5]
    assert helper.verify(0, 2 * MIB)[0] == []


def test_rwp_without_kernel_support_fails_naming_it(helper: UffdHelper) -> None:
    """RWP (Linux 7.3) on a kernel without it: each RWP command fails with one clear line, the helper lives on.
    (On a kernel with RWP this is tests/test_rwp.py's business.)"""
    from suite.targets import preflight

    if preflight.memory_features()["uffd_rwp"]:
        pytest.skip("this kernel has userfaultfd RWP: tests/test_rwp.py runs it")
    helper.map(2 * MIB)
    with pytest.raises(HelperError, match="lacks UFFD_FEATURE rwp"):
        helper.features("rwp")
    with pytest.raises(HelperError, match="register: UFFDIO_API"):
        helper.register("rwp")
    with pytest.raises(HelperError, match="rwp: not registered"):
        helper.rwp(0, PAGE, True)
    with pytest.raises(HelperError, match="set-mode: not registered"):
        helper.set_mode("async")
    helper.register("wp")
    with pytest.raises(HelperError, match="UFFDIO_RWPROTECT"):  # no RWP range: ENOTTY / ENOENT, never success
        helper.rwp(0, PAGE, True)
    assert helper.place(0, PAGE) == Faults(missing=[], wp=[])


def test_long_reply_lists_every_page() -> None:
    with UffdHelper() as h:
        h.map(64 * MIB)
        h.place(0, 64 * MIB)
        h.register("wp")
        h.wp(0, 64 * MIB, True)
        assert h.touch("write", 0, 64 * MIB).wp == list(range(16384))


def test_bad_commands_fail_and_helper_stays_alive(helper: UffdHelper) -> None:
    with pytest.raises(HelperError, match="no region"):
        helper.place(0, PAGE)
    helper.map(2 * MIB)
    with pytest.raises(HelperError, match="already mapped"):
        helper.map(2 * MIB)
    with pytest.raises(HelperError, match="not 4 KiB aligned"):
        helper.place(1, PAGE)
    with pytest.raises(HelperError, match="beyond"):
        helper.place(2 * MIB, PAGE)
    with pytest.raises(HelperError, match="not registered"):
        helper.wp(0, PAGE, True)
    with pytest.raises(HelperError, match="unknown command"):
        helper.command("frobnicate 1 2")
    helper.register("missing")
    with pytest.raises(HelperError, match="already registered"):
        helper.register("wp")
    # registered for missing only: write-protecting is refused by the kernel, the helper survives
    with pytest.raises(HelperError, match="UFFDIO_WRITEPROTECT"):
        helper.wp(0, PAGE, True)
    assert helper.verify(0, 2 * MIB)[0] == []


def test_killed_mid_command_raises_clear_error() -> None:
    with UffdHelper() as h:
        h.map(2 * MIB)
        os.kill(h.pid, signal.SIGSTOP)  # it cannot answer: the kill lands while the command is pending
        timer = threading.Timer(0.2, os.kill, (h.pid, signal.SIGKILL))
        timer.start()
        try:
            with pytest.raises(HelperError, match=r"died during 'place 0x0 0x200000': killed by SIGKILL"):
                h.place(0, 2 * MIB)
        finally:
            timer.cancel()
        assert not h.stalled  # a dead helper is the run's error, never a stall finding
        with pytest.raises(HelperError, match="unusable"):
            h.verify(0, PAGE)
    assert gone(h.pid)


def test_no_reply_raises_stall_and_close_kills() -> None:
    with UffdHelper() as h:
        h.map(2 * MIB)
        os.kill(h.pid, signal.SIGSTOP)
        with pytest.raises(StallError, match=r"no reply to 'place 0x0 0x1000' within 0.2 s"):
            h.place(0, PAGE, timeout=0.2)
        assert h.stalled  # alive and silent: what the synthetic runner records as a stall finding
        with pytest.raises(HelperError, match="unusable"):
            h.place(0, PAGE)
    assert gone(h.pid)


def test_no_process_left_after_close_or_exception() -> None:
    with UffdHelper() as h:
        h.map(2 * MIB)
        pid = h.pid
    assert gone(pid)
    h.close()  # idempotent

    with pytest.raises(RuntimeError), UffdHelper() as h2:
        h2.map(2 * MIB)
        h2.register("missing")
        raise RuntimeError("test body failed")
    assert gone(h2.pid)


def test_argv_prefix_execs_the_helper() -> None:
    # the shape used to enter a cgroup: a shell that execs the helper, so the pid is the helper's
    with UffdHelper(argv_prefix=["/bin/sh", "-c", 'exec "$@"', "sh"]) as h:
        shell_pid = h.pid
        h.map(2 * MIB)
        assert h.pid == shell_pid
        assert Path(f"/proc/{h.pid}/exe").resolve().name.startswith("uffd-helper-")
    assert gone(shell_pid)


def test_build_caches_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = uffd.build(tmp_path)
    assert first.parent == tmp_path / "bin" and first.name.startswith("uffd-helper-")
    mtime = first.stat().st_mtime_ns
    assert uffd.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "bin").iterdir()] == [first.name]  # no temporaries left

    monkeypatch.setenv("HOLECHECK_CACHE", str(tmp_path / "env"))
    assert uffd.build() == tmp_path / "env" / "bin" / first.name


def test_build_without_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(SetupError, match=r"no C compiler \(cc\): apt-get install gcc"):
        uffd.build(tmp_path / "cache")


# --- the content axis: the helper's bytes are suite/content.py's (the C reproducer copies the same functions) ---

def _read(helper: UffdHelper, index: int) -> bytes:
    assert helper.addr is not None
    with open(f"/proc/{helper.pid}/mem", "rb") as mem:
        mem.seek(helper.addr + index * PAGE)
        return mem.read(PAGE)


def _poke(helper: UffdHelper, index: int, offset: int, value: int) -> None:
    """A byte changed behind the helper's model (as a corrupting kernel would)."""
    assert helper.addr is not None
    with open(f"/proc/{helper.pid}/mem", "r+b") as mem:
        mem.seek(helper.addr + index * PAGE + offset)
        mem.write(bytes([value]))


SPARSE_PAGES = [0, 1, 2, 3, 64, 511, 3801, 3950, 4093, 4095, 4096, 4097, 8191]  # offsets 4095, 0, 8, …; values 1, 2


def test_sparse_pages_are_the_models_bytes(helper: UffdHelper) -> None:
    helper.content("sparse")
    helper.map(32 * MIB)
    for i in SPARSE_PAGES:
        helper.place(i * PAGE, PAGE)
    assert [i for i in SPARSE_PAGES if _read(helper, i) != content.page("sparse", i)] == []
    assert {content.sparse_spot(i)[0] for i in SPARSE_PAGES} >= {0, 4095}
    # a rewrite (touch write) keeps the offset, with the next value: a page written twice shows it
    helper.touch("write", 64 * PAGE, PAGE)
    offset, value = content.sparse_spot(64)
    got = np.frombuffer(_read(helper, 64), dtype=np.uint8)
    assert np.nonzero(got)[0].tolist() == [offset] and got[offset] == value % 255 + 1
    assert helper.verify(0, 32 * MIB)[0] == []


def test_sparse_page_resupplied_by_the_handler_is_the_models(helper: UffdHelper) -> None:
    helper.content("sparse")
    helper.map(2 * MIB)
    helper.madvise("nohugepage", 0, 2 * MIB)
    helper.place(0, 8 * PAGE)
    helper.register("missing")
    helper.madvise("dontneed", 5 * PAGE, PAGE)
    assert helper.touch("read", 5 * PAGE, PAGE).missing == [5]
    assert _read(helper, 5) == content.page("sparse", 5)


def test_verify_names_each_bad_pages_first_differing_byte(helper: UffdHelper) -> None:
    helper.content("sparse")
    helper.map(2 * MIB)
    helper.place(0, 16 * PAGE)
    helper.scrub(3 * PAGE, 2 * PAGE)  # lost data: the pages read zero
    assert content.sparse_spot(7)[0] < 4095
    _poke(helper, 7, 4095, 0x5A)  # a stray byte after the data byte, which stays
    _poke(helper, 9, content.sparse_spot(9)[0], 0x80)  # a wrong data byte: content, not zero
    mismatches, _ = helper.check(0, 2 * MIB)
    assert mismatches == [Mismatch(3, content.sparse_spot(3)[0], True), Mismatch(4, content.sparse_spot(4)[0], True),
                          Mismatch(7, 4095, False), Mismatch(9, content.sparse_spot(9)[0], False)]


def test_verify_finds_the_byte_inside_a_word_of_a_unique_page(helper: UffdHelper) -> None:
    helper.map(2 * MIB)
    helper.place(0, 4 * PAGE)
    _poke(helper, 2, 13, 0xFF)
    assert helper.check(0, 4 * PAGE)[0] == [Mismatch(2, 13, False)]
