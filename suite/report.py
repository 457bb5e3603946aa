"""A per-run summary of the matrix: kernel × QEMU × scenario → pass/fail/known finding/skip, counts, splits, times.

Inputs are what a session leaves behind: JUnit XML (``--junitxml``; or outcomes collected by a pytest hook) and
the per-test artifacts directories (``verdict.json``, ``pagemap-*.npz``, QMP transcripts, …). Outputs, in
``--out``: ``summary.md``, a static ``index.html`` (inline CSS, no JS) whose failing cells show their failure
message, page-map pictures of their oracle snapshots, links to their artifacts and, for synthetic cells, a
standalone C reproducer.

    python -m suite.report [--artifacts .holecheck] [--junit FILE ...] [--out DIR]
    python -m suite.report --compare OLD NEW      # what changed since the last run (suite/compare.py)

Without ``--junit`` every ``verdict.json`` under the artifacts directory is a cell (its findings decide
pass/fail), which mixes runs if the directory was not fresh. ``SessionPlugin`` writes the report at the end of a
pytest session from the outcomes pytest reported (registered by conftest for ``--report DIR``).
"""
from __future__ import annotations

import argparse
import html
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .reports import pagemap_png, reproducer
from .reports.outcomes import Cell, Outcome, collect, plain_nodeid
from .scenario import Scenario

STATUSES = ("failed", "error", "xfailed", "passed", "skipped")
LABELS = {"xfailed": "known findings"}  # an xfail is a known kernel bug (suite/known_findings.py), never a skip
# Finding kinds shown as columns, with short headers.
COLUMNS = {"hole": "holes", "missing-fault": "missing", "lost-uffd-wp": "lost wp", "lost-soft-dirty": "lost sd",
           "no-wp-fault": "no wp fault", "content": "content", "stall": "stalls", "no-split": "no split",
           "stale-dump": "stale dump"}
MESSAGE_LINES = 60  # a traceback longer than this is cut in the report (the JUnit XML keeps it whole)
PX_PER_PAGE = 2  # page maps 1024 px wide: a single marked page stays visible
EXTRA_ARTIFACTS = ("verdict.json", "scenario.json", "qmp-*.txt", "stderr-*.txt", "*.log")


@dataclass
class Extras:
    pictures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png)
    links: list[tuple[str, Path]] = field(default_factory=list)
    reproducer: Path | None = None
    problems: list[str] = field(default_factory=list)


def _npz_order(p: Path) -> tuple[int, str]:
    """'last' snapshots first (the end state), then the shrinks' before/after pairs."""
    return (0 if p.stem.endswith("last") else 1, p.stem)


def extras(cell: Cell, out: Path) -> Extras:
    ex = Extras()
    d = cell.artifacts
    if d is None:
        return ex
    img_dir = out / "img" / d.name
    for npz in sorted(d.glob("pagemap-*.npz"), key=_npz_order):
        png = img_dir / (npz.stem + ".png")
        try:
            img_dir.mkdir(parents=True, exist_ok=True)
            pagemap_png.render_file(npz, png, cell.verdict, px_per_page=PX_PER_PAGE)
            ex.pictures.append((npz.name, png))
        except (OSError, ValueError, KeyError) as exc:
            ex.problems.append(f"{npz.name}: cannot render ({exc})")
    for pattern in EXTRA_ARTIFACTS:
        ex.links += [(p.name, p) for p in sorted(d.glob(pattern))]
    ex.links += [(p.name, p) for p in sorted(d.glob("pagemap-*.npz"))]
    if (d / "scenario.json").is_file():
        try:
            scenario = Scenario.from_json((d / "scenario.json").read_text())
            if scenario.synthetic:
                ex.reproducer = out / "repro" / f"{d.name}.c"
                ex.reproducer.parent.mkdir(parents=True, exist_ok=True)
                ex.reproducer.write_text(reproducer.generate(scenario, cell.verdict))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ex.problems.append(f"reproducer: {exc}")
    return ex


