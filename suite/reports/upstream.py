"""A bug report a maintainer can send upstream, in plain text: what happens, on which kernels it was measured, how
to reproduce it (the C reproducer, the kselftest), the candidate patch and what the suite measured with it.

    python -m suite.reports.upstream FINDING [--results [LABEL=]JUNIT.xml ...] [--series NAME] [--attach DIR]

Every number in the results section comes from the JUnit XML files given (``pytest --junitxml``: one session per
kernel, as the suite wrote them, with the properties its tests record: kernel, config, counts, times); nothing is
claimed that those files do not hold. The finding's text is its known-finding entry (``suite.known_findings``).
``--attach DIR`` writes the reproducer, the kselftest and the patch there, as files to attach to the mail.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import known_findings
from ..scenario import Scenario
from . import kselftest, reproducer
from .outcomes import Outcome, parse_junit

PATCHES = Path(__file__).resolve().parents[2] / "kernels" / "patches"
SERIES_FOR = {"ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty": "ksm-keep-uffd-wp"}
WIDTH = 76
# Tests whose outcome the report lists one by one (the rest are counted): the kselftest, upstream's tests, and the
# finding's own cells (test names, synthetic and real QEMU).
NAMED = re.compile(r"test_ksm_kselftest|test_upstream_mm_selftest")
CELLS = {"ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty": re.compile(r"wp-same-ksm|ksm-same|ksm_duplicates")}


@dataclass(frozen=True)
class Session:
    """One JUnit file: the kernel it ran on and its tests' outcomes."""

    label: str
    path: Path
    outcomes: list[Outcome]

    @property
    def kernel(self) -> str:
        kernels = Counter(o.properties["kernel"] for o in self.outcomes if o.properties.get("kernel"))
        return kernels.most_common(1)[0][0] if kernels else self.label or "?"

    @property
    def config(self) -> str:
        return next((o.properties["kernel_config"] for o in self.outcomes if o.properties.get("kernel_config")),
                    "not recorded")

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.outcomes)


def load(spec: str) -> Session:
    label, sep, path = spec.partition("=")
    file = Path(path if sep else spec)
    return Session(label if sep else "", file, parse_junit(file))


def _wrap(text: str, indent: str = "") -> str:
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                                   break_on_hyphens=False))


def _finding(name: str) -> known_findings.KnownFinding:
    found = next((k for k in known_findings.KNOWN if k.name == name), None)
    if found is None:
        raise KeyError(f"no known finding {name!r} (known: {', '.join(k.name for k in known_findings.KNOWN)})")
    return found


def _outcome_line(o: Outcome) -> str:
    """A listed test: its outcome and what it recorded (the kselftest's TAP line, the probe, upstream's totals)."""
    p = o.properties
    totals = next((v for k, v in p.items() if k.endswith("_totals")), "")
    failed = next((v for k, v in p.items() if k.endswith("_failed") and v), "")
    extra = [p.get("kselftest_tap") or (f"exit {p['kselftest_rc']}" if p.get("kselftest_rc") else ""),
             f"{p['lost_uffd_wp']} pages lost uffd-wp" if p.get("lost_uffd_wp") else "",
             f"probe ksm_merge_keeps_uffd_wp={p['ksm_merge_keeps_uffd_wp']}" if "ksm_merge_keeps_uffd_wp" in p else "",
             totals.removeprefix("# "), f"failed: {failed}" if failed else "",
             f"verdict: {p['lost-uffd-wp']} lost-uffd-wp, {p.get('no-wp-fault', 0)} no-wp-fault"
             if p.get("lost-uffd-wp") else "",
             p.get("known_finding", "") and f"known finding {p['known_finding']}"]
    detail = "; ".join(x for x in extra if x)
    status = "xfail" if o.status == "skipped" and p.get("known_finding") else o.status  # JUnit writes xfail so
    return _wrap(f"{status.upper():7} {o.name} ({o.seconds:.0f}s{'; ' + detail if detail else ''})", "  ")


def _session_text(s: Session, cells: re.Pattern[str]) -> list[str]:
    lines = [f"* {s.kernel}  [{s.path.name}]", f"  config: {s.config}"]
    named = [o for o in s.outcomes if NAMED.search(o.name) or cells.search(o.name)]
    lines += [_outcome_line(o) for o in named]
    rest = Counter(o.status for o in s.outcomes if o not in named)
    if rest:
        lines.append("  other tests of the session: " + ", ".join(f"{n} {st}" for st, n in sorted(rest.items())))
    lines.append(f"  session: {len(s.outcomes)} tests, {s.seconds / 60:.1f} min of test time")
    return lines


def _builds(series: str) -> list[dict]:
    """build.json of every cached build of ``series`` (kernels.build writes it beside the bzImage)."""
    from ..cache import cache_root

    found = [json.loads(p.read_text()) for p in sorted((cache_root() / "build").glob("*/build.json"))]
    return [b for b in found if b.get("patch") == series]


