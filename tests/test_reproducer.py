"""The standalone C reproducer, generated, built with cc and run for real on the running kernel: it names exactly
the pages the negative control spoils (so it can fail), finds nothing where the suite finds nothing, and leaves
the THP knobs and memory cgroups as found."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from suite import known_findings, memcg, thp
from suite import memory_axes as ma
from suite import scenario as sc
from suite.reports import reproducer
from suite.verdict import Finding, Verdict

BAD_LINE = re.compile(r"^(?P<kind>[a-z-]+) page (?P<page>\d+) \(chunk (?P<chunk>\d+) subpage (?P<sub>\d+), "
                      r"va 0x[0-9a-f]+\) at (?P<phase>.+)$")
SHRINK_LINE = re.compile(r"^# shrink@[^:]+: [^:]+: (?P<before>-?\d+) -> (?P<after>-?\d+) THPs")
MAX_PTES_NONE = thp.KNOBS["max_ptes_none"]

host = pytest.mark.skipif(os.geteuid() != 0 or not thp.SYSFS.exists() or not shutil.which("cc"),
                          reason="needs root, transparent hugepages and a C compiler")


@dataclass
class Outcome:
    rc: int
    bad: list[tuple[str, int, str]]  # (kind, page index, phase) per bad-page line
    stdout: str
    stderr: str

    def pages(self, kind: str | None = None, phase: str | None = None) -> list[int]:
        return [p for k, p, ph in self.bad if (kind is None or k == kind) and (phase is None or ph == phase)]


def build(tmp_path: Path, scenario: sc.Scenario) -> Path:
    src = tmp_path / "repro.c"
    src.write_text(reproducer.generate(scenario))
    binary = tmp_path / "repro"
    proc = subprocess.run(["cc", "-O2", "-pthread", "-Wall", "-Wextra", str(src), "-o", str(binary)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    return binary


def run(binary: Path) -> Outcome:
    """Run under the host-wide knob lock (the reproducer is told the caller holds it); the knobs and cgroups must
    be as found afterwards."""
    with thp.exclusive():
        knobs, mpn = thp.current(), MAX_PTES_NONE.read_text()
        proc = subprocess.Popen([str(binary), "--no-lock"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert MAX_PTES_NONE.read_text() == mpn, "the reproducer left khugepaged/max_ptes_none changed"
        assert thp.current() == knobs
    assert not [p for p in memcg.leftovers() if f"repro-{proc.pid}-" in p.name], "its memory cgroup is left"
    bad = [(m["kind"], int(m["page"]), m["phase"]) for m in map(BAD_LINE.match, stdout.splitlines()) if m]
    return Outcome(proc.returncode, bad, stdout, stderr)


def test_header_says_what_where_and_how():
    scenario = sc.postcopy_style("after-discard", "after-place", sabotage=True)
    verdict = Verdict(scenario="postcopy-style[register@after-discard-shrink@after-place-mpn409-spread8]",
                      kernel="6.18.44-test", findings=[Finding.of("hole", "sabotage-punch(sabotage)", [0x7f0000])])
    text = reproducer.generate(scenario, verdict)
    header = text[: text.index("*/")]
    assert "Failed on kernel 6.18.44-test" in header and "5 placed pages" not in header
    assert "[sabotage-punch(sabotage)] 1 placed pages became pte_none holes" in header
    assert reproducer.BUILD in header and "max_ptes_none=409" in header
    assert all(f". {st.phase}: " in header for st in scenario.steps)
    assert "static void *handler(void *arg)" in text  # the suite helper's own fault handler
    with pytest.raises(ValueError, match="synthetic"):
        reproducer.generate(sc.postcopy("completed"))


def test_split_trigger_and_folio_size_are_in_the_generated_source():
    scenario = replace(sc.snapshot_style("after-protect", thp=thp.ThpSettings(mthp_kb=64)), split="ksm-zero")
    text = reproducer.generate(scenario)
    assert 'static const char SPLIT[] = "ksm-zero";' in text and "#define FOLIO_KB 64" in text
    assert '{"hugepages-64kB/enabled", "always"},' in text and '{"hugepages-2048kB/enabled", "never"},' in text
    assert '{"../ksm/use_zero_pages", "1"},' in text and '{"../ksm/run", "0"},' in text
    assert "Split trigger of the shrink steps: ksm-zero" in text[: text.index("*/")]
    partial = reproducer.generate(replace(sc.snapshot_style("after-protect"), split="partial-unmap"))
    assert "static const struct run SEL_partial[] = {\n\t{511, 1}, {1023, 1}," in partial


def test_written_from_a_failing_cells_artifacts(tmp_path: Path):
    scenario = sc.snapshot_style("after-protect", sabotage=True)
    (tmp_path / "scenario.json").write_text(scenario.to_json())
    (tmp_path / "verdict.json").write_text(Verdict(scenario="s", kernel="6.1.0-56-amd64").to_json())
    out = reproducer.write(tmp_path)
    assert out == tmp_path / "repro.c" and "Failed on kernel 6.1.0-56-amd64" in out.read_text()
    assert reproducer.main([str(tmp_path), "-o", str(tmp_path / "x.c")]) == 0 and (tmp_path / "x.c").exists()


@pytest.mark.host
@host
def test_snapshot_style_reproducer_finds_nothing_and_splits(tmp_path: Path):
    out = run(build(tmp_path, sc.snapshot_style("after-protect")))
    assert (out.rc, out.bad) == (0, []), out.stdout + out.stderr
    assert "# verdict: no bad page" in out.stdout
    shrinks = [m for m in map(SHRINK_LINE.match, out.stdout.splitlines()) if m]
    assert len(shrinks) == 1, out.stdout
    if "shrink_underused" in thp.current():  # the kernel has the underused shrinker; mpn409 lets it split
        assert int(shrinks[0]["after"]) < int(shrinks[0]["before"]), out.stdout


@pytest.mark.host
@host
def test_sabotaged_postcopy_reproducer_names_exactly_the_punched_pages(tmp_path: Path):
    scenario = sc.postcopy_style("after-discard", "after-place", sabotage=True)
    punched = np.nonzero(scenario.selector("sabotage"))[0].tolist()
    assert len(punched) == 5
    out = run(build(tmp_path, scenario))
    assert out.rc == 1, out.stdout + out.stderr
    assert sorted(set(out.pages())) == punched, out.stdout
    assert out.pages("hole") == out.pages("hole", "sabotage-punch(sabotage)") == punched
    assert out.pages("missing-fault") == out.pages("missing-fault", "touch(read)") == punched
    assert {k for k, _, _ in out.bad} <= {"hole", "missing-fault", "lost-soft-dirty"}  # DONTNEED clears soft-dirty
    assert f"# verdict: {len(out.bad)} bad page report(s)" in out.stdout


SPLIT_LINE = re.compile(r"^# shrink@[^:]+: (?P<how>[^:]+): .*thp_split_page \+(?P<split>\d+)"
                        r"(, hugepages-\d+kB/stats/split \+(?P<size>\d+))?")
# pageout-swap: the suite sets swap up only inside L1 VMs; the reproducer's MADV_PAGEOUT uses whatever swap is on
SPLIT_CELLS = ([(split, thp.ThpSettings()) for split in sc.SPLITS if split != "pageout-swap"]
               + [("pageout", thp.ThpSettings(mthp_kb=64)), ("partial-unmap", thp.ThpSettings(mthp_kb=64))])
# memory axes (issue 11): the reproducer of each new sequence's negative control names exactly the sabotaged pages
MEMORY_CONTROLS = {
    "criu-written": (lambda: ma.criu_style("written", sabotage=True), "stale-dump", "dump(written)"),
    "wp-async": (lambda: ma.wp_feature_style("async", "after-protect", sabotage=True), "stale-dump",
                 "dump(written)"),
    "memfd-postcopy": (lambda: ma.with_memory(sc.postcopy_style("after-discard", "after-place", sabotage=True),
                                              backing="memfd"), "missing-fault", "touch(read)"),
    "memfd-minor": (lambda: ma.minor_style("after-zap", sabotage=True), "content", "verify"),
}
# the content axis: sparse data pages zeroed before each split are lost-data (at the split or at the verify)
LOST_DATA_SPLITS = ("shrinker", "pageout", "debugfs")


@pytest.mark.host
@host
@pytest.mark.parametrize(("split", "settings"), SPLIT_CELLS, ids=[f"{s}-{t.id}" for s, t in SPLIT_CELLS])
def test_split_trigger_reproducer_names_the_unprotected_pages(tmp_path: Path, split: str, settings: thp.ThpSettings):
    """Every split trigger replays in C: it splits (or says it cannot), and a sabotaged run names exactly the
    pages un-protected behind its back, at the write that went through."""
    scenario = replace(sc.snapshot_style("after-protect", sabotage=True, thp=settings), split=split)
    out = run(build(tmp_path, scenario))
    lines = [m for m in map(SPLIT_LINE.match, out.stdout.splitlines()) if m]
    assert len(lines) == 1, out.stdout + out.stderr
    counted = int(lines[0]["size"] or 0) if settings.mthp_kb else int(lines[0]["split"])
    assert counted > 0 or "CANNOT SPLIT" in lines[0]["how"], out.stdout
    sabotaged = np.nonzero(scenario.selector("sabotage"))[0].tolist()
    assert out.rc == 1 and out.pages("no-wp-fault") == out.pages("no-wp-fault", "touch(write, zero)") == sabotaged, \
        out.stdout + out.stderr
    assert {k for k, _, _ in out.bad} <= {"no-wp-fault", "lost-uffd-wp"}, out.stdout


@pytest.mark.host
@host
@pytest.mark.parametrize("control", MEMORY_CONTROLS)
def test_memory_axes_reproducer_names_the_sabotaged_pages(tmp_path: Path, control: str):
    build_scenario, kind, phase = MEMORY_CONTROLS[control]
    scenario = build_scenario()
    out = run(build(tmp_path, scenario))
    assert out.rc == 1, out.stdout + out.stderr
    assert out.pages() == out.pages(kind, phase) == np.nonzero(scenario.selector("sabotage"))[0].tolist(), out.stdout


@pytest.mark.host
@host
@pytest.mark.parametrize("split", LOST_DATA_SPLITS)
def test_sparse_reproducer_names_the_zeroed_data_pages(tmp_path: Path, split: str):
    """A sparse cell replays in C (the helper's sparse bytes and verify, copied): a clean run finds nothing, and
    data pages zeroed behind its back are named exactly as lost-data, once each."""
    clean = replace(sc.postcopy_style("after-discard", "after-place", fill=sc.Fill(content="sparse")), split=split)
    out = run(build(tmp_path, clean))
    assert "#define SPARSE_CONTENT 1" in (tmp_path / "repro.c").read_text()
    assert (out.rc, out.bad) == (0, []), out.stdout + out.stderr
    scenario = ma.lost_data_control(split)
    out = run(build(tmp_path, scenario))
    zeroed = np.nonzero(scenario.selector("sabotage-data"))[0].tolist()
    assert out.rc == 1 and sorted(out.pages()) == sorted(out.pages("lost-data")) == zeroed, out.stdout + out.stderr
    assert {ph for _, _, ph in out.bad} <= {"shrink@after-place", "verify"}, out.stdout


@pytest.mark.host
@host
def test_ksm_duplicates_reproducer_shows_the_known_finding(tmp_path: Path):
    """A known finding in C, for a bug report (``ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty``):
    write-protected duplicate data pages, split and merged by ksmd, lose their uffd-wp bit and the writes to them
    go through untrapped. Strict: where it no longer shows, it is fixed and this test (and the entry) must go."""
    scenario = replace(sc.snapshot_style("after-protect", fill=sc.Fill(content="same")), split="ksm")
    known = next(k for k in known_findings.KNOWN if k.name.startswith("ksm-merge-of-duplicates"))
    assert known.scenario.search(scenario.id), scenario.id
    binary = build(tmp_path, scenario)
    assert "#define SAME_CONTENT 1" in (tmp_path / "repro.c").read_text()
    out = run(binary)
    data = set(np.nonzero(scenario.selector("data"))[0].tolist())
    lost, untrapped = out.pages("lost-uffd-wp"), out.pages("no-wp-fault", "touch(write, data)")
    assert out.rc == 1 and lost, f"{known.name} did not show: fixed? then drop it\n{out.stdout}{out.stderr}"
    assert set(lost) <= data and untrapped == lost, out.stdout
    assert {k for k, _, _ in out.bad} <= {"lost-uffd-wp", "no-wp-fault"}, out.stdout


@pytest.mark.host
@host
def test_rwp_reproducer_builds_and_says_when_the_kernel_lacks_rwp(tmp_path: Path):
    """RWP (Linux 7.3) cells replay in C too (every mode, the negative controls): each builds warning-free; on a
    kernel without RWP the run stops with one line naming UFFDIO_API and the features it asked for (exit 2)."""
    from suite.targets import preflight

    for mode in ma.RWP_MODES:
        (tmp_path / mode).mkdir()
        binary = build(tmp_path / mode, ma.rwp_style(mode, "after-protect", sabotage=mode in ("sync", "async")))
    if preflight.memory_features()["uffd_rwp"]:
        pytest.skip("this kernel has RWP: its reproducer runs like tests/test_rwp.py's cells (see README)")
    out = run(binary)
    assert out.rc == 2 and "UFFDIO_API (features 0x" in out.stderr and not out.bad, out.stdout + out.stderr