# --- writing -----------------------------------------------------------------------------------------------

def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _counts_text(cell: Cell, sep: str = " · ") -> str:
    return sep.join(f"{COLUMNS.get(k, k)} {n:,}" for k, n in cell.counts.items())


def _totals(cells: Sequence[Cell]) -> dict[str, int]:
    return {s: sum(c.status == s for c in cells) for s in STATUSES}


def _totals_text(cells: Sequence[Cell]) -> list[tuple[str, str]]:
    """(status, 'N label') for each status some cell has."""
    return [(s, f"{n} {LABELS.get(s, s)}") for s, n in _totals(cells).items() if n]


def _status_text(c: Cell) -> str:
    return f"known finding {c.known}" if c.status == "xfailed" else c.status


Matrix = tuple[list[str], list[str], dict[tuple[str, str], list[Cell]]]  # rows, columns, cells at (row, column)


def _columns(cells: Sequence[Cell]) -> dict[str, str]:
    """Each cell's column, kernel × QEMU: a cell that started no QEMU (synthetic, or skipped before one) sits with
    its kernel's first QEMU of the run; a cell skipped before its kernel was known (several kernels) in none."""
    qemus: dict[str, list[str]] = {}
    for c in cells:
        if c.qemu and c.qemu not in qemus.setdefault(c.kernel, []):
            qemus[c.kernel].append(c.qemu)
    out = {}
    for c in cells:
        if c.kernel == "?":
            continue
        qemu = c.qemu or next(iter(qemus.get(c.kernel, [])), "")
        out[c.nodeid] = c.kernel + (f" · QEMU {qemu}" if qemu else "")
    return out


def _matrix(cells: Sequence[Cell]) -> dict[str, Matrix]:
    """Per test module: its rows (scenarios, in test-id order), columns (kernel × QEMU) and cells at each
    intersection."""
    out: dict[str, Matrix] = {}
    columns = _columns(cells)
    for c in sorted(cells, key=lambda c: c.nodeid):
        if (col := columns.get(c.nodeid)) is None:
            continue
        rows, cols, grid = out.setdefault(c.module, ([], [], {}))
        if c.scenario not in rows:
            rows.append(c.scenario)
        if col not in cols:
            cols.append(col)
        grid.setdefault((c.scenario, col), []).append(c)
    return out


def _verdict_file(c: Cell) -> Path | None:
    return c.artifacts / "verdict.json" if c.artifacts and (c.artifacts / "verdict.json").is_file() else None


def _known_lines(c: Cell) -> list[str]:
    """An xfailed cell: its known finding by name and the pages of each finding (first ones; verdict.json has
    every page, as runs)."""
    findings = [f.message() for f in c.verdict.findings] if c.verdict else []
    return [f"known finding {c.known} on kernel {c.kernel}" + (f", QEMU {c.qemu}" if c.qemu else ""),
            *(findings or _message(c).splitlines())]


def _worst(cells: Sequence[Cell]) -> str:
    return min((c.status for c in cells), key=STATUSES.index)


