"""``--kcidb=FILE``: the session in KernelCI's KCIDB schema (``kcidb-io``'s newest), validated before it is written.

One checkout and one build per kernel under test, one test per pytest test:

- ``debian:SPEC``: the checkout is the Debian package version (``7.3.4-1~bpo13+1``, read from the fetched .debs'
  names), the build is Debian's build of that release with its config (``boot/config-R``; compiler from it);
- ``build:TREE``: the checkout is the tree's commit (``git rev-parse HEAD``, its ``origin`` remote), the build
  holecheck's recipe (``kernels/holecheck.config``) with the compiler the config names;
- ``host`` / an image path: the release and ``/proc/version`` / the image's name, as far as they tell.

Status: passed → PASS; failed → FAIL, unless it failed with one of holecheck's own errors (a stall, a helper or
setup fault: a harness fault is an error of the run, never a finding) → ERROR; a setup that failed → MISS (the
test did not run); skipped → SKIP; xfail by a known finding (``suite.known_findings``) → FAIL with the finding's
name in the comment and ``misc.known_finding``: it is a kernel bug, and KCIDB has no "expected" status; an
xfail that no known finding explains → SKIP (nothing was judged); xpass → PASS. The test's text (the verdict's
findings, a skip's reason) is its ``log_excerpt``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import kcidb_io
import pytest

from .. import errors
from ..kernelspec import KernelSpec
from .outcomes import plain_nodeid

ORIGIN = "holecheck"
SCHEMA = kcidb_io.schema.LATEST
EXCERPT = 16384  # the schema's maxLength of a log_excerpt


@dataclass
class Result:
    """One pytest test as KCIDB sees it."""

    nodeid: str
    status: str = "PASS"
    seconds: float = 0.0
    started: float = 0.0  # epoch seconds of its first report
    text: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    known_finding: str = ""


def status_of(report: pytest.TestReport) -> tuple[str, str]:
    """(KCIDB status, text) of one setup/call/teardown report; ("", "") for a passing setup/teardown."""
    if hasattr(report, "wasxfail"):  # xfail: skipped; xpass: passed (strict xpasses fail as usual)
        return ("SKIP", report.wasxfail) if report.skipped else ("PASS", f"xpass: {report.wasxfail}")
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
        return "SKIP", reason.removeprefix("Skipped: ")
    if report.failed:
        if report.when == "setup":
            return "MISS", report.longreprtext
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", "") or ""
        return ("ERROR" if report.when != "call" or harness_error(crash) else "FAIL"), report.longreprtext
    return ("PASS", "") if report.when == "call" else ("", "")


def harness_error(crash: str) -> bool:
    """Whether a crash line (``suite.errors.StallError: …``) names one of holecheck's own errors: a harness fault
    (a stall, a helper or QEMU that failed, a set-up problem), never a finding."""
    module, _, name = crash.split(":", 1)[0].strip().rpartition(".")
    if not module.startswith("suite."):
        return False
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, errors.HolecheckError)


RANK = {s: i for i, s in enumerate(("FAIL", "ERROR", "MISS", "PASS", "DONE", "SKIP"))}  # the schema's priority


def record(results: dict[str, Result], report: pytest.TestReport) -> None:
    """Fold one report into its test's result: the highest-priority status wins (a failed teardown after a pass
    is an ERROR; a skip in setup stays a SKIP)."""
    nodeid = plain_nodeid(report.nodeid)
    r = results.setdefault(nodeid, Result(nodeid, status="", started=report.start))
    r.seconds = round(r.seconds + report.duration, 3)
    r.properties.update({str(k): str(v) for k, v in report.user_properties})
    status, text = status_of(report)
    if status == "SKIP" and hasattr(report, "wasxfail"):
        r.known_finding = r.properties.get("known_finding", "")
        if r.known_finding:
            status = "FAIL"  # a known kernel bug that showed: a failure of the kernel, named
    if status and (not r.status or RANK[status] < RANK[r.status]):
        r.status, r.text = status, text


# --- kernels: checkout and build ---------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def config_facts(config: Path | None) -> dict[str, str]:
    """The compiler a kernel config names (``CONFIG_CC_VERSION_TEXT``)."""
    if config is None or not config.is_file():
        return {}
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="(.*)"$', config.read_text(errors="replace"), re.M)
    return {"compiler": m[1]} if m else {}


def debian_packages(release: str) -> list[tuple[str, str]]:
    """(package, Debian version) of the .debs the fetched tree of ``release`` was unpacked from (its marker)."""
    from kernels import debian  # kernels depends on suite: imported where used

    marker = debian.kernels_dir() / release / debian.MARKER
    if not marker.is_file():
        return []
    out = []
    for line in marker.read_text().split():
        name, _, rest = line.removesuffix(".deb").partition("_")
        out.append((name, urllib.parse.unquote(rest.rpartition("_")[0])))
    return out


def git(tree: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def kernel_records(spec: KernelSpec, release: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The KCIDB checkout and build of one kernel under test (``release``: its uname -r, "" if it never ran)."""
    checkout: dict[str, Any] = {"origin": ORIGIN, "valid": True}
    build: dict[str, Any] = {"origin": ORIGIN, "architecture": "x86_64", "status": "PASS",
                             "misc": {"kernel": str(spec), "release": release}}
    config: Path | None = None
    if spec.kind == "debian":
        parts = debian_packages(release) if release else []
        version = parts[0][1] if parts else spec.value
        checkout.update(id=f"{ORIGIN}:debian-{version}", tree_name="debian",
                        comment=f"Debian's linux {version}" + (f" ({release})" if release else ""),
                        misc={"package_version": version, "packages": [p for p, _ in parts]})
        config = debian_tree_config(release)
        build.update(id=f"{ORIGIN}:debian-{version}-{release or spec.value}",
                     config_name=f"debian {release.rpartition('-')[2] if release else 'amd64'}",
                     comment=f"Debian's build {release or spec.value}")
    elif spec.kind == "build":
        tree = Path(spec.value).expanduser().resolve()
        commit = git(tree, "rev-parse", "HEAD")
        dirty = bool(git(tree, "status", "--porcelain", "--untracked-files=no"))
        checkout.update(id=f"{ORIGIN}:git-{commit or tree}", tree_name=tree.name,
                        comment=f"{tree}" + (" with uncommitted changes" if dirty else ""))
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            checkout.update(git_commit_hash=commit, git_commit_name=git(tree, "describe", "--always") or commit)
        if (url := git(tree, "remote", "get-url", "origin")) and re.match(r"^(https?|git)://", url):
            checkout["git_repository_url"] = url
        if branch := git(tree, "rev-parse", "--abbrev-ref", "HEAD"):
            checkout["git_repository_branch"] = branch
        build.update(id=f"{ORIGIN}:build-{commit[:16] or tree}-{release or 'unknown'}",
                     config_name="holecheck (kernels/holecheck.config)", comment=f"holecheck's build of {tree}")
    else:  # host, or an image path
        what = "host" if spec.kind == "host" else Path(spec.value).name
        text = Path("/proc/version").read_text().strip() if spec.kind == "host" else spec.value
        checkout.update(id=f"{ORIGIN}:{what}-{release or 'unknown'}", tree_name=what, comment=text)
        config = Path(f"/boot/config-{release}") if spec.kind == "host" and release else None
        build.update(id=f"{ORIGIN}:{what}-{release or 'unknown'}", config_name=what, comment=text)
    build.update(config_facts(config))
    build["checkout_id"] = checkout["id"]
    return checkout, build


