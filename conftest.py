"""holecheck's pytest plumbing: options, markers, the ``target`` fixture, artifacts, and machine hygiene."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kernels import config_check
from suite import host_knobs, known_findings, memcg, options, thp
from suite.errors import SetupError
from suite.kernelspec import KernelSpec, parse_many
from suite.options import RunOptions
from suite.procs import sigterm_unwinds
from suite.reports.outcomes import artifact_dir_name
from suite.scenario import Scenario
from suite.targets import preflight
from suite.targets.base import Target
from suite.targets.opening import open_target
from suite.verdict import Verdict

pytest_plugins = ("suite.qemu.plugin",)  # --qemu: which QEMUs, their ids, what each offers
ARTIFACTS = ".holecheck"
# What a session keeps on the config (pytest's typed stash): the kernels under test, how scenarios run (one frozen
# RunOptions for every target), and the terminal summary's line per kernel.
KERNELS = pytest.StashKey[list[KernelSpec]]()
OPTIONS = pytest.StashKey[RunOptions]()
KERNEL_LINES = pytest.StashKey[dict[KernelSpec | str, str]]()
MARKERS = {
    "host": "runs scenarios against a kernel (root; host or VM target)",
    "qemu": "starts real QEMU processes",
    "vm": "boots a kernel under test in a VM",
    "power": "proves the suite fails on a known-bad kernel",
    "bench": "benchmark: records numbers, asserts nothing about time",
    "matrix": "a cell of a full cross product beyond its sample: run with --matrix=nightly, and with --matrix=main "
              "on the host only; the self-tests (no --matrix) run the sample",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("holecheck")
    g.addoption("--kernel", action="append", default=[], metavar="SPEC",
                help="kernel under test: host | debian:VERSION | PATH/bzImage | build:LINUX_TREE | "
                     "patched:VERSION:SERIES; repeat or comma-separate for a matrix (default: host)")
    g.addoption("--accel", default="auto", choices=("auto", "kvm", "tcg"), help="accelerator for VMs")
    g.addoption("--backend", default="qemu", choices=("qemu", "libvirt"), help="how L1 VMs are started")
    g.addoption("--trigger", default=None, choices=("auto", "memcg", "drop_caches"),
                help="shrinker trigger (default: the scenario's, memcg-scoped where the kernel allows)")
    g.addoption("--helper-timeout", default="10", metavar="S",
                help="seconds (> 0) before a blocked step is a stall (default 10)")
    g.addoption("--artifacts", default=ARTIFACTS, help="directory for per-test artifacts (default .holecheck/)")
    g.addoption("--report", metavar="DIR", default=None,
                help="write this session's summary.md and index.html (matrix, page maps, reproducers) into DIR")
    g.addoption("--kcidb", metavar="FILE", default=None,
                help="write this session in KernelCI's KCIDB schema (checkouts, builds, tests) into FILE")
    g.addoption("--matrix", default="nightly", choices=("main", "nightly"),
                help="nightly (default): every cell on every kernel and QEMU; main: in L1 VMs (TCG-slow) only a "
                     "sample of the real-QEMU cells, every cell on the host (./holecheck main)")


class _SayAtOnce(logging.Handler):
    """Waits on another holecheck run's lock reach the terminal when they start, through pytest's capture."""

    def __init__(self, config: pytest.Config) -> None:
        super().__init__(logging.WARNING)
        self.config = config

    def emit(self, record: logging.LogRecord) -> None:
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        capture = self.config.pluginmanager.getplugin("capturemanager")
        if reporter is None:  # an xdist worker: its warnings reach the log and the test report only
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(f"holecheck: {record.getMessage()}", yellow=True)


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("suite.locks").addHandler(_SayAtOnce(config))
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if "debian:list" in ",".join(config.getoption("kernel")):
        from kernels import debian

        try:
            print("\n".join(debian.list_versions()))
        except SetupError as exc:
            raise pytest.UsageError(str(exc)) from None
        pytest.exit("those are the Debian kernels --kernel=debian:VERSION can boot", returncode=0)
    try:
        config.stash[KERNELS] = parse_many(config.getoption("kernel"))
        timeout = options.positive_seconds("--helper-timeout", config.option.helper_timeout)
        artifacts = config.getoption("artifacts")
        if artifacts != ARTIFACTS or os.geteuid() == 0:  # unprivileged, only unit tests run: they write none
            options.writable_dir("--artifacts", artifacts)
        config.stash[OPTIONS] = RunOptions(accel=config.getoption("accel"), backend=config.getoption("backend"),
                                           trigger=config.getoption("trigger"), timeout=timeout,
                                           artifacts_root=artifacts)
        config.stash[KERNEL_LINES] = {}
    except SetupError as exc:
        raise pytest.UsageError(str(exc)) from None
    if config.getoption("report") and not hasattr(config, "workerinput"):  # xdist: the controller writes it
        from suite.report import SessionPlugin

        config.pluginmanager.register(
            SessionPlugin(Path(config.getoption("report")), Path(config.getoption("artifacts"))), "holecheck-report")
    if config.getoption("kcidb") and not hasattr(config, "workerinput"):
        from suite.reports.kcidb import KcidbPlugin

        config.pluginmanager.register(KcidbPlugin(Path(config.getoption("kcidb")), config.stash[KERNELS],
                                                  f"accel {config.getoption('accel')}, "
                                                  f"backend {config.getoption('backend')}"), "holecheck-kcidb")
    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so every context manager restores what it changed.
    sigterm_unwinds()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist the controller collects nothing and a worker cannot stop the session cleanly: the
    controller checks what a scenario session needs (xdist runs here are scenario runs) before workers start."""
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        _check(session.config, needs_root=True, needs_qemu=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the selected tests need, checked before any of them starts: root, and every --qemu resolved."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller checked
    items = session.items
    _check(session.config, needs_root=any(_needs(i, ("host", "qemu", "vm"), ("target", "qemu")) for i in items),
           needs_qemu=any(_needs(i, ("qemu", "vm"), ("qemu",)) for i in items))


def _check(config: pytest.Config, needs_root: bool, needs_qemu: bool) -> None:
    if needs_root and (problem := preflight.root_problem()):
        raise pytest.UsageError(problem)
    if needs_root:
        _check_the_one_kernel(config)
    if needs_qemu:
        from suite.qemu.plugin import resolve_all

        resolve_all(config)  # Debian's fetched, each checked: one line for a missing, old or wrong binary


def _needs(item: pytest.Item, markers: tuple[str, ...], fixtures: tuple[str, ...]) -> bool:
    return (any(item.get_closest_marker(m) for m in markers)
            or any(f in getattr(item, "fixturenames", ()) for f in fixtures))


def _check_the_one_kernel(config: pytest.Config) -> None:
    """One kernel to boot: resolved (fetched, its config checked) before any test starts, so that a kernel that
    cannot be had stops the session with one line — also under xdist, whose workers cannot stop it. (Several
    kernels: one that cannot be had fails its own tests, the others run.)"""
    kernels = config.stash[KERNELS]
    if len(kernels) != 1 or kernels[0].kind not in ("debian", "path"):  # host: checked by its target
        return
    from kernels import kernel as kernel_images

    try:
        kernel_images.resolve(kernels[0].kind, kernels[0].value)
    except SetupError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    specs: list[KernelSpec] = metafunc.config.stash[KERNELS]
    if "kernel_spec" in metafunc.fixturenames and len(specs) > 1:
        metafunc.parametrize("kernel_spec", specs, ids=[s.id for s in specs], scope="session")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``), all cells of one kernel go to one worker: one L1 VM per
    kernel, kernels side by side on the machine's cores, host scenarios never racing each other for the knobs.
    Other tests stay with their module, whose module-scoped VMs and builds are then made once.

    ``--matrix=main`` deselects (not skips) the real-QEMU cells outside ``MAIN_L1_SAMPLE``, and those of every
    QEMU but the first, on kernels booted in an L1 VM, where each costs 10-40 s under TCG; the host runs every
    cell with every QEMU."""
    from suite.qemu.plugin import QEMUS  # here, not at the top: pytest imports its plugins itself

    kept, dropped = [], []
    matrix_given = any(a.startswith("--matrix") for a in config.invocation_params.args)
    for item in items:
        spec = item.callspec.params.get("kernel_spec") if hasattr(item, "callspec") else None
        if spec is None and "target" in getattr(item, "fixturenames", ()):
            spec = config.stash[KERNELS][0]
        # host-marked tests that open no target still drive the host's kernel (its knob lock): same group
        group = f"kernel-{spec.id}" if spec is not None else "kernel-host" if item.get_closest_marker("host") \
            else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
        in_vm = spec is not None and spec.kind != "host"
        qemu = item.callspec.params.get("qemu") if hasattr(item, "callspec") else None
        sampled_out = "qemu" in getattr(item, "fixturenames", ()) and (
            not MAIN_L1_SAMPLE.search(item.name) or qemu not in (None, config.stash[QEMUS][0]))
        main = config.getoption("matrix") == "main"
        # a cross product's rest: nightly's everywhere, main's on the host only (an L1 kernel runs the sample)
        product_only = item.get_closest_marker("matrix") is not None and (not matrix_given or (main and in_vm))
        (dropped if product_only or (main and in_vm and sampled_out) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# The real-QEMU cells an L1 kernel runs in the main job: every phase of postcopy and snapshot at max_ptes_none 409
# with the sparse fill (the cells that split), and the negative control; the rest of the cross product is nightly's.
MAIN_L1_SAMPLE = re.compile(r"^test_(postcopy|snapshot)\[(.*-)?shrink@[a-z-]+-mpn409-spread8\b|^test_negative_control")


@pytest.fixture(scope="session")
def kernel_spec(request: pytest.FixtureRequest) -> KernelSpec:
    """The kernel under test (parametrized when --kernel names several)."""
    return getattr(request, "param", None) or request.config.stash[KERNELS][0]


@pytest.fixture(scope="session")
def target_options(request: pytest.FixtureRequest) -> RunOptions:
    return request.config.stash[OPTIONS]


@pytest.fixture(scope="session")
def _targets(request: pytest.FixtureRequest) -> Iterator[dict[KernelSpec, Target | SetupError]]:
    opened: dict[KernelSpec, Target | SetupError] = {}
    yield opened
    for t in opened.values():
        if not isinstance(t, SetupError):
            t.close()


@pytest.fixture(scope="session")
def target(kernel_spec: KernelSpec, target_options: RunOptions, request: pytest.FixtureRequest,
           _targets: dict[KernelSpec, Target | SetupError]) -> Target:
    """Where scenarios run. A kernel that cannot run them stops the session with one line (one kernel) or
    fails that kernel's tests with it (a matrix)."""
    if kernel_spec not in _targets:
        try:
            _targets[kernel_spec] = t = open_target(kernel_spec, target_options)
            request.config.stash[KERNEL_LINES][kernel_spec] = describe(t)
        except SetupError as exc:
            _targets[kernel_spec] = exc
    t = _targets[kernel_spec]
    if kernel_spec.kind == "host" and not isinstance(t, SetupError):
        # after opening (which changes no knob): a host that cannot run scenarios says so without queuing for
        # the knob lock behind another run
        request.getfixturevalue("_host_left_as_found")
    if isinstance(t, SetupError):
        # one kernel: stop with the one line; an xdist worker cannot stop the session (INTERNALERROR): it fails
        if len(request.config.stash[KERNELS]) == 1 and not hasattr(request.config, "workerinput"):
            pytest.exit(f"holecheck: {t}", returncode=4)  # the one line that says it (no summary line repeats it)
        request.config.stash[KERNEL_LINES][kernel_spec] = f"unusable: {t}"
        pytest.fail(f"{kernel_spec}: {t}", pytrace=False)
    return t


