"""The structured result of one scenario run: JSON in, JSON out (it crosses the VM agent's wire)."""
from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# What each finding kind means, in the words of the failure message.
KINDS = {
    "hole": "placed pages became pte_none holes",
    "missing-fault": "MISSING faults on placed pages (QEMU ignores these: the faulting thread stalls)",
    "lost-uffd-wp": "pages lost their uffd-wp bit (pagemap bit 57)",
    "lost-soft-dirty": "pages lost their soft-dirty bit (pagemap bit 55)",
    "no-wp-fault": "writes to write-protected pages raised no WP fault (the write went through untrapped)",
    "content": "pages differ from the expected content",
    "lost-data": "data pages read as zeros (or map the zero page) after a split: the zero detector misjudged them",
    "stall": "received pages a reader stalls on (a read did not return in time)",
    "no-split": "THPs (large folios) were not split although the shrinker (split trigger) should have split them",
    "stale-dump": "pages written since the clear read clean: an incremental dump would restore stale data",
    "no-rwp-fault": "accesses to read-write-protected pages raised no RWP fault (the access went through untrapped)",
    "extra-rwp-fault": "RWP faults on pages not read-write-protected, or more than one on a page",
    "accessed-cold": "pages accessed since RWP protection that PAGEMAP_SCAN reports not accessed (a working-set "
                     "tracker would evict a page in use)",
    "untouched-hot": "pages not accessed since RWP protection that PAGEMAP_SCAN reports accessed (their RWP "
                     "protection is gone)",
}
FIRST_SHOWN = 8  # addresses shown in a message
PAGE = 4096


def to_runs(values: Iterable[int], step: int = PAGE) -> list[list[int]]:
    """Sorted distinct values as runs ``[first, count]`` of values ``step`` apart: a cell's ~16,000 pages in a
    few hundred pairs of JSON."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][0] + out[-1][1] * step:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def from_runs(runs: Iterable[Iterable[int]], step: int = PAGE) -> list[int]:
    return [first + i * step for first, count in runs for i in range(count)]


def pack_pages(indices: Iterable[int]) -> str:
    """A set of page indices as a zlib-compressed bitmap in base64: a fill's periodic page sets in ~100 bytes."""
    idx = sorted({int(i) for i in indices})
    bits = bytearray((idx[-1] + 8) // 8 if idx else 0)
    for i in idx:
        bits[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(zlib.compress(bytes(bits), 9)).decode()


def unpack_pages(text: str) -> list[int]:
    bits = zlib.decompress(base64.b64decode(text))
    return [i * 8 + b for i, byte in enumerate(bits) if byte for b in range(8) if byte >> b & 1]


@dataclass
class Finding:
    kind: str
    phase: str
    count: int
    addresses: list[int] = field(default_factory=list)  # every page, sorted (virtual or guest-physical); no-split
    # findings name each THP's first page, or none where the whole shrink split nothing
    space: str = "va"  # "va": the helper's virtual addresses; "gpa": guest-physical addresses
    detail: str = ""

    @classmethod
    def of(cls, kind: str, phase: str, addresses: list[int], space: str = "va", detail: str = "") -> Finding:
        return cls(kind, phase, len(addresses), sorted(addresses), space, detail)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the addresses as runs ``[first address, pages]`` (complete, however many)."""
        d = asdict(self)
        d["runs"] = to_runs(d.pop("addresses"))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        d = dict(d)  # "addresses": a verdict.json written before runs (its first 4,096 pages)
        d["addresses"] = from_runs(d.pop("runs")) if "runs" in d else d.get("addresses", [])
        return cls(**d)

    def message(self) -> str:
        first = ", ".join(f"{self.space} {a:#x}" for a in self.addresses[:FIRST_SHOWN])
        more = ", …" if self.count > FIRST_SHOWN else ""
        text = f"[{self.phase}] {self.count:,} {KINDS.get(self.kind, self.kind)}"
        if self.addresses:
            text += f" (first {first}{more})"
        return text + (f": {self.detail}" if self.detail else "")


@dataclass
class PhaseRecord:
    """Page-state counts after one step, and how long the step took."""

    phase: str
    counts: dict[str, int]
    seconds: float


@dataclass
class Verdict:
    scenario: str
    kernel: str
    qemu: str = ""
    findings: list[Finding] = field(default_factory=list)
    phases: list[PhaseRecord] = field(default_factory=list)
    shrinks: list[dict[str, Any]] = field(default_factory=list)  # per shrink: trigger, THPs before/after, vmstat
    split_expected: bool = False
    no_split_reason: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    region: int = 0  # address of page 0 of a synthetic run's region (what the findings' "va" addresses count from)
    # the model's named page sets ("data": pages the fill wrote, "zero": zero-filled ones), page indices counted
    # from ``region`` (gpa 0 for a QEMU) packed by ``pack_pages``: what a known finding's signature is stated in
    pages: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def failure_message(self) -> str:
        head = f"{self.scenario} on kernel {self.kernel}" + (f", QEMU {self.qemu}" if self.qemu else "")
        return "\n".join([head, *(f"  {f.message()}" for f in self.findings)])

    def summary(self) -> str:
        """One line for logs and the terminal: the verdict and whether anything was split."""
        split = "; ".join(
            f"{s['phase']}: {s['folios_before']}→{s['folios_after']} large folios ({s['split']}: {s['trigger']})"
            if "folios_before" in s else f"{s['phase']}: {s['thp_before']}→{s['thp_after']} THPs ({s['trigger']})"
            for s in self.shrinks
        )
        state = "ok" if self.ok else f"{len(self.findings)} finding(s)"
        reason = f"; no split expected: {self.no_split_reason}" if self.no_split_reason else ""
        return f"{self.scenario}: {state}; splits {split or 'none fired'}{reason}"

    def name_pages(self, name: str, indices: Iterable[int]) -> None:
        """Record the model's page set ``name`` (page indices of the run's region)."""
        self.pages[name] = pack_pages(indices)

    def page_set(self, name: str) -> set[int]:
        """The addresses (in the findings' space) of the model's page set ``name``; empty if not recorded."""
        return {self.region + i * PAGE for i in unpack_pages(self.pages[name])} if name in self.pages else set()

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"findings": [f.to_dict() for f in self.findings]})

    @classmethod
    def from_json(cls, text: str) -> Verdict:
        data = json.loads(text)
        data["findings"] = [Finding.from_dict(f) for f in data.get("findings", [])]
        data["phases"] = [PhaseRecord(**p) for p in data.get("phases", [])]
        return cls(**data)
