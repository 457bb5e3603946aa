"""The L2 RAM machine and the migration steps against real QEMU: real processes, real sockets, no mocks."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from suite.errors import SetupError, StallError
from suite.qemu import bios
from suite.qemu import migration as mig
from suite.qemu.binary import qemu_version
from suite.qemu.machine import MachineConfig, QmpError, RamMachine

pytestmark = [pytest.mark.host, pytest.mark.qemu]

MIB = 1 << 20
GPA = 2 * MIB  # tests stay above 1 MiB: below it pc shadows RAM with pc.rom / pc.bios
Factory = Callable[..., RamMachine]


def gone(pid: int) -> bool:
    """True when no process (not even a zombie) has this pid."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def accel(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("accel", default="auto"))


@pytest.fixture
def machines(qemu: str, accel: str, tmp_path: Path) -> Iterator[Factory]:
    """Start machines with ``machines(name, mem_mib=…, incoming=…)``; all stopped (transcripts kept) at teardown."""
    started: list[RamMachine] = []

    def start(name: str = "vm", **cfg: object) -> RamMachine:
        m = RamMachine(MachineConfig(qemu=qemu, accel=accel, **cfg), name=name)  # type: ignore[arg-type]
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()
        m.transcript.write(tmp_path / f"{m.name}.qmp.jsonl")


def fill(machine: RamMachine, size: int) -> bytes:
    """Random bytes in guest RAM [GPA, GPA+size), written before any migration (so /proc/PID/mem is fine)."""
    data = os.urandom(size)
    machine.write_ram(GPA, data)
    return data


def postcopy_pair(machines: Factory, mem_mib: int) -> tuple[RamMachine, RamMachine, bytes]:
    """A source with data, a destination, postcopy on both, precopy throttled so the switch lands in it."""
    src = machines("src", mem_mib=mem_mib)
    dst = machines("dst", mem_mib=mem_mib, incoming=True)
    data = fill(src, mem_mib * MIB - GPA)
    for m in (src, dst):
        mig.set_capabilities(m, postcopy_ram=True)
    mig.set_parameters(src, max_bandwidth=8 * MIB)
    uri = mig.migration_uri(dst)
    mig.start_incoming(dst, uri)
    mig.start_migrate(src, uri)
    return src, dst, data


# -- one machine ---------------------------------------------------------------------------------------------

def test_bios_image_halts_at_the_reset_vector(tmp_path: Path) -> None:
    img = bios.image()
    assert len(img) == 64 * 1024
    assert img[0xFFF0:0xFFF4] == bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
    path = bios.path(tmp_path)
    assert path.read_bytes() == img and bios.path(tmp_path) == path  # cached by content


def test_machine_starts_and_reports_its_version(machines: Factory, qemu: str) -> None:
    m = machines()
    assert m.alive() and m.startup_seconds < 10
    assert m.version_tuple == qemu_version(qemu)
    assert m.qmp("query-status")["status"] == "running"  # a halted vCPU is still "running"
    m.qmp("stop")
    assert m.wait_event("STOP", timeout=5)["event"] == "STOP"


def test_qtest_write_read_roundtrip(machines: Factory) -> None:
    m = machines()
    m.qtest.write(GPA + 5, b"holecheck")
    assert m.qtest.read(GPA + 5, 9) == b"holecheck"
    m.qtest.writeq(GPA + 4096, 0x1122334455667788)
    assert m.qtest.readq(GPA + 4096) == 0x1122334455667788
    m.qtest.memset(GPA + 8192, 3 * MIB + 5, 0xA5)  # more than one chunk
    assert m.qtest.read(GPA + 8192, 3 * MIB + 5) == b"\xa5" * (3 * MIB + 5)


def test_ram_mapping_is_the_guest_ram(machines: Factory) -> None:
    m = machines(mem_mib=64)
    start, size = m.ram_mapping()
    assert size == 64 * MIB and start % (2 * MIB) == 0
    assert "hg" in m.ram_flags()  # QEMU madvises guest RAM MADV_HUGEPAGE
    m.qtest.write(GPA + 0x1234, b"seen through /proc/PID/mem")
    with open(f"/proc/{m.pid}/mem", "rb") as mem:
        mem.seek(start + GPA + 0x1234)
        assert mem.read(26) == b"seen through /proc/PID/mem"
    data = fill(m, 4 * MIB)
    assert m.qtest.read(GPA, 4 * MIB) == data == m.read_ram(GPA, 4 * MIB)


def test_a_stalled_qtest_read_names_its_address_and_the_client_recovers(machines: Factory) -> None:
    m = machines()
    m.qtest.writeq(GPA + 0x1000, 42)
    os.kill(m.pid, signal.SIGSTOP)  # QEMU answers nothing, as when its main thread sits in a userfault
    try:
        with pytest.raises(StallError, match=r"qtest read of gpa 0x201000 \(4096 bytes\) got no answer within 0.3 s"):
            m.qtest.read(GPA + 0x1000, 4096, timeout=0.3)
        with pytest.raises(StallError, match=r"QMP query-status got no answer within 0.3 s"):
            m.qmp("query-status", timeout=0.3)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert m.qtest.readq(GPA + 0x1000) == 42  # the late answer to the stalled read is skipped
    assert m.qmp("query-status")["status"] == "running"  # and the late QMP reply dropped


def test_qmp_errors_carry_qemus_text_and_everything_is_transcribed(machines: Factory, tmp_path: Path) -> None:
    m = machines()
    with pytest.raises(QmpError, match="CommandNotFound: The command no-such-command has not been found"):
        m.qmp("no-such-command")
    kinds = [r.kind for r in m.transcript.records]
    assert kinds[-2:] == ["command", "error"] and "reply" in kinds
    m.transcript.write(tmp_path / "t.jsonl")
    assert "no-such-command" in (tmp_path / "t.jsonl").read_text()