def summary_md(cells: Sequence[Cell], extras_by_cell: dict[str, Extras], out: Path, title: str) -> str:
    lines = [f"# {title}", "", f"{len(cells)} tests: " + ", ".join(text for _, text in _totals_text(cells)), ""]
    for module, (rows, cols, grid) in _matrix(cells).items():
        lines += [f"## {module}", "", "| scenario | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row in rows:
            tds = []
            for col in cols:
                here = grid.get((row, col), [])
                tds.append("; ".join(f"**{_status_text(c)}**" + (f" ({_counts_text(c, ', ')})" if c.counts else "")
                                     + f" {c.seconds:.1f} s" for c in here) or "—")
            lines.append(f"| `{row}` | " + " | ".join(tds) + " |")
        lines.append("")
    if known := [c for c in cells if c.status == "xfailed"]:
        lines += ["## Known findings", "", "Known kernel bugs (suite/known_findings.py) these cells showed, within "
                  "their signature: xfail, not skipped.", ""]
    for c in known:
        lines += [f"### `{c.nodeid}`", "", "```", *_known_lines(c), "```", ""]
        lines += [f"- every page: [verdict.json]({_rel(v, out)})", ""] if (v := _verdict_file(c)) else []
    bad = [c for c in cells if c.status in ("failed", "error")]
    if bad:
        lines += ["## Failures", ""]
    for c in bad:
        ex = extras_by_cell.get(c.nodeid, Extras())
        where = f"kernel {c.kernel}" + (f", QEMU {c.qemu}" if c.qemu else "")
        where += f"; THPs before→after each shrink: {c.splits}" if c.splits else ""
        lines += [f"### `{c.nodeid}`", "", where, "", "```", *_message(c).splitlines(), "```", ""]
        lines += [f"- page map: [{cap}]({_rel(p, out)})" for cap, p in ex.pictures]
        lines += [f"- [{name}]({_rel(p, out)})" for name, p in ex.links if not name.endswith(".npz")]
        if ex.reproducer:
            lines.append(f"- C reproducer: [{ex.reproducer.name}]({_rel(ex.reproducer, out)}) "
                         f"(`{reproducer.BUILD}`, run as root)")
        lines += [f"- {p}" for p in ex.problems] + [""]
    return "\n".join(lines) + "\n"


def _message(c: Cell) -> str:
    text = c.outcome.message or (c.verdict.failure_message() if c.verdict and not c.verdict.ok else "")
    text = re.sub(r"^Failed: ", "", text)
    lines = text.splitlines()
    return "\n".join(lines[:MESSAGE_LINES] + ([f"… ({len(lines) - MESSAGE_LINES} more lines)"]
                                              if len(lines) > MESSAGE_LINES else []))


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; font-family: monospace; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 3px 6px; }
th { background: #f3f3f3; text-align: left; } td.scn { font-family: monospace; font-size: 12px; }
.passed { background: #e3f5e1; } .failed { background: #fbd9d7; } .error { background: #f9c9a6; }
.skipped { background: #eee; color: #777; } .xfailed { background: #fff0c0; }
.badge { font-weight: 600; } .counts { font-size: 12px; color: #900; } .secs { font-size: 11px; color: #777; }
pre { background: #f8f8f8; border: 1px solid #ddd; padding: 8px; white-space: pre-wrap; font-size: 12px; }
.pics { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; }
figcaption { font: 12px monospace; } img.map { image-rendering: pixelated; border: 1px solid #ccc; }
.legend span.box { display: inline-block; width: 12px; height: 12px; border: 1px solid #888;
  vertical-align: middle; margin: 0 4px 0 12px; }
.cell { border-top: 2px solid #c33; margin-top: 1.5em; }
"""


def _h(text: object) -> str:
    return html.escape(str(text))


def _legend_html() -> str:
    items = "".join(f'<span class="box" style="background: rgb{c}"></span>{_h(t)}'
                    for c, t in pagemap_png.LEGEND_HTML.values())
    return f'<p class="legend">Page maps — one row per 2 MiB chunk, one pixel per 4 KiB page: {items}</p>'


def index_html(cells: Sequence[Cell], extras_by_cell: dict[str, Extras], out: Path, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_h(title)}</title><style>{CSS}</style>",
             f"</head><body><h1>{_h(title)}</h1>",
             f"<p>{len(cells)} tests: " + ", ".join(f'<span class="{s} badge">&nbsp;{_h(text)}&nbsp;</span>'
                                                    for s, text in _totals_text(cells)) + "</p>"]
    parts += [_matrix_html(module, *m) for module, m in _matrix(cells).items()]
    if known := [c for c in cells if c.status == "xfailed"]:
        parts.append("<h2>Known findings</h2><p>Known kernel bugs (suite/known_findings.py) these cells showed, "
                     "within their signature: xfail, not skipped.</p>")
    parts += [f"<div class='cell' id='{c.anchor}'><h3>{_h(c.nodeid)}</h3><pre>{_h(chr(10).join(_known_lines(c)))}"
              "</pre>" + (f"<p><a href='{_h(_rel(v, out))}'>verdict.json</a> (every page)</p>"
                          if (v := _verdict_file(c)) else "") + "</div>" for c in known]
    bad = [c for c in cells if c.status in ("failed", "error")]
    if bad:
        parts += ["<h2>Failures</h2>", _legend_html()]
    parts += [_failure_html(c, extras_by_cell.get(c.nodeid, Extras()), out) for c in bad]
    parts.append(_all_tests_html(cells))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='secs'>generated by holecheck (suite/report.py) at {stamp}</p></body></html>")
    return "\n".join(parts)


def _matrix_html(module: str, rows: list[str], cols: list[str], grid: dict[tuple[str, str], list[Cell]]) -> str:
    parts = [f"<h2>{_h(module)}</h2><table><tr><th>scenario</th>" + "".join(f"<th>{_h(c)}</th>" for c in cols)
             + "</tr>"]
    for row in rows:
        tds = []
        for col in cols:
            here = grid.get((row, col), [])
            tds.append(f"<td class='{_worst(here)}'>" + "<br>".join(_cell_html(c) for c in here) + "</td>"
                       if here else "<td>—</td>")
        parts.append(f"<tr><td class='scn'>{_h(row)}</td>{''.join(tds)}</tr>")
    return "\n".join(parts) + "</table>"


def _all_tests_html(cells: Sequence[Cell]) -> str:
    """Every test, one row; finding columns only for kinds some test has."""
    kinds = [k for k in COLUMNS if any(k in c.counts for c in cells)]
    parts = ["<h2>All tests</h2><table><tr><th>status</th><th>test</th><th>kernel</th><th>QEMU</th>"
             + "".join(f"<th>{_h(COLUMNS[k])}</th>" for k in kinds) + "<th>THPs before→after each shrink</th>"
             "<th>s</th></tr>"]
    for c in cells:
        link = f"<a href='#{c.anchor}'>{_h(c.nodeid)}</a>" if c.status in ("failed", "error", "xfailed") \
            else _h(c.nodeid)
        splits = _h(c.splits)
        if c.no_split_reason:
            splits += f" <span class='secs' title='{_h(c.no_split_reason)}'>(no split expected)</span>"
        parts.append(f"<tr class='{c.status}'><td>{_h(_status_text(c))}</td><td class='scn'>{link}</td>"
                     f"<td>{_h(c.kernel)}</td><td>{_h(c.qemu)}</td>"
                     + "".join(f"<td>{c.counts.get(k, '')}</td>" for k in kinds)
                     + f"<td>{splits}</td><td>{c.seconds:.1f}</td></tr>")
    return "\n".join(parts) + "</table>"


def _cell_html(c: Cell) -> str:
    label = f"<span class='badge'>{_h(_status_text(c))}</span>"
    if c.status in ("failed", "error", "xfailed"):
        label = f"<a href='#{c.anchor}'>{label}</a>"
    counts = f" <span class='counts'>{_h(_counts_text(c))}</span>" if c.counts else ""
    return f"{label}{counts} <span class='secs'>{c.seconds:.1f} s</span>"


def _failure_html(c: Cell, ex: Extras, out: Path) -> str:
    head = f"kernel {_h(c.kernel)}" + (f", QEMU {_h(c.qemu)}" if c.qemu else "")
    if c.splits:
        head += f"; THPs before→after each shrink: {_h(c.splits)}"
    if c.no_split_reason:
        head += f" (no split expected: {_h(c.no_split_reason)})"
    parts = [f"<div class='cell' id='{c.anchor}'><h3>{_h(c.nodeid)}</h3><p>{head}</p><pre>{_h(_message(c))}</pre>"]
    links = [f"<a href='{_h(_rel(p, out))}'>{_h(name)}</a>" for name, p in ex.links]
    if ex.reproducer:
        links.insert(0, f"<a href='{_h(_rel(ex.reproducer, out))}'><b>C reproducer</b></a> "
                        f"(<code>{_h(reproducer.BUILD)}</code>, run as root)")
    if links:
        parts.append("<p>" + " · ".join(links) + "</p>")
    parts += [f"<p>{_h(p)}</p>" for p in ex.problems]
    if ex.pictures:
        parts.append("<div class='pics'>" + "".join(
            f"<figure><img class='map' src='{_h(_rel(p, out))}' alt='{_h(cap)}'><figcaption>{_h(cap)}</figcaption>"
            "</figure>" for cap, p in ex.pictures) + "</div>")
    return "\n".join(parts) + "</div>"


def write(out: Path, artifacts: Path, junit: Sequence[Path] = (), outcomes: Iterable[Outcome] = (),
          title: str = "holecheck run") -> Path:
    """Write ``summary.md``, ``index.html``, the failing cells' pictures and reproducers, and ``outcomes.json``
    (for ``--compare``) into ``out``; returns the HTML's path."""
    from .reports import compare

    out.mkdir(parents=True, exist_ok=True)
    cells = collect(artifacts, junit, outcomes)
    compare.save(out / compare.OUTCOMES_FILE, [(c.outcome, c.kernel) for c in cells])
    extras_by_cell = {c.nodeid: extras(c, out) for c in cells if c.status in ("failed", "error")}
    (out / "summary.md").write_text(summary_md(cells, extras_by_cell, out, title))
    index = out / "index.html"
    index.write_text(index_html(cells, extras_by_cell, out, title))
    return index


class SessionPlugin:
    """A pytest plugin that collects every test's outcome and writes the report at the end of the session
    (conftest registers it for ``--report DIR``; no ``--junitxml`` needed)."""

    def __init__(self, out: Path, artifacts: Path, title: str = "holecheck run") -> None:
        self.out, self.artifacts, self.title = out, artifacts, title
        self.outcomes: dict[str, Outcome] = {}
        self.index: Path | None = None
        self.error = ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """One outcome per test from its setup/call/teardown reports: a failed setup or teardown is an error."""
        nodeid = plain_nodeid(report.nodeid)
        o = self.outcomes.setdefault(nodeid, Outcome(nodeid, "passed"))
        o.seconds = round(o.seconds + report.duration, 3)
        o.properties.update({str(k): str(v) for k, v in report.user_properties})
        if report.skipped and hasattr(report, "wasxfail") and o.status in ("passed", "skipped"):
            o.status, o.message = "xfailed", report.wasxfail.removeprefix("reason: ")  # a known finding
        elif report.skipped and o.status == "passed":
            o.status = "skipped"
            longrepr = report.longrepr
            o.message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
            o.message = o.message.removeprefix("Skipped: ")
        elif report.failed and o.status not in ("failed", "error"):
            o.status = "failed" if report.when == "call" else "error"
            o.message = report.longreprtext

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        try:
            self.index = write(self.out, self.artifacts, outcomes=list(self.outcomes.values()), title=self.title)
        except (OSError, ValueError) as exc:  # a report must never turn a run's result into a crash
            self.error = str(exc)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        text = f"holecheck report: {self.index}" if self.index else f"holecheck report not written: {self.error}"
        terminalreporter.write_line(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suite.report", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path(".holecheck"), help="per-test artifacts (.holecheck/)")
    p.add_argument("--junit", type=Path, nargs="*", default=[], help="JUnit XML file(s) from pytest --junitxml")
    p.add_argument("--out", type=Path, help="output directory (default: <artifacts>/report)")
    p.add_argument("--title", default="holecheck run")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                   help="print the cells whose verdict changed between two runs (JUnit XML or --report directory); "
                        "exit 1 on new failures")
    a = p.parse_args(argv)
    if a.compare:
        from .reports import compare

        return compare.main(*a.compare)
    try:
        index = write(a.out or a.artifacts / "report", a.artifacts, a.junit, title=a.title)
    except (OSError, ValueError) as exc:  # outcomes.BadJUnit: not XML
        print(f"report: {exc}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
