"""A standalone C reproducer for a synthetic scenario: one file a kernel developer builds and runs without Python.

``generate`` turns a ``postcopy-style`` / ``snapshot-style`` scenario (and, if given, the verdict it failed with)
into C: the scenario's steps and page selectors become tables (selectors as page runs computed here, so the C
touches exactly the pages the runner did, with the same syscall granularity), the fault handler is copied from
``uffd_helper.c`` at generation time (the very handler the suite ran), and a fixed runtime
(``reproducer_runtime.c``) sets and restores the THP knobs, scopes the shrinker to a memory cgroup, reads
/proc/self/pagemap after every step and judges pages exactly like ``runner.SyntheticRun.judge``.

    python -m suite.reports.reproducer .holecheck/<test>/ [-o repro.c]     # from a failing cell's artifacts
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np

from .. import split_triggers, thp
from ..oracle import runs
from ..pagemap import PAGE, PAGES_PER_THP
from ..scenario import OPS, Scenario, Step
from ..uffd import SOURCE as HELPER_SOURCE
from ..verdict import Verdict

# Sections of uffd_helper.c copied into the reproducer: includes, macros and globals; then pattern + handler.
PRELUDE = ("#define _GNU_SOURCE", "/* ---- growable string")
HANDLER = ("/* ---- page contents ---- */", "/* ---- commands ---- */")
KNOB_FILES = {"enabled": "enabled", "defrag": "defrag", "max_ptes_none": "khugepaged/max_ptes_none",
              "shrink_underused": "shrink_underused", "shmem_enabled": "shmem_enabled"}
BUILD = "cc -O2 -pthread repro.c -o repro"
# The fixed part of every reproducer: set-up, the step loop and the judge (C tooling and diffs see it as C).
RUNTIME = resources.files(__package__) / "reproducer_runtime.c"
assert PAGE == 4096  # the C side hard-codes 4 KiB pages (uffd_helper.c's PAGE)


SPLIT_TEXT = {
    "shrinker": "the deferred-split shrinker",
    "pageout": "MADV_PAGEOUT of the region: reclaim splits each large folio, with or without swap",
    "pageout-swap": "MADV_PAGEOUT of the region with swap on (the suite's run used a zram device in its L1 VM; "
                    "here: whatever swap this machine has on)",
    "partial-unmap": "MADV_DONTNEED of one zero subpage of every large folio (SEL_partial), then the shrinker",
    "debugfs": "debugfs split_huge_pages on this pid and region (mounted privately if absent)",
    "ksm": "MADV_MERGEABLE, ksmd run for 20 full scans with use_zero_pages=0",
    "ksm-zero": "MADV_MERGEABLE, ksmd run for 20 full scans with use_zero_pages=1",
}
PLACED = {"unique": "a unique stamp", "same": "the same stamp",
          "sparse": "one non-zero byte (offset and value from the page index, suite/content.py)"}
KSM_KNOBS = {"../ksm/run": "0", "../ksm/pages_to_scan": "100000", "../ksm/sleep_millisecs": "0",
             "../ksm/smart_scan": "0"}


def knobs(s: Scenario) -> dict[str, str | None]:
    """Knob file (relative to the THP sysfs dir) → value the reproducer sets (None: left as found); the
    reproducer restores each at exit, also on a signal. mTHP: only its size enabled; KSM's knobs for ksm*."""
    settings = s.thp.to_json()
    size_kb, size_enabled = settings.pop("mthp_kb", 0), settings.pop("mthp_enabled", "always")
    out: dict[str, str | None] = {KNOB_FILES[k]: None if v is None else str(int(v) if isinstance(v, bool) else v)
                                  for k, v in settings.items()}
    if size_kb:
        for kb in (8, *thp.MTHP_SIZES_KB, 2048):
            out[f"hugepages-{kb}kB/enabled"] = size_enabled if kb == size_kb else "never"
    if s.split.startswith("ksm"):
        out |= KSM_KNOBS | {"../ksm/use_zero_pages": str(int(s.split == "ksm-zero"))}
    return out


def nonzero_at_split(s: Scenario) -> np.ndarray:
    """The pages the model expects non-zero at the first shrink step (as runner.SyntheticRun tracks them)."""
    nonzero = np.zeros(s.npages, dtype=bool)
    for st in s.steps:
        if st.op == "shrink":
            break
        if st.op == "place" or (st.op == "touch" and st.arg == "write"):
            nonzero |= s.selector(st.pages)
    return nonzero


