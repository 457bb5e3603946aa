"""QEMU's own discards of guest RAM, read from its trace events: received pages QEMU took back itself.

A postcopy destination discards (MADV_DONTNEED) guest RAM twice: all of it when the incoming stream advises
postcopy, before any page arrives, and at the switch the pages the source will send again (re-dirtied after they
were sent; with multifd, pages a channel had already placed). ``ram_discard_range`` clears them from QEMU's
received set too, so QEMU requests or receives them again (``postcopy_place_page``): such a page is not present
and not received, which is not a hole the kernel made. A page that is not present and that QEMU never discarded
stays a finding.

The destination runs with ``-trace events=FILE,file=LOG`` (Debian builds QEMU with the ``log`` trace backend; a
QEMU whose backend does not log them is asked over QMP ``trace-event-get-state`` and then judged without this
knowledge, saying so). ``DiscardLog`` reads the log incrementally around each pagemap snapshot:

- events read *before* a snapshot happened before it: a discard marks the page taken back, a placement (or the
  page present in the snapshot: precopy placements are not traced) marks it placed again;
- events read *after* a snapshot may have happened during it: a discard among them excuses its page at this
  snapshot, and every such event is applied only after the snapshot's presence was counted.

A page QEMU placed again and the kernel then punched is found at the next snapshot (QEMU never re-places a
received page, so the hole stays). The log backend writes ``[PID@SEC.USEC:]NAME ARGS`` per event (the prefix
only with ``-msg timestamp=on``); ``parse`` reads both.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HolecheckError
from ..pagemap import PAGE

# ram_discard_range(const char *rbname, uint64_t start, size_t len) "%s: start: %" PRIx64 " %zx"
# postcopy_place_page(void *host_addr) "host=%p"; postcopy_place_page_zero(void *host_addr) "host=%p"
EVENTS = ("ram_discard_range", "postcopy_place_page", "postcopy_place_page_zero")
RAM_BLOCK = "pc.ram"  # the RAM block of a ``-machine pc`` guest (its only one holding guest RAM)

_LINE = re.compile(r"^(?:\d+@\d+\.\d+:)?(?P<name>[a-z0-9_]+) (?P<args>.*)$")
_DISCARD = re.compile(r"^(?P<block>\S+): start: (?P<start>[0-9a-fA-F]+) (?P<len>[0-9a-fA-F]+)$")
_PLACE = re.compile(r"^host=(?:0x)?(?P<host>[0-9a-fA-F]+)$")


@dataclass(frozen=True)
class Event:
    """One traced event: a discard of ``length`` bytes at ``offset`` into ``block``, or a placement of the host
    page at ``offset`` (a host virtual address; ``block`` empty, ``length`` one page)."""

    kind: str  # "discard" or "place"
    offset: int
    length: int
    block: str = ""


def parse_line(line: str) -> Event | None:
    """The event of one log line, or None for anything else (other events, QEMU's own messages)."""
    m = _LINE.match(line.strip())
    if m is None or m["name"] not in EVENTS:
        return None
    if m["name"] == "ram_discard_range":
        d = _DISCARD.match(m["args"].strip())
        return Event("discard", int(d["start"], 16), int(d["len"], 16), d["block"]) if d else None
    p = _PLACE.match(m["args"].strip())
    return Event("place", int(p["host"], 16), PAGE) if p else None


def parse(text: str) -> list[Event]:
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


def trace_args(directory: Path) -> list[str]:
    """QEMU arguments that log ``EVENTS`` to ``directory/trace.log`` (the events file is written here)."""
    events = directory / "trace-events"
    events.write_text("".join(f"{e}\n" for e in EVENTS))
    return ["-trace", f"events={events},file={directory / 'trace.log'}"]


@dataclass
class DiscardLog:
    """What one destination QEMU discarded and placed again, per guest page, as far as read from ``path``."""

    path: Path
    npages: int
    host_base: Callable[[], int]  # host address of guest page 0 (placements are logged by host address)
    block: str = RAM_BLOCK
    enabled: bool = True  # False: this QEMU does not log the events (nothing is ever excused)
    taken: np.ndarray = field(init=False)  # QEMU discarded the page and has not placed it again
    excused: np.ndarray = field(init=False)  # holes at the last snapshot that QEMU made itself
    discarded: np.ndarray = field(init=False)  # every page QEMU ever discarded after the start (for the notes)
    _offset: int = 0
    _partial: str = ""
    _after: list[Event] = field(default_factory=list)
    _starts: int = 0

    def __post_init__(self) -> None:
        self.taken = np.zeros(self.npages, dtype=bool)
        self.excused = np.zeros(self.npages, dtype=bool)
        self.discarded = np.zeros(self.npages, dtype=bool)

    def read(self) -> list[Event]:
        """Events logged since the last read (a line still being written waits for the next)."""
        if not self.enabled:
            return []
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                text = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []  # QEMU opens its log at the first event
        except OSError as exc:
            raise HolecheckError(f"cannot read QEMU's trace log {self.path}: {exc}") from None
        whole, _, self._partial = (self._partial + text).rpartition("\n")
        return parse(whole)

    def pages(self, event: Event) -> slice:
        """The guest pages an event covers (clipped to RAM; other blocks cover none)."""
        if event.kind == "discard":
            if event.block != self.block:
                return slice(0, 0)
            first = event.offset // PAGE
            return slice(min(first, self.npages), min(first + -(-event.length // PAGE), self.npages))
        first = (event.offset - self.host_base()) // PAGE
        return slice(first, first + 1) if 0 <= first < self.npages else slice(0, 0)

    def apply(self, events: Iterable[Event]) -> None:
        for e in events:
            sl = self.pages(e)
            self.taken[sl] = e.kind == "discard"
            if e.kind == "discard" and sl.stop - sl.start == self.npages:
                self._starts += 1  # the discard of all RAM at the start of the stream, before any page
            elif e.kind == "discard":
                self.discarded[sl] = True

    def before_snapshot(self) -> None:
        self.apply(self._after)
        self.apply(self.read())

    def after_snapshot(self, present: np.ndarray) -> np.ndarray:
        """The pages QEMU itself took back as far as this snapshot can tell (``present``: the snapshot's)."""
        self._after = self.read()
        self.excused = self.taken.copy()
        for e in self._after:
            if e.kind == "discard":
                self.excused[self.pages(e)] = True
        self.taken &= ~present  # present after every discard read before the snapshot: placed again (precopy)
        return self.excused

    def note(self, besides: np.ndarray | None = None) -> str:
        """What QEMU discarded after the start, but for ``besides`` (pages the driver keeps dirty), for the
        verdict's notes ("" when nothing)."""
        if not self.enabled:
            return "QEMU's discards are not traced here (its trace backend does not log them): none excused"
        discarded = self.discarded & ~besides if besides is not None else self.discarded
        if not (n := int(discarded.sum())):
            return ""
        first = int(np.argmax(discarded)) * PAGE
        return (f"QEMU itself discarded {n} guest page(s) after the start (first gpa {first:#x}), to receive them "
                f"again: not holes until placed again; {int((self.taken & discarded).sum())} not placed again")


def tracing(machine_qmp: Callable[..., object]) -> bool:
    """Does this QEMU log ``EVENTS`` (asked over QMP trace-event-get-state)? A build without the log backend
    reports them ``unavailable`` or ``disabled``."""
    with contextlib.suppress(HolecheckError):
        states = machine_qmp("trace-event-get-state", name="ram_discard_range")
        return any(s.get("state") == "enabled" for s in states)  # type: ignore[attr-defined]
    return False