def _steps(s: Scenario) -> list[str]:
    return [f"  {i:2}. {st.phase}: {reproducer.describe(st, s)}" for i, st in enumerate(s.steps, 1)]


def report(name: str, sessions: list[Session], series: str | None = None) -> str:
    """The report's text."""
    known = _finding(name)
    scenario = kselftest.FINDINGS[name]() if name in kselftest.FINDINGS else None
    series = series or SERIES_FOR.get(name)
    patches = sorted((PATCHES / series).glob("*.patch")) if series else []
    out = [f"Subject: [BUG] {known.summary.split(':')[0]}", "",
           "What happens", "------------", _wrap(known.summary), "", _wrap(known.cause), "",
           "Where it was seen before this run (the suite's known-finding entry):", _wrap(known.measured, "  "), ""]
    cells = CELLS.get(name, NAMED)
    out += ["Measured in this run", "--------------------"]
    if not sessions:
        out += ["No result files given (--results): this report claims no result of its own."]
    else:
        out.append(_wrap("One block per test session (pytest JUnit XML as the suite wrote it); the kernel is the "
                         "booted kernel's uname -r; times are the tests' own (on the host they include waits for "
                         "the knob lock other runs held). A test named '..._fails_exactly_where_...' passes when "
                         "the kselftest's own TAP result (shown) is what the probe measured on that kernel."))
        for s in sessions:
            out += ["", *_session_text(s, cells)]
    builds = _builds(series) if series else []
    if builds:
        out += ["", "Built for this run (build.json beside each kernel in holecheck's cache):"]
        out += [_wrap(f"{b['release']}: {b['source']} + {b['patch']} (sha256 {b['patch_sha256'][:12]}), config "
                      f"recipe {b['recipe_sha256'][:12]} (allnoconfig + kernels/minimal.config + "
                      f"kernels/holecheck.config), make -j{b['jobs']} bzImage {b['seconds'] / 60:.1f} min"
                      f"{', seeded' if b.get('seeded_from') else ''}, finished {b['finished']}", "  ")
                for b in builds]
    out += [""]
    if scenario is not None:
        out += ["Reproducer", "----------",
                _wrap(f"Attached: {name}-repro.c and the kselftest {name}.c (written by python -m "
                      f"suite.reports.upstream {name} --attach DIR)."), "",
                _wrap(f"A standalone C program replays the sequence on one {scenario.size_mib} MiB anonymous region "
                      f"({scenario.npages} pages) and judges every page from /proc/self/pagemap and the WP faults "
                      "it receives; it restores the knobs it changes:"),
                *_steps(scenario), "",
                f"  {reproducer.BUILD.replace('repro.c', name + '-repro.c')} && ./repro    # as root", "",
                "kselftest", "---------",
                _wrap("The same program under a kselftest.h main (TAP, one test named after the finding; it skips "
                      "without root, THP, KSM or userfaultfd write-protect), in the style of "
                      "tools/testing/selftests/mm:"), "",
                f"  python -m suite.reports.kselftest {name}",
                f"  cc {' '.join(kselftest.CFLAGS)} -I tools/testing/selftests -I usr/include {name}.c -o {name}",
                f"  ./{name}    # not ok 1 {name} where the merge drops the bit", ""]
    if patches:
        out += ["Candidate patch", "---------------",
                _wrap(f"kernels/patches/{series}/ in holecheck; built with holecheck's config recipe by "
                      f"--kernel=patched:VERSION:{series}:"), ""]
        for p in patches:
            out += [p.read_text().rstrip("\n"), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def attach(name: str, directory: Path, series: str | None = None) -> list[Path]:
    """The reproducer, the kselftest and the patches as files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if name in kselftest.FINDINGS:
        scenario = kselftest.FINDINGS[name]()
        for fname, text in ((f"{name}-repro.c", reproducer.generate(scenario)),
                            (f"{name}.c", kselftest.generate(scenario, name=name))):
            (directory / fname).write_text(text)
            written.append(directory / fname)
    series = series or SERIES_FOR.get(name)
    for p in sorted((PATCHES / series).glob("*.patch")) if series else []:
        (directory / p.name).write_text(p.read_text())
        written.append(directory / p.name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suite.reports.upstream", description=__doc__.splitlines()[0])
    ap.add_argument("finding", help="a known finding's name (suite/known_findings.py)")
    ap.add_argument("--results", action="append", default=[], metavar="[LABEL=]JUNIT",
                    help="a session's JUnit XML (pytest --junitxml); repeat per kernel")
    ap.add_argument("--series", help="the candidate patch series kernels/patches/NAME/ (default: the finding's)")
    ap.add_argument("--attach", type=Path, help="write the reproducer, kselftest and patches into this directory")
    a = ap.parse_args(argv)
    try:
        sessions = [load(spec) for spec in a.results]
        print(report(a.finding, sessions, a.series), end="")
        if a.attach:
            for path in attach(a.finding, a.attach, a.series):
                print(f"attached: {path}", file=sys.stderr)
    except (KeyError, OSError, ValueError) as exc:
        print(f"upstream: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
