"""What a run's cells were: each test's outcome (from JUnit XML or pytest's reports) with its artifacts' verdict.

Read by ``report`` (the matrix and pages), ``compare`` (what changed between two runs), ``soak``, bisection's steps
and the power tests: the one reader of pytest's JUnit XML.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Properties, Skipped

from ..scenario import is_synthetic
from ..verdict import KINDS, Verdict


def plain_nodeid(nodeid: str) -> str:
    """A test's id without the ``@group`` pytest-xdist's loadgroup appends: the same cell with or without -n."""
    at = nodeid.rfind("@")
    return nodeid[:at] if at > nodeid.rfind("]") and at > nodeid.rfind("::") else nodeid


def artifact_dir_name(nodeid: str) -> str:
    """The directory conftest's ``artifacts`` fixture gives a test (same rule: keep it in step)."""
    return re.sub(r"[^A-Za-z0-9_.@=-]+", "_", plain_nodeid(nodeid))


@dataclass
class Outcome:
    """One test's result, from JUnit XML or straight from pytest reports."""

    nodeid: str
    status: str  # passed | failed | error | skipped | xfailed (a known finding: suite/known_findings.py)
    seconds: float = 0.0
    message: str = ""  # a failure's whole text (the verdict, the traceback); a skip's reason; an xfail's reason
    properties: dict[str, str] = field(default_factory=dict)
    summary: str = ""  # JUnit's message attribute, first line: 'suite.errors.SetupError: …', 'Failed: …'

    @property
    def name(self) -> str:
        """The test's name with its parameters: 'test_snapshot_style[shrink@after-protect-mpn409]'."""
        return self.nodeid.split("::")[-1]


# Worst first when one test is reported more than once (pytest reports a failing teardown beside the call).
RANK = {"passed": 0, "skipped": 1, "xfailed": 2, "error": 3, "failed": 4}


def worst_per_test(outcomes: Iterable[Outcome]) -> dict[str, Outcome]:
    """One outcome per test: the worst of its reports, with their times added up."""
    merged: dict[str, Outcome] = {}
    for o in outcomes:
        prev = merged.get(o.nodeid)
        if prev is None:
            merged[o.nodeid] = replace(o, properties=dict(o.properties))
            continue
        prev.seconds += o.seconds
        if RANK[o.status] > RANK[prev.status]:
            prev.status, prev.message, prev.summary = o.status, o.message, o.summary
    return merged


@dataclass
class Cell:
    """One test of the matrix with what its artifacts say."""

    outcome: Outcome
    artifacts: Path | None
    verdict: Verdict | None
    fallback_kernel: str = "?"  # for cells without a verdict: the run's kernel when it had only one

    @property
    def nodeid(self) -> str:
        return self.outcome.nodeid

    @property
    def status(self) -> str:
        return self.outcome.status

    @property
    def module(self) -> str:
        return self.nodeid.split("::")[0]

    @property
    def test(self) -> str:
        return self.nodeid.split("::")[-1]

    @property
    def kernel(self) -> str:
        return self.verdict.kernel if self.verdict else self.outcome.properties.get("kernel", self.fallback_kernel)

    @property
    def qemu(self) -> str:
        return self.verdict.qemu if self.verdict else ""

    @property
    def column(self) -> str:
        return self.kernel + (f" · QEMU {self.qemu}" if self.qemu else "")

    @property
    def known(self) -> str:
        """An xfailed cell's known finding(s) by name (suite/known_findings.py)."""
        if self.status != "xfailed":
            return ""
        named = re.match(r"known finding (\S+)", self.outcome.message)
        return self.outcome.properties.get("known_finding") or (named.group(1) if named else "?")

    @property
    def scenario(self) -> str:
        """The row: the verdict's scenario (the same on every kernel), else the test's name."""
        return self.verdict.scenario if self.verdict else self.test

    @property
    def counts(self) -> dict[str, int]:
        if self.verdict is not None:
            out: dict[str, int] = {}
            for f in self.verdict.findings:
                out[f.kind] = out.get(f.kind, 0) + f.count
            return out
        return {k: int(v) for k, v in self.outcome.properties.items() if k in KINDS and v.isdigit()}

    @property
    def splits(self) -> str:
        """THPs before→after each shrink, e.g. 'dst shrink@completed: 127→0'."""
        if self.verdict is None:
            return ""
        return "; ".join(f"{s.get('side', '') + ' ' if s.get('side') else ''}{s['phase']}: "
                         f"{s['thp_before']}→{s['thp_after']}" for s in self.verdict.shrinks)

    @property
    def no_split_reason(self) -> str:
        return self.verdict.no_split_reason if self.verdict and not self.verdict.split_expected else ""

    @property
    def seconds(self) -> float:
        return self.outcome.seconds or (self.verdict.seconds if self.verdict else 0.0)

    @property
    def anchor(self) -> str:
        return "cell-" + artifact_dir_name(self.nodeid)

    @property
    def synthetic(self) -> bool:
        return bool(self.verdict and is_synthetic(self.verdict.scenario))