def _slice(text: str, start: str, end: str) -> str:
    lo, hi = text.find(start), text.find(end)
    if lo < 0 or hi < lo:
        raise ValueError(f"{HELPER_SOURCE} no longer has the section {start!r} … {end!r} the reproducer copies")
    return text[lo:hi].rstrip() + "\n"


def c_string(text: str) -> str:
    """A C string literal (non-ASCII as octal UTF-8 bytes)."""
    out = []
    for b in text.encode():
        ch = chr(b)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= b < 127 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    return text.replace("*/", "* /")


def _ident(selector: str) -> str:
    return "SEL_" + selector.replace("-", "_")


def describe(step: Step, s: Scenario) -> str:
    """What a step does, for the header comment."""
    what = {
        "map": "mmap an anonymous region (2 MiB aligned)" + (" + MADV_HUGEPAGE" if step.arg == "hugepage" else ""),
        "place": f"write {PLACED[s.fill.content]} into the selected pages "
                 f"({s.fill.data_per_thp} per 2 MiB chunk, {s.fill.layout}): faults THPs in",
        "nohugepage": "MADV_NOHUGEPAGE on the whole region",
        "discard": "MADV_DONTNEED on the selected pages (no longer placed)",
        "register": f"UFFDIO_REGISTER the region ({step.arg}); a handler thread resolves faults",
        "wp": "MADV_POPULATE_READ, then UFFDIO_WRITEPROTECT the selected pages" if step.arg == "1"
              else "UFFDIO_WRITEPROTECT mode 0 (un-protect) the selected pages",
        "clear-soft-dirty": "echo 4 > /proc/self/clear_refs",
        "shrink": "fire the deferred-split shrinker (memcg-scoped reclaim, else drop_caches)" if s.split == "shrinker"
                  else f"split by {s.split}: {SPLIT_TEXT[s.split]}",
        "touch": f"{step.arg} every selected page",
        "verify": "compare every page with its expected content",
        "sabotage-punch": "NEGATIVE CONTROL: MADV_DONTNEED on placed pages (holes on purpose)",
        "sabotage-unprotect": "NEGATIVE CONTROL: un-protect pages behind the model's back",
        "collapse": "MADV_COLLAPSE the selected pages (THPs born from 4 KiB pages)",
        "clear-written": "PAGEMAP_SCAN with PM_SCAN_WP_MATCHING: write-protect every page (uffd WP_ASYNC)",
        "dump": f"read what an incremental dump saves ({step.arg}): every page written since the clear must be in it",
        "sabotage-clean": f"NEGATIVE CONTROL: the selected written pages made to read clean ({step.arg})",
        "sabotage-fill": "NEGATIVE CONTROL: data into zero subpages behind the model's back (THPs not underused)",
        "sabotage-zero": "NEGATIVE CONTROL: data pages zeroed behind the model's back (a misjudged zero detector)",
        "rwp": "MADV_POPULATE_READ, then UFFDIO_RWPROTECT the selected pages (inaccessible: every access faults)"
               if step.arg == "1" else "UFFDIO_RWPROTECT mode 0 (un-protect) the selected pages",
        "set-mode": f"UFFDIO_SET_MODE: {'enable' if step.arg == 'async' else 'disable'} UFFD_FEATURE_RWP_ASYNC",
        "sabotage-unrwp": "NEGATIVE CONTROL: RWP-un-protect pages behind the model's back",
    }[step.op]
    pages = "" if step.pages == "all" else f" [pages: {step.pages}, {int(s.selector(step.pages).sum())}]"
    return what + pages


