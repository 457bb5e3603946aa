"""The structured result of one scenario run: JSON in, JSON out (it crosses the VM agent's wire)."""
from __future__ import annotations

import json
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
KEPT = 4096  # page addresses kept in the JSON per finding (the count is always exact)


@dataclass
class Finding:
    kind: str
    phase: str
    count: int
    addresses: list[int] = field(default_factory=list)  # first KEPT addresses (virtual or guest-physical)
    space: str = "va"  # "va": the helper's virtual addresses; "gpa": guest-physical addresses
    detail: str = ""

    @classmethod
    def of(cls, kind: str, phase: str, addresses: list[int], space: str = "va", detail: str = "") -> Finding:
        return cls(kind, phase, len(addresses), sorted(addresses)[:KEPT], space, detail)

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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Verdict:
        data = json.loads(text)
        data["findings"] = [Finding(**f) for f in data.get("findings", [])]
        data["phases"] = [PhaseRecord(**p) for p in data.get("phases", [])]
        return cls(**data)