# --- collecting --------------------------------------------------------------------------------------------

def parse_junit(path: Path, artifacts: Path | None = None) -> list[Outcome]:
    """Every <testcase> of a JUnit XML file (pytest's, xunit1 or xunit2), in file order."""
    return parse_junit_text(path.read_text(errors="replace"), artifacts)


class BadJUnit(ValueError):
    """A JUnit file that is not XML."""


def parse_junit_text(text: str, artifacts: Path | None = None) -> list[Outcome]:
    """``parse_junit`` of the file's text (``BadJUnit`` if it is not XML), read with junitparser."""
    try:
        xml = JUnitXml.fromstring(text.encode())  # bytes: the encoding declaration is the parser's to honour
    except SyntaxError as exc:  # ElementTree's ParseError and lxml's XMLSyntaxError both are
        raise BadJUnit(f"not JUnit XML: {exc}") from None
    out = []
    for case in (case for suite in xml for case in suite):
        status, message, summary = "passed", "", ""
        if result := next((r for r in case.result if isinstance(r, Failure | Error | Skipped)), None):
            status = "failed" if isinstance(result, Failure) else "error" if isinstance(result, Error) else "skipped"
            if isinstance(result, Skipped) and result.type == "pytest.xfail":
                status = "xfailed"
            body, attr = (result.text or "").strip(), result.message or ""
            summary = attr.strip().split("\n", 1)[0]
            message = body if status != "skipped" and body else attr or body
        props = {p.name or "": p.value or "" for group in case.iterchildren(Properties) for p in group}
        nodeid = _nodeid(case.classname or "", case.name or "", artifacts)
        out.append(Outcome(nodeid, status, float(case.time or 0), message, props, summary))
    return out


def _nodeid(classname: str, name: str, artifacts: Path | None) -> str:
    """JUnit splits the node id into 'tests.test_x[.Class]' and 'test[param]': the file is the longest dotted
    prefix whose artifacts directory exists (else the whole classname)."""
    parts = classname.split(".")
    candidates = ["::".join(["/".join(parts[:k]) + ".py", *parts[k:], name]) for k in range(len(parts), 0, -1)]
    if artifacts is not None:
        for nodeid in candidates:
            if (artifacts / artifact_dir_name(nodeid)).is_dir():
                return nodeid
    return candidates[0]


def _cell(outcome: Outcome, artifacts: Path) -> Cell:
    d = artifacts / artifact_dir_name(outcome.nodeid)
    vpath = d / "verdict.json"
    verdict = Verdict.from_json(vpath.read_text()) if vpath.is_file() else None
    return Cell(outcome, d if d.is_dir() else None, verdict)


def collect(artifacts: Path, junit: Sequence[Path] = (), outcomes: Iterable[Outcome] = ()) -> list[Cell]:
    """The run's cells: from JUnit files and/or outcomes; with neither, from every verdict.json found."""
    found = [*outcomes, *(o for j in junit for o in parse_junit(j, artifacts))]
    if not found and artifacts.is_dir():
        for vpath in sorted(artifacts.glob("*/verdict.json")):
            v = Verdict.from_json(vpath.read_text())
            msg = "" if v.ok else v.failure_message()
            found.append(Outcome(vpath.parent.name, "passed" if v.ok else "failed", v.seconds, msg))
    cells = [_cell(o, artifacts) for o in found]
    kernels = {c.kernel for c in cells if c.verdict or "kernel" in c.outcome.properties}
    if len(kernels) == 1:
        for c in cells:
            c.fallback_kernel = next(iter(kernels))
    return cells


# --- per failing cell: pictures, reproducer, links ----------------------------------------------------------
