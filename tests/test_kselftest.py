"""The kselftest of a finding, generated, compiled against a kernel tree's selftest headers and run on the kernel
under test (the host, or an L1 VM through its agent): it fails where the finding shows and passes where it does
not. Where it shows is measured, not looked up: ``ksm_merge_keeps_uffd_wp`` (suite/targets/ksm_probe.py) merges
two write-protected duplicate pages on the same kernel. And upstream's own mm selftests of the touched code
(``ksm_functional_tests``, ``uffd-unit-tests``), built from the same tree, pass on the kernel under test."""
from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_reproducer import BAD_LINE

from kernels import config_check
from suite import known_findings, thp
from suite.reports import kselftest
from suite.targets.base import Target
from suite.targets.program import Ran

KSM_FINDING = "ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty"
TAP_RESULT = re.compile(r"^(?P<ok>ok|not ok) 1 (?P<name>\S+)")
TOTALS = re.compile(r"^# Totals: pass:(?P<pass>\d+) fail:(?P<fail>\d+) xfail:\d+ xpass:\d+ skip:(?P<skip>\d+) "
                    r"error:(?P<error>\d+)", re.M)
RUN_TIMEOUT = 900.0
STEP_TIMEOUT = 120.0
UPSTREAM_TIMEOUT = 1800.0  # uffd-unit-tests under TCG
CONFIG_KEYS = ("KSM", "USERFAULTFD", "PTE_MARKER_UFFD_WP", "MEM_SOFT_DIRTY", "TRANSPARENT_HUGEPAGE")
SOURCE_SERIES = "7.3"  # the tree the kselftest compiles against, and the upstream tests come from

# Upstream test results a kernel's config decides, not the code under test: (test, its failure text) → the option
# that makes it fail. Debian sets PROC_MEM_FORCE_PTRACE: only a ptracer may write a PROT_NONE page through
# /proc/self/mem, so test_prot_none's own write fails before KSM is involved.
CONFIG_FAILURES = {("ksm_functional_tests", "ptrace write failed"): "PROC_MEM_FORCE_PTRACE"}

needs_cc = pytest.mark.skipif(not shutil.which("cc") or not shutil.which("make"), reason="needs cc and make")


@pytest.fixture(scope="module")
def tree():
    """Debian's linux-source 7.3 with its uapi headers made (fetched and made once into the cache)."""
    from kernels import selftests

    return selftests.selftest_tree(SOURCE_SERIES)


def compiled(tree, directory: Path, name: str = KSM_FINDING) -> Path:
    source = directory / f"{name}.c"
    source.write_text(kselftest.for_finding(name))
    binary = directory / name
    warnings = kselftest.compile_in_tree(source, binary, tree.tree, tree.headers)
    assert not warnings, warnings
    return binary


def record_kernel(target: Target, record_property) -> None:
    """The kernel a result is about, for the upstream report: its release and the config options that matter."""
    record_property("kernel", target.kernel_release)
    config = getattr(getattr(target, "kernel", None), "config", None) or {}
    if not config and (gz := Path("/proc/config.gz")).exists():
        config = config_check.parse(gzip.decompress(gz.read_bytes()).decode())
    record_property("kernel_config", " ".join(f"{k}={config.get(k, 'n')}" for k in CONFIG_KEYS)
                    if config else "unknown (no config beside the image, no /proc/config.gz)")


def run_on(target: Target, argv: list[str], timeout: float) -> Ran:
    """On the host under the THP knob lock (the program is told the caller holds it), in an L1 VM as is."""
    if target.spec.kind != "host":
        return target.execute(argv, timeout)
    with thp.exclusive():
        return target.execute([*argv, "--no-lock"] if "--no-lock" not in argv else argv, timeout)


# --- the generated source -------------------------------------------------------------------------------------------

def test_kselftest_of_the_ksm_finding_is_the_reproducer_under_a_kselftest_main():
    text = kselftest.for_finding(KSM_FINDING)
    assert text.startswith("// SPDX-License-Identifier: GPL-2.0\n")
    assert '#include "kselftest.h"' in text and "ksft_set_plan(1);" in text
    assert f'static const char TEST_NAME[] = "{KSM_FINDING}";' in text
    assert "#define NEEDS_KSM 1" in text and "#define NEEDS_UFFD_WP 1" in text and "#define NEEDS_SOFT_DIRTY 0" in text
    assert "static int repro_main(int argc, char **argv)" in text and text.count("int main(int argc") == 1
    assert "static void *handler(void *arg)" in text  # the suite helper's own fault handler, via the reproducer
    assert '#define SAME_CONTENT 1' in text and 'static const char SPLIT[] = "ksm";' in text
    known = next(k for k in known_findings.KNOWN if k.name == KSM_FINDING)
    assert known.scenario.search(kselftest.FINDINGS[KSM_FINDING]().id)


def test_every_kselftest_scenario_is_a_known_findings_cell():
    for name, make in kselftest.FINDINGS.items():
        known = next((k for k in known_findings.KNOWN if k.name == name), None)
        assert known is not None, f"{name}: not a known finding"
        assert known.scenario.search(make().id), f"{name}: {make().id} is not one of its cells"


