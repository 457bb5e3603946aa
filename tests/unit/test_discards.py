"""QEMU's own discards, read from a real trace log: QEMU 11.1.3's destination in a multifd+postcopy migration
(256 MiB, ``shrink@nohugepage-window-mpn409-spread8``, captured 2026-12-04 on the host). At the switch it
discarded the dirtier's MiB (gpa 0x100000) and the last 127 pages of RAM, which a multifd channel had placed
(gpa 0xff81000), then placed them again; the ledger once counted those 127 as holes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from suite.pagemap import PAGE
from suite.qemu import discards
from suite.qemu.discards import DiscardLog, Event

TRACE = Path(__file__).parent.parent / "data" / "qemu-11.1.3-multifd-postcopy-trace.log"
NPAGES = 256 << 8
BASE = 0x7F2B07E00000  # host address of gpa 0: the first placement (host …7f00000) is the dirtier's gpa 0x100000
DIRTIER = np.arange(NPAGES) // 256 == 1  # gpa 0x100000 … 0x1fffff
TAIL = np.arange(NPAGES) >= (0xFF81000 // PAGE)


def lines() -> list[str]:
    return TRACE.read_text().splitlines(keepends=True)


def test_parse_the_real_trace():
    events = discards.parse(TRACE.read_text())
    ram = [(e.offset, e.length) for e in events if e.kind == "discard" and e.block == "pc.ram"]
    assert ram == [(0, 0x10000000), (0x100000, 0x100000), (0xFF81000, 0x7F000)]
    assert sum(e.kind == "discard" for e in events) == 13
    places = [e.offset for e in events if e.kind == "place"]
    assert len(places) == 465 and places[0] == BASE + 0x100000


def test_parse_line_forms():
    assert discards.parse_line("123@1796400028.044806:ram_discard_range pc.ram: start: 1000 2000\n") == \
        Event("discard", 0x1000, 0x2000, "pc.ram")
    assert discards.parse_line("postcopy_place_page_zero host=0x7f0000001000") == Event("place", 0x7F0000001000, PAGE)
    assert discards.parse_line("qemu-system-x86_64: warning: something") is None
    assert discards.parse_line("ram_load_loop pc.ram: addr: 0x0 flags: 0x2 host: 0x1") is None


def replay(tmp_path: Path) -> tuple[DiscardLog, Path]:
    log = DiscardLog(tmp_path / "trace.log", NPAGES, lambda: BASE)
    return log, log.path


def snapshot(log: DiscardLog, present: np.ndarray) -> np.ndarray:
    log.before_snapshot()
    return log.after_snapshot(present)


def test_replay_excuses_exactly_what_qemu_discarded(tmp_path):
    log, path = replay(tmp_path)
    text = lines()
    start, switch, placed = text[:6], text[6:13], text[13:]
    path.write_text("".join(start))  # the discard of all RAM when postcopy is advised, before any page
    all_present = np.ones(NPAGES, dtype=bool)
    assert snapshot(log, all_present).all()  # taken back until a snapshot shows them placed (precopy)
    assert not snapshot(log, all_present).any()
    with path.open("a") as f:
        f.write("".join(switch))
    holes = DIRTIER | TAIL
    holes[0x5000] = True  # a hole QEMU did not make: never excused
    excused = snapshot(log, ~holes)
    assert (excused == (DIRTIER | TAIL)).all() and not excused[0x5000]
    assert log.note(besides=DIRTIER).startswith("QEMU itself discarded 127 guest page(s) after the start "
                                                "(first gpa 0xff81000)")
    with path.open("a") as f:
        f.write("".join(placed))
    assert not snapshot(log, all_present).any()
    assert log.note(besides=DIRTIER).endswith("; 0 not placed again")


def test_a_discard_read_after_the_snapshot_excuses_it_then_and_later(tmp_path):
    log, path = replay(tmp_path)
    path.write_text("".join(lines()[:6]))
    snapshot(log, np.ones(NPAGES, dtype=bool))
    log.before_snapshot()
    with path.open("a") as f:  # QEMU discards while the snapshot is read: present in it, gone after
        f.write("".join(lines()[6:13]))
    assert (log.after_snapshot(np.ones(NPAGES, dtype=bool)) == (DIRTIER | TAIL)).all()
    assert (snapshot(log, ~(DIRTIER | TAIL)) == (DIRTIER | TAIL)).all()


def test_placed_again_then_punched_is_found_next_snapshot(tmp_path):
    log, path = replay(tmp_path)
    path.write_text("".join(lines()))
    snapshot(log, np.ones(NPAGES, dtype=bool))  # the start's discard of all RAM: cleared by presence
    assert not snapshot(log, np.ones(NPAGES, dtype=bool)).any()
    punched = np.zeros(NPAGES, dtype=bool)
    punched[0xFF81000 // PAGE] = True  # QEMU placed it again; a hole now is the kernel's
    assert not snapshot(log, ~punched)[punched].any()


def test_a_partial_line_waits(tmp_path):
    log, path = replay(tmp_path)
    path.write_text("ram_discard_range pc.ram: sta")
    assert log.read() == []
    with path.open("a") as f:
        f.write("rt: 2000 1000\n")
    assert log.read() == [Event("discard", 0x2000, 0x1000, "pc.ram")]


def test_untraced_qemu_excuses_nothing(tmp_path):
    log = DiscardLog(tmp_path / "trace.log", NPAGES, lambda: BASE, enabled=False)
    (tmp_path / "trace.log").write_text("".join(lines()))
    assert not snapshot(log, np.zeros(NPAGES, dtype=bool)).any()
    assert "not traced" in log.note()
