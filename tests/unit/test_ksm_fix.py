"""Pure parts of the finding-to-fix path (issue 22): patch series, ``patched:`` kernel specs, the agent's ``exec``,
and the upstream report read from a constructed JUnit file (no kernel, no VM)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kernels import build, linux_source
from suite.errors import SetupError, StallError
from suite.kernelspec import KernelSpec, parse
from suite.reports import upstream
from suite.targets.agent import handle
from suite.targets.program import Ran, execute

FINDING = "ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty"


def test_the_ksm_series_is_one_kernel_style_patch_against_mm_ksm():
    patches = build.series("ksm-keep-uffd-wp")
    assert [p.name for p in patches] == ["0001-mm-ksm-keep-uffd-and-soft-dirty-bits-when-merging.patch"]
    text = patches[0].read_text()
    assert linux_source.patch_files(text) == ["mm/ksm.c"]
    head = text.split("\n---\n", 1)[0]
    assert "\nSubject: [PATCH] mm/ksm: " in head and "\nFixes: 292924b26024 (" in head
    assert "\nSigned-off-by: " in head and "Against Debian's linux-source-7.3 (7.3.4-1~bpo13+1" in text
    assert "+	if (pte_uffd(orig_pte)) {" in text and "+		newpte = pte_mksoft_dirty(newpte);" in text


def test_series_names_are_checked():
    with pytest.raises(SetupError, match=r"no patch series '\.\./patches' .*have: .*ksm-keep-uffd-wp"):
        build.series("../patches")
    with pytest.raises(SetupError, match="no patch series 'nope'"):
        build.series("nope")


def test_source_versions_and_packages():
    assert linux_source.package_of("7.3.4-1~bpo13+1") == "linux-source-7.3"
    assert linux_source.package_of("6.12.95-1~bpo12+1") == "linux-source-6.12"
    assert linux_source.source_version("7.3.4-1~bpo13+1") == "7.3.4-1~bpo13+1"  # a Debian version: no apt
    with pytest.raises(SetupError, match="not a source version"):
        linux_source.source_version("seven")
    with pytest.raises(SetupError, match=r"no Debian source series '5\.10'"):
        linux_source.source_version("5.10")


def test_series_text_concatenates_in_order(tmp_path: Path):
    a, b = tmp_path / "0001.patch", tmp_path / "0002.patch"
    a.write_text("A\n")
    b.write_text("B\n")
    assert linux_source.series_text([a, b]) == "A\nB\n"


def test_patched_kernel_spec():
    spec = parse("patched:7.3.4:ksm-keep-uffd-wp")
    assert spec == KernelSpec("patched", "7.3.4:ksm-keep-uffd-wp")
    assert spec.id == "patched-7.3.4-ksm-keep-uffd-wp" and str(spec) == "patched:7.3.4:ksm-keep-uffd-wp"
    for bad in ("patched:7.3.4", "patched::x", "patched:"):
        with pytest.raises(SetupError, match="want patched:VERSION:SERIES"):
            parse(bad)


def test_execute_returns_status_and_output_and_bounds_the_run():
    ran = execute([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 30)
    assert (ran.rc, ran.stdout, ran.stderr) == (3, "out\n", "err\n") and ran.seconds >= 0
    assert Ran.from_wire(ran.to_wire()) == ran
    with pytest.raises(StallError, match=r"not finished within 0\.5 s \(stopped\); last output: tick"):
        execute([sys.executable, "-uc", "import time; print('tick'); time.sleep(60)"], 0.5)


def test_agent_exec_method():
    reply = handle({"method": "exec", "argv": ["/bin/sh", "-c", "echo $0", "hi"], "seconds": 30})
    assert reply["rc"] == 0 and reply["stdout"] == "hi\n" and list(reply["argv"]) == ["/bin/sh", "-c", "echo $0", "hi"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_kselftest" name="test_ksm_kselftest_fails_exactly_where_the_merge_drops_the_bit"
 time="42.5"><properties><property name="kernel" value="7.3.4-holecheck-ksm-keep-uffd-wp"/>
<property name="kernel_config" value="KSM=y USERFAULTFD=y"/><property name="kselftest_rc" value="0"/></properties>
</testcase>
<testcase classname="tests.test_triggers" name="test_trigger[wp-same-ksm-pmd]" time="20.0">
<properties><property name="kernel" value="7.3.4-holecheck-ksm-keep-uffd-wp"/></properties></testcase>
<testcase classname="tests.test_triggers" name="test_trigger[wp-pageout-pmd]" time="10.0">
<skipped message="no"/></testcase>
</testsuite></testsuites>"""


def test_upstream_report_claims_only_what_the_results_hold(tmp_path: Path):
    junit = tmp_path / "patched.xml"
    junit.write_text(JUNIT)
    text = upstream.report(FINDING, [upstream.load(str(junit))])
    assert text.startswith("Subject: [BUG] KSM's merge (replace_page) drops the uffd-wp and soft-dirty bits")
    assert "* 7.3.4-holecheck-ksm-keep-uffd-wp  [patched.xml]\n  config: KSM=y USERFAULTFD=y\n" in text
    assert "  PASSED  test_ksm_kselftest_fails_exactly_where_the_merge_drops_the_bit\n  (42s; exit 0)" in text
    assert "  PASSED  test_trigger[wp-same-ksm-pmd] (20s)" in text
    assert "other tests of the session: 1 skipped" in text and "3 tests, 1.2 min of test time" in text
    assert "+	if (pte_uffd(orig_pte)) {" in text  # the candidate patch, whole
    empty = upstream.report(FINDING, [])
    assert "No result files given (--results): this report claims no result of its own." in empty


def test_upstream_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert upstream.main(["no-such"]) == 2
    assert capsys.readouterr().err.startswith("upstream: ")
    assert upstream.main([FINDING, "--attach", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0001-mm-ksm-keep-uffd-and-soft-dirty-bits-when-merging.patch", f"{FINDING}-repro.c", f"{FINDING}.c"]
