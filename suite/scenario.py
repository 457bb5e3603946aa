"""A scenario is data: a list of steps with page selectors, plus the THP knobs and fill pattern it runs under.

Scenarios round-trip through JSON (they cross the VM agent's wire). Builders at the bottom make the synthetic
sequences the tests parametrize over; a new variant is a new list of steps, not new plumbing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import content
from .pagemap import PAGES_PER_THP
from .thp import ThpSettings

# op -> does the op leave uffd-wp and soft-dirty bits alone? (bits lost across such a step are findings)
OPS: dict[str, bool] = {
    "map": True,  # arg: "hugepage" (MADV_HUGEPAGE, like QEMU's RAM) or "" (no advice)
    "place": False,  # write data into the `data` pages: faults THPs in (the destination's precopy)
    "nohugepage": True,  # MADV_NOHUGEPAGE on the whole region (QEMU at the postcopy switch)
    "discard": True,  # MADV_DONTNEED on the selected pages: no longer placed (QEMU's discards)
    "register": True,  # arg: "missing", "wp" or "missing,wp" (+ "minor", "async", "unpopulated"): UFFDIO_REGISTER all
    "wp": False,  # arg "1"/"0": UFFDIO_WRITEPROTECT the selected pages
    "clear-soft-dirty": False,  # echo 4 > /proc/PID/clear_refs
    "shrink": True,  # fire the deferred-split shrinker
    "touch": False,  # arg "read"/"write": touch every selected page
    "verify": True,  # compare every page with the content the model expects
    # negative controls: change the kernel's state behind the model's back; the oracle must name the pages
    "sabotage-punch": True,  # MADV_DONTNEED on placed pages (a re-created hole)
    "sabotage-unprotect": True,  # UFFDIO_WRITEPROTECT mode 0 (a re-created lost uffd-wp bit)
    # memory axes (issue 11); touch also takes arg "zero" (store zeros: written since the clear, zero-filled)
    "collapse": False,  # MADV_COLLAPSE on the whole region: THPs born from 4 KiB pages (origin "collapse")
    "clear-written": False,  # PAGEMAP_SCAN with PM_SCAN_WP_MATCHING: write-protect all (uffd WP_ASYNC's clear)
    "dump": True,  # arg "soft-dirty" | "written": every page written since the clear must read so (CRIU's dump)
    "sabotage-clean": True,  # arg "soft-dirty" | "written": selected written pages made to read clean
    "sabotage-fill": True,  # data into the selected zero subpages behind the model: those THPs are not underused
    "sabotage-zero": True,  # content axis: the selected data pages zeroed behind the model (a misjudged zero detector)
    # RWP (Linux 7.3, issue 21): register arg "rwp" / "rwp,async"; dump arg "accessed" (PAGEMAP_SCAN hot/cold sets)
    "rwp": False,  # arg "1"/"0": UFFDIO_RWPROTECT the selected pages (present ones become inaccessible)
    "set-mode": True,  # arg "async"/"sync": UFFDIO_SET_MODE toggles UFFD_FEATURE_RWP_ASYNC
    "sabotage-unrwp": True,  # UFFDIO_RWPROTECT mode 0 behind the model's back (a re-created lost RWP bit)
}
# Real-QEMU kinds: a phase op advances the migration to that phase; an action op acts where the migration is.
POSTCOPY_PHASES = ("before-migrate", "mid-precopy", "precopy-done", "pre-switchover", "nohugepage-window",
                   "postcopy-running", "completed")
# the phases libvirt's migration API lets one hold (qemu.libvirt_postcopy says why the others are missing)
LIBVIRT_POSTCOPY_PHASES = ("before-migrate", "mid-precopy", "postcopy-running", "completed")
SNAPSHOT_PHASES = ("before-snapshot", "snapshot-running", "snapshot-done", "restored")
ACTIONS = {
    "shrink": "fire the shrinker; arg: src, dst or both (each side in its own memcg)",
    "read-received": "bounded qtest reads of every page the destination has received (a stuck read is a stall)",
    "write": "qtest writes of the selected pages on the source (arg: src) while the migration runs",
    "sabotage-punch": "negative control: MADV_DONTNEED inside the QEMU (arg: dst) on the selected received pages",
    "sabotage-zero": "negative control: qtest zeroes the selected data pages' non-zero bytes (arg: side), unmodelled",
}
KIND_OPS: dict[str, frozenset[str]] = {
    "postcopy-style": frozenset(OPS),
    "snapshot-style": frozenset(OPS),
    "postcopy": frozenset(POSTCOPY_PHASES) | frozenset(ACTIONS),
    "snapshot": frozenset(SNAPSHOT_PHASES) | frozenset(ACTIONS),
    "postcopy-libvirt": frozenset(LIBVIRT_POSTCOPY_PHASES) | frozenset(ACTIONS),
}
# How a real postcopy migration is driven (``migration.VARIANTS`` has the capabilities): plain postcopy-ram,
# with multifd channels (zero-page-detection=multifd), with postcopy-preempt.
POSTCOPY_VARIANTS = ("", "multifd", "preempt")
SELECTORS = ("all", "data", "zero", "zero-some", "discard", "sabotage", "sabotage-mixed", "sabotage-chunks",
             "sabotage-data", "zero-some-half")
# What a "shrink" step fires to split large folios (``split_triggers``); "shrinker" is the default.
SPLITS = ("shrinker", "pageout", "pageout-swap", "partial-unmap", "debugfs", "ksm", "ksm-zero")
BACKINGS = ("anon", "memfd")  # the region: private anonymous (default) or a MAP_SHARED memfd (shmem THPs)
ORIGINS = ("write", "read", "collapse")  # how its THPs are born: write fault, read (huge zero page) then write,
# MADV_COLLAPSE of 4 KiB pages


@dataclass(frozen=True)
class Step:
    op: str
    arg: str = ""
    pages: str = "all"
    label: str = ""  # phase name in verdicts; defaults to op(arg)

    def __post_init__(self) -> None:
        if not any(self.op in ops for ops in KIND_OPS.values()):
            raise ValueError(f"unknown step op {self.op!r}")
        if self.pages not in SELECTORS:
            raise ValueError(f"unknown page selector {self.pages!r}")

    @property
    def phase(self) -> str:
        if self.label:
            return self.label
        args = [a for a in (self.arg, "" if self.pages == "all" else self.pages) if a]
        return f"{self.op}({', '.join(args)})" if args else self.op

    @property
    def handler(self) -> str:
        """The runner method that performs this step: ``do_<op>``, dashes as underscores (both runners)."""
        return "do_" + self.op.replace("-", "_")


@dataclass(frozen=True)
class Fill:
    """Which subpages of each THP-sized chunk hold data; the rest are zero-filled (underused THPs)."""

    data_per_thp: int = 8
    layout: str = "spread"  # "spread": evenly spaced; "head": the first N subpages
    # "unique": every data page differs; "same": every data page holds the same bytes (synthetic or QEMU), so KSM
    # has duplicates to merge besides zero pages; "sparse": one non-zero byte per data page (``content``)
    content: str = "unique"

    @property
    def id(self) -> str:
        return f"{self.layout}{self.data_per_thp}" + ("" if self.content == "unique" else f"-{self.content}")

    def data_mask(self, npages: int) -> np.ndarray:
        chunk = np.zeros(PAGES_PER_THP, dtype=bool)
        if self.layout == "head":
            chunk[: self.data_per_thp] = True
        elif self.layout == "spread":
            chunk[np.linspace(0, PAGES_PER_THP, self.data_per_thp, endpoint=False).astype(int)] = True
        else:
            raise ValueError(f"unknown fill layout {self.layout!r}")
        return np.resize(chunk, npages)


def is_synthetic(scenario_id: str) -> bool:
    """Does a ``Scenario.id`` (or a bare kind) name a synthetic sequence rather than a real QEMU? Verdicts carry
    the id, not the scenario."""
    return scenario_id.split("[", 1)[0].endswith("-style")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "postcopy-style" or "snapshot-style"
    steps: tuple[Step, ...]
    size_mib: int = 64
    fill: Fill = field(default_factory=Fill)
    thp: ThpSettings = field(default_factory=ThpSettings)
    trigger: str = "auto"  # shrinker trigger: auto (memcg-scoped where possible), memcg, drop_caches
    variant: str = ""  # real postcopy only: one of POSTCOPY_VARIANTS
    split: str = "shrinker"  # what a shrink step fires: one of SPLITS (ids name it when not the default)
    backing: str = "anon"  # one of BACKINGS (synthetic only)
    origin: str = "write"  # one of ORIGINS (synthetic only)

    def __post_init__(self) -> None:
        if self.kind not in KIND_OPS:
            raise ValueError(f"unknown scenario kind {self.kind!r} (one of {', '.join(KIND_OPS)})")
        if self.variant and (self.kind != "postcopy" or self.variant not in POSTCOPY_VARIANTS):
            raise ValueError(f"a {self.kind} scenario has no migration variant {self.variant!r} "
                             f"(postcopy: one of {', '.join(v for v in POSTCOPY_VARIANTS if v)})")
        if self.split not in SPLITS or (self.split == "partial-unmap" and not self.synthetic):
            raise ValueError(f"a {self.kind} scenario has no split trigger {self.split!r} (one of {SPLITS}; "
                             "partial-unmap is synthetic only)")
        if self.backing not in BACKINGS or self.origin not in ORIGINS:
            raise ValueError(f"unknown backing {self.backing!r} or origin {self.origin!r}")
        if self.fill.content not in content.CONTENTS:
            raise ValueError(f"fill content {self.fill.content!r}: one of {', '.join(content.CONTENTS)}")
        if bad := [st.op for st in self.steps if st.op not in KIND_OPS[self.kind]]:
            raise ValueError(f"{self.kind} scenario cannot have steps {', '.join(bad)}")

    @property
    def id(self) -> str:
        """The scenario's name in verdicts, reports and reproducers: ``kind[name-thp-fill]``."""
        split = "" if self.split == "shrinker" else f"-by-{self.split}"
        axes = "".join(f"-{v}" for v, d in ((self.backing, "anon"), (self.origin, "write")) if v != d)
        return f"{self.kind}[{self.name}-{self.thp.id}-{self.fill.id}{axes}{split}]"

    @property
    def npages(self) -> int:
        return self.size_mib * 256

    @property
    def synthetic(self) -> bool:
        return is_synthetic(self.kind)

    def selector(self, name: str) -> np.ndarray:
        """Bool mask over the region's pages for a page selector."""
        n = self.npages
        data = self.fill.data_mask(n)
        if name == "all":
            return np.ones(n, dtype=bool)
        if name == "data":
            return data
        if name == "zero":
            return ~data
        if name == "zero-some":  # every 16th zero-filled subpage: written, THPs stay underused (head64: 420 zero)
            return ~data & (np.arange(n) % 16 == 4)
        chunk = np.arange(n) // PAGES_PER_THP
        sub = np.arange(n) % PAGES_PER_THP
        if name == "zero-some-half":  # zero-some of the even chunks only (RWP: the odd chunks stay untouched)
            return self.selector("zero-some") & (chunk % 2 == 0)
        if name == "discard":  # QEMU discards re-dirtied ranges: the first 64 subpages of every 4th chunk
            return (chunk % 4 == 3) & (sub < 64)
        if name == "sabotage":  # a few zero subpages of two chunks, not discarded
            return ~data & ((chunk == 1) & (sub >= 300) & (sub < 303) | (chunk == 5) & (sub >= 500) & (sub < 502))
        if name == "sabotage-chunks":  # every zero subpage of chunks 1 and 5
            return ~data & ((chunk == 1) | (chunk == 5))
        if name == "sabotage-data":  # data subpages of chunks 1 and 5, in their first half (not discarded)
            return data & ((chunk == 1) | (chunk == 5)) & (sub < 256)
        if name == "sabotage-mixed":  # the same, plus the first data subpage of chunk 3
            first_data = (chunk == 3) & data & (np.cumsum(data & (chunk == 3)) == 1)
            return self.selector("sabotage") | first_data
        raise ValueError(f"unknown page selector {name!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        d = json.loads(text)
        return cls(
            name=d["name"], kind=d["kind"], steps=tuple(Step(**s) for s in d["steps"]), size_mib=d["size_mib"],
            fill=Fill(**d["fill"]), thp=ThpSettings(**d["thp"]), trigger=d["trigger"], variant=d.get("variant", ""),
            split=d.get("split", "shrinker"),
            backing=d.get("backing", "anon"), origin=d.get("origin", "write"),
        )


# --- builders ------------------------------------------------------------------------------------------------

# Points of the postcopy-style sequence where registration and shrink can sit, in order.
POSTCOPY_POINTS = ("before-first-fault", "after-place", "after-nohugepage", "after-discard")


def postcopy_style(register_at: str, shrink_at: str, *, fill: Fill | None = None,
                   thp: ThpSettings | None = None, sabotage: bool = False) -> Scenario:
    """QEMU's destination sequence: place (precopy) → MADV_NOHUGEPAGE → discard → register MISSING → touch.

    ``register_at`` is a point or 'after-shrink' (same point as the shrink, just after it); ``shrink_at`` a point
    or 'after-register'. ``sabotage`` punches holes into placed zero subpages before registering (negative control).
    """
    if register_at == "after-shrink" and shrink_at == "after-register":
        raise ValueError("register and shrink cannot each be placed after the other")
    reg_point = shrink_at if register_at == "after-shrink" else register_at
    shrink_point = register_at if shrink_at == "after-register" else shrink_at
    for p in (reg_point, shrink_point):
        if p not in POSTCOPY_POINTS:
            raise ValueError(f"unknown point {p!r} (one of {', '.join(POSTCOPY_POINTS)})")
    register, shrink = Step("register", "missing"), Step("shrink", label=f"shrink@{shrink_at}")
    hooks: dict[str, list[Step]] = {p: [] for p in POSTCOPY_POINTS}
    first, second = (shrink, register) if register_at == "after-shrink" else (register, shrink)
    if reg_point == shrink_point:
        hooks[reg_point] += [first, second]
    else:
        hooks[reg_point].append(register)
        hooks[shrink_point].append(shrink)
    if sabotage:  # after the shrink point, before registration is where a buggy split leaves its holes
        hooks["after-discard"].insert(0, Step("sabotage-punch", pages="sabotage"))
    steps = [
        Step("map", "hugepage"), *hooks["before-first-fault"],
        Step("place", pages="data"), *hooks["after-place"],
        Step("nohugepage"), *hooks["after-nohugepage"],
        Step("discard", pages="discard"), *hooks["after-discard"],
        Step("touch", "read"), Step("verify"),
    ]
    name = f"register@{register_at}-shrink@{shrink_at}"
    return Scenario(name=name, kind="postcopy-style", steps=tuple(steps), fill=fill or Fill(),
                    thp=thp or ThpSettings())


SNAPSHOT_SHRINK_POINTS = ("before-register", "after-register", "after-protect")


def snapshot_style(shrink_at: str, *, fill: Fill | None = None, thp: ThpSettings | None = None,
                   sabotage: bool = False) -> Scenario:
    """Background snapshot: register WP, write-protect everything, then write every page: each write must trap.

    ``sabotage`` un-protects a few zero subpages after the shrink (negative control).
    """
    if shrink_at not in SNAPSHOT_SHRINK_POINTS:
        raise ValueError(f"unknown point {shrink_at!r} (one of {', '.join(SNAPSHOT_SHRINK_POINTS)})")
    shrink = Step("shrink", label=f"shrink@{shrink_at}")
    steps = [Step("map", "hugepage"), Step("place", pages="data")]
    steps += [shrink] if shrink_at == "before-register" else []
    steps += [Step("register", "wp")] + ([shrink] if shrink_at == "after-register" else [])
    steps += [Step("wp", "1")] + ([shrink] if shrink_at == "after-protect" else [])
    steps += [Step("sabotage-unprotect", pages="sabotage")] if sabotage else []
    steps += [Step("touch", "write", pages="zero"), Step("touch", "write", pages="data"), Step("verify")]
    return Scenario(name=f"shrink@{shrink_at}", kind="snapshot-style", steps=tuple(steps), fill=fill or Fill(),
                    thp=thp or ThpSettings())


def soft_dirty_style(*, fill: Fill | None = None, thp: ThpSettings | None = None) -> Scenario:
    """clear_refs 4, write one data subpage per THP, shrink: soft-dirty bits reported before must stay."""
    steps = (Step("map", "hugepage"), Step("place", pages="data"), Step("clear-soft-dirty"),
             Step("touch", "write", pages="data"), Step("shrink", label="shrink@after-write"), Step("verify"))
    return Scenario(name="soft-dirty", kind="snapshot-style", steps=steps, fill=fill or Fill(),
                    thp=thp or ThpSettings())


def with_thp(scenario: Scenario, thp: ThpSettings) -> Scenario:
    return replace(scenario, thp=thp)


def postcopy(shrink_at: str, *, side: str = "both", fill: Fill | None = None, thp: ThpSettings | None = None,
             size_mib: int = 256, sabotage_at: str = "", variant: str = "", zeroed_at: str = "") -> Scenario:
    """A real QEMU postcopy migration walked through every phase, the shrinker fired at ``shrink_at``; the
    destination's received pages are read (bounded) while postcopy runs; the source at the switch and both sides
    at the end are compared with the model. ``variant`` (multifd, preempt) drives the same phases with more of
    QEMU's migration machinery; ``zeroed_at`` zeroes a few source data pages behind the model (negative control)."""
    return _postcopy("postcopy", POSTCOPY_PHASES, shrink_at, side, fill, thp, size_mib, sabotage_at, variant,
                     zeroed_at)


def postcopy_libvirt(shrink_at: str, *, side: str = "both", fill: Fill | None = None,
                     thp: ThpSettings | None = None, size_mib: int = 256, sabotage_at: str = "") -> Scenario:
    """``postcopy`` with both RAM machines libvirt domains and the migration through libvirt's API, at the phases
    libvirt lets one hold."""
    return _postcopy("postcopy-libvirt", LIBVIRT_POSTCOPY_PHASES, shrink_at, side, fill, thp, size_mib,
                     sabotage_at, "")


def _postcopy(kind: str, phases: tuple[str, ...], shrink_at: str, side: str, fill: Fill | None,
              thp: ThpSettings | None, size_mib: int, sabotage_at: str, variant: str, zeroed_at: str = "") -> Scenario:
    if shrink_at not in phases:
        raise ValueError(f"unknown {kind} phase {shrink_at!r} (one of {', '.join(phases)})")
    steps: list[Step] = []
    for phase in phases:
        steps.append(Step(phase))
        if phase == shrink_at:
            steps.append(Step("shrink", side, label=f"shrink@{phase}"))
        if phase == sabotage_at:  # holes a buggy split would leave, punched by hand into the destination
            steps.append(Step("sabotage-punch", "dst", pages="sabotage-mixed"))
        if phase == zeroed_at:  # data a misjudging zero detector would lose, zeroed by hand on the source
            steps.append(Step("sabotage-zero", "src", pages="sabotage-data"))
        if phase == "postcopy-running":
            steps.append(Step("read-received"))
    name = f"shrink@{shrink_at}" + (f"-sabotage@{sabotage_at}" if sabotage_at else "") \
        + (f"-zeroed@{zeroed_at}" if zeroed_at else "")
    name = f"{variant}-{name}" if variant else name
    return Scenario(name=name, kind=kind, steps=tuple(steps), size_mib=size_mib,
                    fill=fill or Fill(), thp=thp or ThpSettings(), variant=variant)


def snapshot(shrink_at: str = "snapshot-running", *, fill: Fill | None = None, thp: ThpSettings | None = None,
             size_mib: int = 256, zeroed_at: str = "") -> Scenario:
    """A real QEMU background snapshot: shrink at ``shrink_at``, write zero-filled and data subpages while it
    runs, restore into a fresh QEMU and compare with the content at snapshot start.

    Only every 16th zero-filled subpage is written, so the THPs stay underused for a shrink after the writes; the
    oracle still checks the uffd-wp bit of every page across the shrink."""
    if shrink_at not in SNAPSHOT_PHASES[:-1]:
        raise ValueError(f"unknown snapshot phase {shrink_at!r} (one of {', '.join(SNAPSHOT_PHASES[:-1])})")
    steps: list[Step] = []
    for phase in SNAPSHOT_PHASES:
        steps.append(Step(phase))
        if phase == shrink_at:
            steps.append(Step("shrink", "src", label=f"shrink@{phase}"))
        if phase == zeroed_at:  # negative control: data zeroed behind the model (a misjudging zero detector)
            steps.append(Step("sabotage-zero", "src", pages="sabotage-data"))
        if phase == "snapshot-running":
            steps += [Step("write", "src", pages="zero-some"), Step("write", "src", pages="data")]
    name = f"shrink@{shrink_at}" + (f"-zeroed@{zeroed_at}" if zeroed_at else "")
    return Scenario(name=name, kind="snapshot", steps=tuple(steps), size_mib=size_mib,
                    fill=fill or Fill(), thp=thp or ThpSettings())