def debian_tree_config(release: str) -> Path | None:
    from kernels import debian

    return debian.kernels_dir() / release / "boot" / f"config-{release}" if release else None


# --- the document --------------------------------------------------------------------------------------------------

def kcidb_path(nodeid: str) -> str:
    """``tests/test_x.py::test_y[a@b-c]`` → ``holecheck.test_x.test_y.a_b-c`` (KCIDB paths: dotted words)."""
    file, _, rest = nodeid.partition("::")
    name, _, param = rest.partition("[")
    words = [ORIGIN, Path(file).stem, *(slug(n) for n in name.split("::"))]
    return ".".join(words + ([slug(param.rstrip("]"))] if param else []))


def kernel_of(result: Result, specs: list[KernelSpec]) -> KernelSpec:
    """The kernel a test ran on: the only one, or the one whose id its parameters name."""
    if len(specs) == 1:
        return specs[0]
    param = result.nodeid.partition("[")[2]
    return max(specs, key=lambda s: len(s.id) if s.id in param else -1)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def document(results: list[Result], specs: list[KernelSpec], run: str, environment: str) -> dict[str, Any]:
    """The KCIDB JSON of a session (``run``: what makes its test ids unique: host and start time)."""
    releases: dict[KernelSpec, str] = {}
    for r in results:  # the release a test's verdict names (the kernel that really ran)
        if r.properties.get("kernel"):
            releases.setdefault(kernel_of(r, specs), r.properties["kernel"])
    data: dict[str, Any] = {"version": {"major": SCHEMA.major, "minor": SCHEMA.minor},
                            "checkouts": [], "builds": [], "tests": []}
    build_ids: dict[KernelSpec, str] = {}
    for spec in specs:
        checkout, build = kernel_records(spec, releases.get(spec, ""))
        if checkout["id"] not in {c["id"] for c in data["checkouts"]}:
            data["checkouts"].append(checkout)
        data["builds"].append(build)
        build_ids[spec] = build["id"]
    for r in results:
        spec = kernel_of(r, specs)
        test: dict[str, Any] = {
            "id": f"{ORIGIN}:{run}:{r.nodeid}", "origin": ORIGIN, "build_id": build_ids[spec],
            "path": kcidb_path(r.nodeid), "status": r.status or "MISS", "comment": r.nodeid,
            "duration": r.seconds, "environment": {"comment": environment},
            "misc": {"nodeid": r.nodeid, "kernel": str(spec), **({"properties": r.properties} if r.properties else {})}}
        if r.started:
            test["start_time"] = iso(r.started)
        if r.known_finding:
            test["comment"] = f"known finding {r.known_finding}: {r.nodeid}"
            test["misc"]["known_finding"] = r.known_finding
        if r.text:
            test["log_excerpt"] = r.text[-EXCERPT:]
        data["tests"].append(test)
    SCHEMA.validate(data)  # jsonschema.ValidationError: a bug here, never a file KernelCI would reject
    return data


class KcidbPlugin:
    """Collects every test's reports and writes the KCIDB file at the end (conftest registers it for ``--kcidb``)."""

    def __init__(self, out: Path, specs: list[KernelSpec], environment: str) -> None:
        self.out, self.specs, self.environment = out, specs, environment
        self.results: dict[str, Result] = {}
        self.run = f"{slug(socket.gethostname())}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"
        self.error = ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record(self.results, report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        try:
            data = document(list(self.results.values()), self.specs, self.run, self.environment)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            tmp.rename(self.out)
        except (OSError, ValueError, jsonschema.ValidationError) as exc:  # never turns a run into a crash
            self.error = str(exc)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        n = len(self.results)
        terminalreporter.write_line(f"holecheck KCIDB: {self.out} ({n} tests)" if not self.error
                                    else f"holecheck KCIDB file not written: {self.error}")