def test_stop_leaves_no_process_and_no_socket_dir(machines: Factory) -> None:
    m = machines()
    pid, sock_dir = m.pid, m.dir
    assert sock_dir is not None and (sock_dir.stat().st_mode & 0o777) == 0o700
    assert (sock_dir / "qmp.sock").exists() and (sock_dir / "qtest.sock").exists()
    m.stop()
    assert gone(pid) and not sock_dir.exists()
    m.stop()  # idempotent
    assert "SHUTDOWN" in m.transcript.text()


def test_a_forking_argv_prefix_still_finds_and_kills_qemu(qemu: str) -> None:
    # the wrapper stays QEMU's parent (like a cgroup or strace wrapper that does not exec): pid from -pidfile
    def wrap(argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", '"$@"; exit $?', "wrapper", *argv]

    m = RamMachine(MachineConfig(qemu=qemu, mem_mib=32), name="wrapped", argv_prefix=wrap).start()
    try:
        assert m._proc is not None and m.pid != m._proc.pid
        # the QEMU itself, or the loader of the root a newer Debian QEMU runs from (ld.so qemu-system-…)
        assert "qemu-system" in Path(f"/proc/{m.pid}/cmdline").read_bytes().decode(errors="replace")
        m.qtest.writeq(GPA, 7)
        assert m.read_ram(GPA, 1) == b"\x07"
        pid, wrapper = m.pid, m._proc.pid
    finally:
        m.stop()
    assert gone(pid) and gone(wrapper)


@pytest.mark.parametrize("binary", ["/bin/true", "/nonexistent/qemu-system-x86_64"])
def test_a_binary_that_is_not_qemu_is_one_clear_line(binary: str) -> None:
    with pytest.raises(SetupError) as err:
        RamMachine(MachineConfig(qemu=binary)).start()
    assert binary in str(err.value) and "\n" not in str(err.value)


def test_qemu_exiting_at_startup_reports_its_stderr(qemu: str) -> None:
    m = RamMachine(MachineConfig(qemu=qemu, extra_args=("-no-such-option",)), name="bad")
    with pytest.raises(SetupError, match=r"bad: QEMU exited with status 1 during startup: .*no-such-option"):
        m.start()
    assert m.dir is None  # cleaned up


# -- migration -----------------------------------------------------------------------------------------------

def test_postcopy_migration_of_128_mib_copies_ram(machines: Factory) -> None:
    src, dst, data = postcopy_pair(machines, 128)
    mig.wait_status(src, {"active"}, timeout=10)
    mig.start_postcopy(src)
    reply = mig.wait_status(src, {"completed"}, timeout=60)
    mig.wait_status(dst, {"completed"}, timeout=10)
    assert reply["ram"]["transferred"] > 100 * MIB
    assert "um" not in dst.ram_flags() and "hg" in dst.ram_flags()  # unregistered, MADV_HUGEPAGE again
    assert dst.read_ram(GPA, len(data)) == data == src.read_ram(GPA, len(data))
    events = [e["data"]["status"] for e in src.transcript.events("MIGRATION")]
    assert "postcopy-active" in events and events[-1] == "completed"


def test_hold_opens_the_nohugepage_window_and_release_closes_it(machines: Factory) -> None:
    src, dst, data = postcopy_pair(machines, 128)
    with mig.HoldUffdRegistration(dst, hold=30) as hold:
        mig.start_postcopy(src)
        hold.wait_open(timeout=10)
        flags = dst.ram_flags()
        assert "nh" in flags and "um" not in flags and "hg" not in flags
        # QEMU >= 11 passes through "postcopy-device" (device state) on its way to "postcopy-active"
        assert hold.is_open() and mig.query(src)["status"] in ("postcopy-active", "postcopy-device")
        with pytest.raises(StallError):  # the held thread is the destination's main loop
            dst.qmp("query-status", timeout=0.3)
    assert hold.window_seconds is not None and hold.window_seconds < 30
    mig.wait_ram_flags(dst, present={"um"}, timeout=5)  # registered right after the release
    mig.wait_status(src, {"completed"}, timeout=60)
    mig.wait_status(dst, {"completed"}, timeout=10)
    assert dst.read_ram(GPA, len(data)) == data
    if hold.mode == "syscall":
        assert "MADV_NOHUGEPAGE" in hold.log and "userfaultfd(O_NONBLOCK|O_CLOEXEC" in hold.log


def test_hold_refuses_to_attach_before_the_advise_probe(machines: Factory) -> None:
    dst = machines("dst", mem_mib=32, incoming=True)
    mig.set_capabilities(dst, postcopy_ram=True)
    with pytest.raises(StallError, match="ADVISE"):
        mig.HoldUffdRegistration(dst, advise_timeout=0.3).attach()


def test_background_snapshot_restores_the_content_at_snapshot_start(machines: Factory, tmp_path: Path) -> None:
    src = machines("src", mem_mib=64)
    data = fill(src, 32 * MIB)
    snap = tmp_path / "snap.bin"
    mig.start_snapshot(src, snap, throttle_bytes_per_s=64 * MIB)
    mig.wait_ram_flags(src, present={"uw"}, timeout=5)  # write-protected: the snapshot is running
    src.qtest.memset(GPA, MIB, 0x77)  # written during the snapshot: must not reach it
    mig.wait_status(src, {"completed"}, timeout=30)
    assert "uw" not in src.ram_flags()
    dst = machines("dst", mem_mib=64, incoming=True)
    mig.restore(dst, snap, timeout=30)
    assert dst.read_ram(GPA, len(data)) == data
