"""holecheck's pytest plumbing for ``--qemu``: which QEMUs the real-QEMU tests run, their ids, what each offers.

``--qemu=system|debian:VERSION|debian:newest|PATH``, repeated or comma-separated. With one QEMU the tests' ids are
those of a run without ``--qemu``; with several, every test that uses the ``qemu`` fixture runs once per QEMU and
its id ends in the QEMU's version (``[...-qemu-11.1.3]``). The terminal summary names each QEMU with its version,
what it offers (``qemu_offers``) and what the tests learnt about it (``qemu_note``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from . import qemu_binary
from .errors import SetupError
from .qemu_binary import QemuSpec

if TYPE_CHECKING:  # the probe starts QEMU through suite.machine: imported only by sessions that run QEMU
    from .qemu_offers import Offers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("holecheck").addoption(
        "--qemu", action="append", default=[], metavar="SPEC",
        help="QEMU for the L2 RAM machines: system | debian:VERSION | debian:newest | PATH; repeat or "
             "comma-separate to run the real-QEMU tests on each (default: system)")


def pytest_configure(config: pytest.Config) -> None:
    config.holecheck_qemus = qemu_binary.parse_many(config.getoption("qemu"))  # type: ignore[attr-defined]
    config.holecheck_qemu_summary = {}  # type: ignore[attr-defined]
    config.holecheck_qemu_notes = {}  # type: ignore[attr-defined]


def _specs(config: pytest.Config) -> list[QemuSpec]:
    return config.holecheck_qemus  # type: ignore[attr-defined,no-any-return]


def _resolve(spec: QemuSpec) -> str:
    try:
        return qemu_binary.resolve(spec)
    except SetupError as exc:
        raise pytest.UsageError(f"--qemu={spec}: {exc}") from None


def ids(specs: list[QemuSpec]) -> list[str]:
    """``qemu-VERSION`` per spec; two of the same version also say which kind (``qemu-7.2.22-debian``)."""
    versions = [".".join(map(str, qemu_binary.check(_resolve(s)))) for s in specs]
    return [f"qemu-{v}" + (f"-{s.kind}" if versions.count(v) > 1 else "") for s, v in zip(specs, versions, strict=True)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    specs = _specs(metafunc.config)
    if "qemu" in metafunc.fixturenames and len(specs) > 1:
        metafunc.parametrize("qemu", specs, ids=ids(specs), indirect=True, scope="session")


def resolve_all(config: pytest.Config) -> None:
    """Every --qemu resolved (Debian's fetched) and checked; conftest calls it before any test that needs QEMU
    starts (on the xdist controller, where a failure can still stop the session with one line)."""
    for spec in _specs(config):
        _resolve(spec)


@pytest.fixture(scope="session")
def qemu(request: pytest.FixtureRequest) -> str:
    """The QEMU the real-migration scenarios run (parametrized when --qemu names several), resolved and checked."""
    spec: QemuSpec = getattr(request, "param", None) or _specs(request.config)[0]
    path = _resolve(spec)
    summary = request.config.holecheck_qemu_summary  # type: ignore[attr-defined]
    if str(spec) not in summary:
        summary[str(spec)] = describe(path)
    return path


def describe(path: str) -> str:
    """The summary line: version, what it offers, and for Debian's how it is kept (tree or own root)."""
    from kernels import qemu as debian_qemu

    from .qemu_offers import probe

    line = probe(path).line()
    if made := debian_qemu.describe(path):
        size = int(made.get("bytes", 0)) >> 20  # type: ignore[call-overload]
        how = "own root" if made.get("kind") == "root" else "unpacked"
        line += f"; {made.get('suite')}, {how} {size} MB (made in {made.get('seconds')} s)"
    return line


@pytest.fixture(scope="session")
def qemu_offers(qemu: str) -> Offers:
    """What the QEMU under test offers (variants it accepts, /dev/userfaultfd, …), asked of it once."""
    from .qemu_offers import probe

    return probe(qemu)


@pytest.fixture
def qemu_note(qemu: str, request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add what a test learnt about this QEMU to its terminal summary line (e.g. how it handles a missing page)."""
    spec = next((str(s) for s in _specs(request.config) if qemu_binary.resolve(s) == qemu), qemu)
    notes = request.config.holecheck_qemu_notes  # type: ignore[attr-defined]
    return lambda text: notes.setdefault(spec, []).append(text) if text not in notes.get(spec, []) else None


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the QEMU lines to the controller
        session.config.workeroutput["holecheck_qemu"] = {
            "summary": session.config.holecheck_qemu_summary,  # type: ignore[attr-defined]
            "notes": session.config.holecheck_qemu_notes}  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    config = node.config  # type: ignore[attr-defined]
    got = getattr(node, "workeroutput", {}).get("holecheck_qemu", {})
    config.holecheck_qemu_summary.update(got.get("summary", {}))
    for spec, notes in got.get("notes", {}).items():
        mine = config.holecheck_qemu_notes.setdefault(spec, [])
        mine += [n for n in notes if n not in mine]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    notes = getattr(config, "holecheck_qemu_notes", {})
    for spec, line in getattr(config, "holecheck_qemu_summary", {}).items():
        terminalreporter.write_line(f"holecheck qemu {spec}: {'; '.join([line, *notes.get(spec, [])])}")