def test_unknown_finding_and_artifacts_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert kselftest.main(["no-such-finding"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kselftest: no scenario for finding 'no-such-finding'") and KSM_FINDING in err
    (tmp_path / "scenario.json").write_text(kselftest.FINDINGS[KSM_FINDING]().to_json())
    assert kselftest.main([str(tmp_path)]) == 0
    assert 'static const char TEST_NAME[] = "snapshot-style-shrink@after-protect-mpn409-spread8-same-by-ksm";' \
        in (tmp_path / "kselftest.c").read_text()


@needs_cc
def test_compiles_against_the_trees_selftest_headers_without_a_warning(tree, tmp_path: Path):
    """-Wall -I tools/testing/selftests -I usr/include of Debian's 7.3 tree: the kselftest.h and uapi headers a
    selftest in tools/testing/selftests/mm builds with."""
    binary = compiled(tree, tmp_path)
    assert os.access(binary, os.X_OK)
    cmd = kselftest.compile_command(tmp_path / "x.c", binary, tree.tree, tree.headers)
    assert ["-I", str(tree.tree / "tools/testing/selftests")] == cmd[4:6] and "-Wall" in cmd


# --- on the kernel under test ---------------------------------------------------------------------------------------

@pytest.mark.host
@needs_cc
def test_ksm_kselftest_fails_exactly_where_the_merge_drops_the_bit(target: Target, kernel_features, tree,
                                                                  artifacts: Path, record_property):
    """Fails (255 pages lost their uffd-wp bit, the write to each went through untrapped) where the probe measures
    that a KSM merge drops the bit; passes, with no bad page, where it keeps it (the fixed kernel)."""
    keeps = kernel_features["ksm_merge_keeps_uffd_wp"]
    record_kernel(target, record_property)
    record_property("ksm_merge_keeps_uffd_wp", keeps)
    # per-step bound of the replay: 16,128 WP faults of one step take over 30 s under TCG
    out = run_on(target, [str(compiled(tree, artifacts)), "--timeout", str(STEP_TIMEOUT)], RUN_TIMEOUT)
    (artifacts / "kselftest.out").write_text(out.stdout + out.stderr)
    record_property("kselftest_rc", out.rc)
    record_property("kselftest_seconds", out.seconds)
    lines = out.stdout.splitlines()
    results = [m for m in map(TAP_RESULT.match, lines) if m]
    assert lines[:2] == ["TAP version 13", "1..1"] and len(results) == 1, out.stdout + out.stderr
    assert results[0]["name"] == KSM_FINDING
    record_property("kselftest_tap", results[0].group(0))
    bad = [(m["kind"], int(m["page"]), m["phase"]) for m in (BAD_LINE.match(ln[2:]) for ln in lines
                                                             if ln.startswith("# ")) if m]
    if keeps:
        assert (out.rc, results[0]["ok"], bad) == (0, "ok", []), out.stdout + out.stderr
        assert "# verdict: no bad page" in out.stdout
        return
    assert (out.rc, results[0]["ok"]) == (1, "not ok"), out.stdout + out.stderr
    data = set(np.nonzero(kselftest.FINDINGS[KSM_FINDING]().selector("data"))[0].tolist())
    lost = [p for k, p, _ in bad if k == "lost-uffd-wp"]
    untrapped = [p for k, p, ph in bad if k == "no-wp-fault" and ph == "touch(write, data)"]
    assert lost and set(lost) <= data and untrapped == lost, out.stdout
    assert {k for k, _, _ in bad} <= {"lost-uffd-wp", "no-wp-fault"}, out.stdout
    record_property("lost_uffd_wp", len(lost))


@pytest.mark.host
def test_ksm_probe_measures_a_merge_on_the_host(target: Target):
    """The feature is a measurement: on the host the two duplicates merge and one of them loses the bit (the page
    write_protect_page() keeps as the KSM page keeps it), never an 'unmeasurable' False."""
    if target.spec.kind != "host":
        pytest.skip("the probe runs in the target's own process: its reason is read here on the host only")
    from suite.targets import ksm_probe

    kept, how = ksm_probe.measure()
    assert kept is not None, f"the probe could not measure: {how}"
    assert how in ("merged: 2 of 2 pages kept uffd-wp", "merged: 1 of 2 pages kept uffd-wp"), how
    assert kept == (how == "merged: 2 of 2 pages kept uffd-wp")


@pytest.mark.host
@needs_cc
@pytest.mark.parametrize("name", ["ksm_functional_tests", "uffd-unit-tests"])
def test_upstream_mm_selftest_passes(target: Target, tree, name: str, artifacts: Path, record_property):
    """Upstream's own tests of the code a candidate fix touches, built from the same tree with its Makefile."""
    if target.spec.kind == "host":
        pytest.skip(f"{name} changes host-wide KSM / hugetlb / THP state that other runs share: it runs in an L1 "
                    "VM (--kernel=debian:… or patched:…)")
    from kernels import selftests

    record_kernel(target, record_property)
    binary = selftests.mm_selftests(tree)[name]
    out = target.execute([f"./{name}"], UPSTREAM_TIMEOUT, cwd=str(binary.parent))  # execs itself as ./NAME
    (artifacts / f"{name}.out").write_text(out.stdout + out.stderr)
    totals = TOTALS.search(out.stdout)
    record_property(f"{name}_seconds", out.seconds)
    assert totals, f"{name} printed no TAP totals (exit {out.rc}):\n{out.stdout[-3000:]}{out.stderr[-2000:]}"
    record_property(f"{name}_totals", totals.group(0))
    failed = [ln for ln in out.stdout.splitlines() if ln.startswith("not ok")]
    config = getattr(getattr(target, "kernel", None), "config", None) or {}
    unexplained = [ln for ln in failed if not any(
        why in ln and config.get(option) == "y" for (test, why), option in CONFIG_FAILURES.items() if test == name)]
    record_property(f"{name}_failed", "; ".join(failed))
    assert not unexplained and int(totals["error"]) == 0, f"{name}: {totals.group(0)} (exit {out.rc})\n" + \
        "\n".join(unexplained)