def _header(s: Scenario, verdict: Verdict | None) -> str:
    knob_text = " ".join(f"{k}={v}" for k, v in knobs(s).items() if v is not None)
    lines = [f"holecheck reproducer: {s.id}", ""]
    if s.kind == "postcopy-style":
        lines += ["QEMU postcopy's destination without QEMU: pages placed during precopy must never turn into",
                  "pte_none holes (a MISSING fault on a placed page is ignored by QEMU: its vCPU stalls for good)."]
    else:
        lines += ["QEMU background snapshot without QEMU: after UFFDIO_WRITEPROTECT every write must raise a WP",
                  "fault, and no uffd-wp bit (pagemap bit 57) may be lost when the shrinker splits underused THPs."]
    lines.append("")
    if verdict is not None:
        lines.append(f"Failed on kernel {verdict.kernel}; holecheck's verdict:")
        lines += ["  " + ln for ln in verdict.failure_message().splitlines()]
        lines.append("(Addresses are the suite's run's; this program also names pages by index from the region start.)")
    else:
        lines.append("Generated from the scenario alone (no verdict given).")
    lines += ["", f"The sequence, on one {s.size_mib} MiB region ({s.npages} pages of 4 KiB):"]
    lines += [f"  {i:2}. {st.phase}: {describe(st, s)}" for i, st in enumerate(s.steps, 1)]
    lines += [
        "",
        f"THP knobs while it runs (/sys/kernel/mm/transparent_hugepage/, restored at exit): {knob_text}",
        f"Split trigger of the shrink steps: {s.split} ({SPLIT_TEXT[s.split]}).",
        f"Shrinker trigger: {s.trigger} (auto: the process moves itself into a fresh memory cgroup before touching",
        "memory and the shrinker is fired with cgroup v2 memory.reclaim or v1 memory.force_empty; no memory",
        "cgroup: drop_caches, host-wide). The cgroup is removed at exit, also on SIGINT/SIGTERM.",
        "",
        f"Build and run as root:  {BUILD} && ./repro [--timeout SECONDS] [--no-lock]",
        "",
        "Output: one line per bad page, '<kind> page <index> (chunk C subpage S, va 0x...) at <step>', kinds:",
        "  hole            a placed page became pte_none (neither present nor swapped)",
        "  missing-fault   a MISSING userfault on a placed page",
        "  no-wp-fault     a write to a write-protected page raised no WP fault",
        "  lost-uffd-wp    the uffd-wp bit of a protected page vanished across a step that must keep it",
        "  lost-soft-dirty the soft-dirty bit vanished across such a step",
        "  content         a page does not hold what was written to it",
        "  stall           a step did not finish within --timeout (a fault was never resolved)",
        "  stale-dump      a page written since the clear reads clean: an incremental dump restores stale data",
        "  lost-data       a sparse data page (one non-zero byte) reads all zero or maps the zero page",
        "  no-rwp-fault    an access to a read-write-protected page (RWP) raised no RWP fault",
        "  extra-rwp-fault an RWP fault on a page not protected, or a second one on a page",
        "  accessed-cold   a page accessed since RWP protection that PAGEMAP_SCAN reports not accessed",
        "  untouched-hot   a protected page not accessed since that PAGEMAP_SCAN reports accessed",
        "Lines starting with '#' are information (page-state counts per step, THPs around each shrink).",
        "Exit status: 0 no bad page, 1 bad pages or a stall, 2 set-up error.",
        "--no-lock: do not take /run/lock/holecheck-thp.lock (the caller holds it; holecheck's tests do).",
        "",
        "Generated by holecheck (suite/reproducer.py); the fault handler below is suite/uffd_helper.c's.",
    ]
    wrapped = []
    for ln in lines:  # long step descriptions and failure messages continue indented
        indent = " " * (len(ln) - len(ln.lstrip()) + 4)
        wrapped += textwrap.wrap(ln, 110, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return "/*\n" + "".join(f" * {_comment(ln)}".rstrip() + "\n" for ln in wrapped) + " */\n"


def _runs_table(name: str, mask: np.ndarray) -> str:
    items = [f"{{{first}, {count}}}" for first, count in runs(mask)] or ["{0, 0}"]
    rows, row = [], "\t"
    for it in items:
        if len(row) + len(it) + 2 > 110:
            rows.append(row.rstrip())
            row = "\t"
        row += it + ", "
    rows.append(row.rstrip())
    return f"static const struct run {_ident(name)}[] = {{\n" + "\n".join(rows) + "\n};\n"


def _tables(s: Scenario, timeout: float) -> str:
    selectors = sorted({st.pages for st in s.steps})
    out = ["/* ---- the scenario (generated from scenario.json) ---- */", "",
           f"static const char SCENARIO[] = {c_string(s.id)};",
           f"#define REGION_SIZE ({s.npages}UL * PAGE)",
           f"static const char TRIGGER[] = {c_string(s.trigger)};",
           f"static const char SPLIT[] = {c_string(s.split)};",
           f"#define FOLIO_KB {s.thp.mthp_kb or 2048}",
           f"#define BACKING_MEMFD {int(s.backing == 'memfd')} /* memory axes: MAP_SHARED memfd region */",
           f"#define SAME_CONTENT {int(s.fill.content == 'same')} /* every data page the same bytes (KSM merges) */",
           f"#define SPARSE_CONTENT {int(s.fill.content == 'sparse')} /* one non-zero byte per data page */",
           f"static const double DEFAULT_TIMEOUT = {timeout!r};", "",
           "/* THP knobs under /sys/kernel/mm/transparent_hugepage/; NULL: left as found */",
           "static const struct knob {", "\tconst char *file, *want;", "} KNOBS[] = {"]
    for file, value in knobs(s).items():
        out.append(f"\t{{{c_string(file)}, {'NULL' if value is None else c_string(value)}}},")
    out += ["};", "", "struct run {", "\tsize_t first, count; /* pages */", "};", ""]
    out += [_runs_table(sel, s.selector(sel)) for sel in selectors]
    partial = split_triggers.partial_mask(nonzero_at_split(s), s.thp.mthp_kb) if s.split == "partial-unmap" else None
    out.append(_runs_table("partial", partial if partial is not None else np.zeros(s.npages, dtype=bool)))
    out += ["enum op {", "\t" + ", ".join("OP_" + op.upper().replace("-", "_") for op in OPS), "};", "",
            "struct step {", "\tenum op op;", "\tconst char *arg, *phase;", "\tconst struct run *runs;",
            "\tsize_t nruns;", "\tint keeps_bits; /* the step must not clear uffd-wp / soft-dirty bits */", "};",
            "#define RUNS(sel) sel, sizeof(sel) / sizeof(sel[0])", "static const struct step STEPS[] = {"]
    for st in s.steps:
        op = "OP_" + st.op.upper().replace("-", "_")
        out.append(f"\t{{{op}, {c_string(st.arg)}, {c_string(st.phase)}, RUNS({_ident(st.pages)}), "
                   f"{int(OPS[st.op])}}},")
    out += ["};", ""]
    return "\n".join(out) + "\n"


def generate(scenario: Scenario, verdict: Verdict | None = None, *, timeout: float = 10.0) -> str:
    """The C source of a standalone reproducer for ``scenario`` (a synthetic kind)."""
    if not scenario.synthetic:
        raise ValueError(f"a C reproducer needs a synthetic scenario, not {scenario.kind!r} (real QEMU)")
    if scenario.npages % PAGES_PER_THP:
        raise ValueError("the region must be a whole number of THPs")
    helper = HELPER_SOURCE.read_text()
    return "".join([
        _header(scenario, verdict), "\n",
        _slice(helper, *PRELUDE), "\n",
        "/* The helper's handler exits when its driver dies; here that exit must still restore the THP knobs. */\n",
        "#define _exit(status) exit(status)\n\n",
        _slice(helper, *HANDLER),
        "#undef _exit\n\n",
        _tables(scenario, timeout),
        RUNTIME.read_text(),
    ])


def from_artifacts(directory: Path) -> str:
    """The reproducer of a failing synthetic cell: its ``scenario.json`` and, if present, ``verdict.json``."""
    scenario = Scenario.from_json((directory / "scenario.json").read_text())
    vpath = directory / "verdict.json"
    verdict = Verdict.from_json(vpath.read_text()) if vpath.exists() else None
    return generate(scenario, verdict)


def write(directory: Path, out: Path | None = None) -> Path:
    out = out or directory / "repro.c"
    out.write_text(from_artifacts(directory))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suite.reports.reproducer", description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a cell's artifacts directory, or a scenario.json")
    p.add_argument("-o", "--out", type=Path, help="output file (default: repro.c in the artifacts directory)")
    a = p.parse_args(argv)
    try:
        if a.source.is_dir():
            path = write(a.source, a.out)
        else:
            text = generate(Scenario.from_json(a.source.read_text()))
            path = a.out or a.source.with_name("repro.c")
            path.write_text(text)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"reproducer: {exc}", file=sys.stderr)
        return 2
    print(f"{path}\nbuild: {BUILD.replace('repro.c', str(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