def describe(t: Target) -> str:
    """One line per kernel for the terminal summary: what it is and what it offers the scenarios."""
    f = t.features()
    boot = getattr(t, "boot_seconds", None)
    parts = [t.kernel_release, f"booted in {boot:.1f} s" if boot else "",
             "underused-THP shrinker" if f["shrink_underused"] else "no underused shrinker: no split expected",
             "soft-dirty" if f["soft_dirty"] else "no soft-dirty"]
    kernel = getattr(t, "kernel", None)  # a booted kernel's config: what it lacks is skipped, never a failure
    lacks = config_check.missing_optional(kernel.config) if kernel is not None and kernel.config else []
    return ", ".join(p for p in parts if p) + "".join(f"\n  warning: {line}" for line in lacks)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the kernel lines to the controller
        summary = session.config.stash.get(KERNEL_LINES, {})
        session.config.workeroutput["holecheck_summary"] = {str(k): v for k, v in summary.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """xdist controller: collect each worker's kernel lines for the terminal summary."""
    config = node.config  # type: ignore[attr-defined]
    lines = getattr(node, "workeroutput", {}).get("holecheck_summary", {})
    config.stash.setdefault(KERNEL_LINES, {}).update(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for spec, line in config.stash.get(KERNEL_LINES, {}).items():
        terminalreporter.write_line(f"holecheck kernel {spec}: {line}")


@pytest.fixture(scope="session")
def _host_left_as_found() -> Iterator[None]:
    """Belt and braces over the per-scenario context managers: THP knobs and cgroups as found.

    Taken by the ``target`` fixture for the host kernel only: an L1 VM's scenarios set the guest's own knobs,
    and a unit-test session, a bisect step or a run on another kernel must not queue behind a host run."""
    if not thp.SYSFS.exists():
        yield
        return
    with thp.exclusive():  # under the lock: no other run's scenario has the knobs changed right now
        saved = host_knobs.now()
    for stale in memcg.leftovers():
        with contextlib.suppress(OSError):
            stale.rmdir()
    yield
    for left in memcg.leftovers():
        with contextlib.suppress(OSError):
            left.rmdir()
    with thp.exclusive():
        changed = host_knobs.differences(saved, host_knobs.now())
        if changed:  # a bug of holecheck's: fail the session naming the knob, then put it back
            host_knobs.restore(saved)
    if changed:
        pytest.fail("holecheck left host knobs changed (restored now): " + "; ".join(changed), pytrace=False)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """A fresh directory for this test's artifacts: <--artifacts>/<test id>/ (emptied: no stale evidence)."""
    path = Path(request.config.getoption("artifacts")) / artifact_dir_name(request.node.nodeid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def run(target: Target, artifacts: Path, request: pytest.FixtureRequest) -> Callable[[Scenario], Verdict]:
    """Run a scenario on the target under test, with this test's artifacts directory; real-QEMU guests are
    sized for the target (256 MiB, 128 MiB inside a TCG L1) and run this test's ``qemu``."""

    def _run(scenario: Scenario) -> Verdict:
        if scenario.synthetic:
            return target.run(scenario, artifacts)
        if scenario.size_mib > target.l2_ram_mib:
            scenario = replace(scenario, size_mib=target.l2_ram_mib)
        return target.run(scenario, artifacts, qemu=request.getfixturevalue("qemu"))

    return _run


@pytest.fixture(scope="session")
def kernel_features(target: Target) -> dict[str, bool]:
    """What the kernel under test offers (soft_dirty, shrink_underused), answered by that kernel."""
    return target.features()


@pytest.fixture
def check_verdict(artifacts: Path, record_property: Callable[[str, object], None],
                  kernel_features: dict[str, bool]) -> Callable[[Verdict], None]:
    """Save a verdict, put its key figures into the JUnit XML, and fail with its message if it has findings —
    unless they lie within the signature of a known, unfixed kernel bug due in this cell (``suite.known_findings``):
    then xfail; pages beyond it fail, named; and fail if that bug does not show."""

    def check(verdict: Verdict, must_pass: bool = True) -> None:
        """``must_pass=False``: a negative control records its (failing) verdict; the test judges it."""
        (artifacts / "verdict.json").write_text(verdict.to_json())
        record_property("kernel", verdict.kernel)
        record_property("split_expected", verdict.split_expected)
        for kind in {f.kind for f in verdict.findings}:
            record_property(kind, sum(f.count for f in verdict.findings if f.kind == kind))
        if not must_pass:
            return
        known = known_findings.applying(verdict, kernel_features)
        if known:
            names = ", ".join(k.name for k in known)
            record_property("known_finding", names)
            if verdict.ok:
                pytest.fail(f"{verdict.scenario} on kernel {verdict.kernel}: the known finding {names} is due in "
                            f"this cell ({'; '.join(k.measured for k in known)}) but did not show: fixed? then "
                            f"drop or narrow it in suite/known_findings.py", pytrace=False)
            if not (extra := known_findings.beyond(verdict, known)):
                pytest.xfail(f"known finding {names} (suite/known_findings.py): "
                             f"{'; '.join(k.summary for k in known)}\n{verdict.failure_message()}")
            pytest.fail(f"{verdict.failure_message()}\n  beyond the known finding {names}:\n"
                        + "\n".join(f"    {f.message()}" for f in extra) + f"\n  artifacts: {artifacts}",
                        pytrace=False)
        if not verdict.ok:
            pytest.fail(verdict.failure_message() + f"\n  artifacts: {artifacts}", pytrace=False)

    return check
