"""Page-map pictures and the run report, on captured data (tests/data/report/): pure code, no kernel."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from suite import pagemap, report
from suite.pagemap import PAGE, PRESENT, ZeroPfns
from suite.reports import outcomes as run_outcomes
from suite.reports import pagemap_png
from suite.verdict import Finding, Verdict

DATA = Path(__file__).parent.parent / "data" / "report"
ARTIFACTS = DATA / "artifacts"
SYNTHETIC = "tests/test_failing_cells.py::test_postcopy_style_sabotaged"
REAL = "tests/test_failing_cells.py::test_postcopy_sabotaged"
SKIPPED = "tests/test_synthetic.py::test_snapshot_style_soft_dirty[mpn409]"
NO_SPLIT = "tests/test_synthetic.py::test_postcopy_style[register@after-place-shrink@after-nohugepage-mpn511]"


def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader for what encode_png writes: checks every CRC, returns the (H, W, 3) pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any(), "every row uses filter 0"
    return rows[:, 1:].reshape(h, w, 3)


def states(npages: int, holes: list[int], start: int = 0x7F0000000000) -> pagemap.PageStates:
    raw = np.full(npages, (1 << PRESENT) | 42, dtype=np.uint64)  # present, own frame 42
    raw[holes] = 0
    return pagemap.decode(raw, start, ZeroPfns(small=7))


def test_png_round_trips_through_zlib():
    rgb = np.random.default_rng(1).integers(0, 256, size=(13, 37, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(pagemap_png.encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        pagemap_png.encode_png(rgb.astype(np.int32))


def test_map_puts_each_page_and_finding_at_its_pixel():
    st = states(1024, holes=[5, 700])
    hole = Finding.of("hole", "shrink", [st.address(700)])
    mk = pagemap_png.marks(st, [hole])
    img = pagemap_png.render_map(st, mk, px_per_page=2)
    assert img.shape == (2 * pagemap_png.BAND, 1024, 3)
    color = {k: np.array(c, dtype=np.uint8) for k, (c, _) in pagemap_png.STATES.items()}
    red = np.array(pagemap_png.OVERLAYS["hole"][0], dtype=np.uint8)
    state_row = lambda chunk: chunk * pagemap_png.BAND + 3  # noqa: E731 - wp strip 1 + finding strip 2
    assert (img[state_row(0), 10:12] == color["hole"]).all()  # page 5, 2 px wide
    assert (img[state_row(0), 12] == color["data"]).all()
    assert (img[state_row(1), (700 - 512) * 2] == color["hole"]).all()
    assert (img[pagemap_png.BAND + 1, (700 - 512) * 2] == red).all()  # finding strip of chunk 1
    assert not (img[1, :] == red).all(axis=1).any(), "page 5 is a hole but no finding names it"
    assert mk.kinds == ("hole",)


def test_findings_mark_only_their_side_and_address_space():
    st = states(1024, holes=[])
    dst_hole = Finding.of("hole", "p", [3 * PAGE], space="gpa", detail="dst RAM")
    stall = Finding.of("stall", "p", [4 * PAGE], space="gpa", detail="qtest read of gpa 0x4000 got no answer")
    assert pagemap_png.marks(st, [dst_hole, stall], side="src").code.nonzero()[0].tolist() == [4]
    dst = pagemap_png.marks(st, [dst_hole, stall], side="dst")
    assert dst.code.nonzero()[0].tolist() == [3, 4] and dst.kinds == ("hole", "stall")
    assert pagemap_png.side_of("x/pagemap-dst-last.npz") == "dst" and pagemap_png.side_of("pagemap-last.npz") == ""


def test_font_covers_every_legend_and_label_character():
    texts = [t for _, t in pagemap_png.LEGEND_HTML.values()] + ["0123456789M: 0x7f pages", "uffd-wp (named)"]
    missing = {c for t in texts for c in t.upper() if c not in pagemap_png.FONT and c != "…"}
    assert not missing
    assert pagemap_png.text_mask("AB").shape == (7, 12)


def test_captured_snapshot_renders_with_its_verdict(tmp_path: Path):
    cell = ARTIFACTS / "tests_test_failing_cells.py_test_postcopy_style_sabotaged"
    verdict = Verdict.from_json((cell / "verdict.json").read_text())
    png = pagemap_png.render_file(cell / "pagemap-last.npz", tmp_path / "m.png", verdict)
    img = decode_png(png.read_bytes())
    assert img.shape[0] > 32 * pagemap_png.BAND and img.shape[1] > 512
    red = np.array(pagemap_png.OVERLAYS["hole"][0], dtype=np.uint8)
    assert (img == red).all(axis=2).sum() >= 5 * 2  # five punched pages, 2 px strip each (+ gutter boxes)


def test_junit_cases_map_to_their_artifacts():
    outcomes = {o.nodeid: o for o in run_outcomes.parse_junit(DATA / "junit.xml", ARTIFACTS)}
    assert len(outcomes) == 6
    assert outcomes[SYNTHETIC].status == "failed" and outcomes[REAL].status == "failed"
    assert outcomes[SKIPPED].status == "skipped" and "CONFIG_MEM_SOFT_DIRTY" in outcomes[SKIPPED].message
    # the full failure text (the message attribute is cut after a few lines)
    assert "[read-received] 6 received pages a reader stalls on" in outcomes[REAL].message
    assert outcomes[REAL].properties == {"kernel": "6.18.44-fc-v782", "split_expected": "True", "stall": "6",
                                         "hole": "6"}


def test_cells_carry_kernel_qemu_counts_and_splits():
    cells = {c.nodeid: c for c in run_outcomes.collect(ARTIFACTS, [DATA / "junit.xml"])}
    real, syn = cells[REAL], cells[SYNTHETIC]
    assert (real.kernel, real.qemu, real.counts) == ("6.18.44-fc-v782", "7.2.22", {"hole": 6, "stall": 6})
    assert real.splits == "src shrink@postcopy-running: 128→1; dst shrink@postcopy-running: 127→0"
    assert syn.synthetic and not real.synthetic and syn.counts == {"hole": 5, "missing-fault": 5}
    assert "max_ptes_none is 511" in cells[NO_SPLIT].no_split_reason
    skipped = cells[SKIPPED]
    assert skipped.verdict is None and skipped.kernel == "6.18.44-fc-v782"  # the run's only kernel


def test_report_from_a_captured_run(tmp_path: Path):
    index = report.write(tmp_path, ARTIFACTS, [DATA / "junit.xml"], title="captured run")
    md = (tmp_path / "summary.md").read_text()
    assert "6 tests: 2 failed, 3 passed, 1 skipped" in md
    assert "| `postcopy-style[register@after-discard-shrink@after-place-mpn409-spread8]` | **failed** (holes 5, " \
           "missing 5)" in md
    assert "6.18.44-fc-v782 · QEMU 7.2.22" in md and "**failed** (holes 6, stalls 6)" in md
    page = index.read_text()
    imgs = re.findall(r"<img class='map' src='([^']+)'", page)
    assert len(imgs) == 2 and all((tmp_path / src).is_file() for src in imgs)
    links = re.findall(r"<a href='([^'#]+)'", page)
    assert any(src.endswith("qmp-dst.txt") for src in links) and all((tmp_path / src).exists() for src in links)
    repro = tmp_path / "repro" / "tests_test_failing_cells.py_test_postcopy_style_sabotaged.c"
    assert repro.is_file() and "Failed on kernel 6.18.44-fc-v782" in repro.read_text()
    assert not (tmp_path / "repro" / "tests_test_failing_cells.py_test_postcopy_sabotaged.c").exists()  # real QEMU


def test_without_junit_every_verdict_is_a_cell(tmp_path: Path):
    cells = run_outcomes.collect(ARTIFACTS)
    assert sorted(c.status for c in cells) == ["failed", "failed", "passed", "passed"]
    assert report.main(["--artifacts", str(ARTIFACTS), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").is_file() and (tmp_path / "summary.md").is_file()


def _report(nodeid: str, when: str, outcome: str, longrepr: object = None, **kw: object) -> pytest.TestReport:
    return pytest.TestReport(nodeid, ("x.py", 1, "x"), {}, outcome, longrepr, when, duration=0.5, **kw)


def test_session_plugin_reports_what_pytest_reported(tmp_path: Path):
    plugin = report.SessionPlugin(tmp_path, ARTIFACTS)
    for r in [
        _report(SYNTHETIC, "setup", "passed"),
        _report(SYNTHETIC, "call", "failed", "postcopy-style[…] on kernel 6.18.44-fc-v782\n  [sabotage…] 5 holes",
                user_properties=[("hole", 5), ("kernel", "6.18.44-fc-v782")]),
        _report(SYNTHETIC, "teardown", "passed"),
        _report(SKIPPED, "setup", "skipped", ("x.py", 66, "Skipped: kernel lacks CONFIG_MEM_SOFT_DIRTY")),
        _report("tests/test_x.py::test_setup_error", "setup", "failed", "RuntimeError: setup exploded"),
    ]:
        plugin.pytest_runtest_logreport(r)
    o = plugin.outcomes
    assert (o[SYNTHETIC].status, o[SYNTHETIC].seconds, o[SYNTHETIC].properties["hole"]) == ("failed", 1.5, "5")
    assert (o[SKIPPED].status, o[SKIPPED].message) == ("skipped", "kernel lacks CONFIG_MEM_SOFT_DIRTY")
    assert o["tests/test_x.py::test_setup_error"].status == "error"
    plugin.pytest_sessionfinish(None)  # type: ignore[arg-type]
    assert plugin.index == tmp_path / "index.html" and not plugin.error
    md = (tmp_path / "summary.md").read_text()
    assert "3 tests: 1 failed, 1 error, 1 skipped" in md and "RuntimeError: setup exploded" in md


def test_plain_nodeid_drops_only_xdists_group_suffix():
    assert run_outcomes.plain_nodeid("t.py::test[register@after-place-mpn409]@kernel-host") == \
        "t.py::test[register@after-place-mpn409]"
    assert run_outcomes.plain_nodeid("t.py::test[register@after-place]") == "t.py::test[register@after-place]"
    assert run_outcomes.plain_nodeid("t.py::test_x@test_x.py") == "t.py::test_x"


KSM = "ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty"
XFAIL_REASON = f"known finding {KSM} (suite/known_findings.py): KSM's merge drops the bits\nsnapshot-style[…]"


def _cell_dir(artifacts: Path, nodeid: str, verdict: Verdict) -> None:
    d = artifacts / run_outcomes.artifact_dir_name(nodeid)
    d.mkdir(parents=True)
    (d / "verdict.json").write_text(verdict.to_json())


def test_a_known_finding_is_reported_by_name_with_its_pages_not_as_a_skip(tmp_path: Path):
    """Before: pytest's xfail (JUnit <skipped type="pytest.xfail">) counted as "skipped" with a traceback, so the
    report hid exactly the kernel bugs holecheck knows about."""
    nodeid = "tests/test_triggers.py::test_trigger[wp-same-ksm-pmd]"
    verdict = Verdict("snapshot-style[shrink@after-protect-mpn409-spread8-same-by-ksm]", "6.18.44",
                      findings=[Finding.of("lost-uffd-wp", "shrink@after-protect", [0x7f0000040000 + i * 0x40000
                                                                                    for i in range(255)])])
    _cell_dir(tmp_path / "art", nodeid, verdict)
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_triggers" name="test_trigger[wp-same-ksm-pmd]" '
        f'time="4.4"><properties><property name="kernel" value="6.18.44"/><property name="known_finding" '
        f'value="{KSM}"/></properties><skipped type="pytest.xfail" message="{XFAIL_REASON.replace(chr(10), "&#10;")}"/>'
        '</testcase>'
        '</testsuite></testsuites>')
    (o,) = run_outcomes.parse_junit(junit, tmp_path / "art")
    assert (o.status, o.message) == ("xfailed", XFAIL_REASON)
    index = report.write(tmp_path / "out", tmp_path / "art", [junit])
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "1 tests: 1 known findings\n" in md and "**skipped**" not in md
    assert f"**known finding {KSM}** (lost wp 255)" in md
    assert "## Known findings" in md and "[shrink@after-protect] 255 pages lost their uffd-wp bit" in md
    assert f"known finding {KSM}" in index.read_text() and "[verdict.json](../art/" in md
    saved = (tmp_path / "out" / "outcomes.json").read_text()
    assert '"status": "xfailed"' in saved and "Traceback" not in saved


def test_session_plugin_reports_an_xfail_as_a_known_finding(tmp_path: Path):
    plugin = report.SessionPlugin(tmp_path, tmp_path / "none")
    nodeid = "tests/test_triggers.py::test_trigger[wp-same-ksm-pmd]"
    for r in [_report(nodeid, "setup", "passed"),
              _report(nodeid, "call", "skipped", ("x.py", 1, "Skipped: xfail"), wasxfail=XFAIL_REASON,
                      user_properties=[("kernel", "6.18.44"), ("known_finding", KSM)]),
              _report(nodeid, "teardown", "passed")]:
        plugin.pytest_runtest_logreport(r)
    o = plugin.outcomes[nodeid]
    assert (o.status, o.message) == ("xfailed", XFAIL_REASON)
    plugin.pytest_sessionfinish(None)  # type: ignore[arg-type]
    assert "1 tests: 1 known findings" in (tmp_path / "summary.md").read_text()


def test_one_column_per_kernel_and_qemu_rows_in_test_id_order(tmp_path: Path):
    """Before: a kernel's synthetic cells (no QEMU) and real-QEMU cells made two columns, and cells skipped before
    a kernel was known (several kernels in the run) a '?' column."""
    art = tmp_path / "art"
    m = "tests/test_triggers.py::"
    cells = {f"{m}test_trigger[wp-shrinker-pmd]": Verdict("snapshot-style[b]", "6.18.44"),
             f"{m}test_trigger[wp-pageout-pmd]": Verdict("snapshot-style[a]", "6.18.44"),
             f"{m}test_trigger_qemu[snapshot-pageout]": Verdict("snapshot[c]", "6.18.44", qemu="7.2.22"),
             f"{m}test_trigger[wp-debugfs-pmd]": Verdict("snapshot-style[d]", "6.12.57+deb13-amd64")}
    for nodeid, v in cells.items():
        _cell_dir(art, nodeid, v)
    outcomes = [run_outcomes.Outcome(n, "passed") for n in reversed(cells)]
    outcomes.append(run_outcomes.Outcome(f"{m}test_trigger[wp-pageout-swap-pmd]", "skipped", message="host swap"))
    report.write(tmp_path / "out", art, outcomes=outcomes)
    md = (tmp_path / "out" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| scenario |"))
    assert header == "| scenario | 6.12.57+deb13-amd64 | 6.18.44 · QEMU 7.2.22 |"
    rows = [line.split("`")[1] for line in md.splitlines() if line.startswith("| `")]
    assert rows == ["snapshot-style[d]", "snapshot-style[a]", "snapshot-style[b]", "snapshot[c]"]  # test-id order
    assert "?" not in header and "5 tests: 4 passed, 1 skipped" in md
