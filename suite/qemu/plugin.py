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

from ..errors import SetupError
from . import binary
from .binary import QemuSpec

if TYPE_CHECKING:  # the probe starts QEMU through suite.qemu.machine: imported only by sessions that run QEMU
    from .offers import Offers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("holecheck").addoption(
        "--qemu", action="append", default=[], metavar="SPEC",
        help="QEMU for the L2 RAM machines: system | debian:VERSION | debian:newest | PATH; repeat or "
             "comma-separate to run the real-QEMU tests on each (default: system)")


# What this plugin keeps on the config (pytest's stash, typed): the --qemu specs, and per spec its summary line
# and what tests learnt about it (xdist workers hand both to the controller).
QEMUS = pytest.StashKey[list[QemuSpec]]()
QEMU_SUMMARY = pytest.StashKey[dict[str, str]]()
QEMU_NOTES = pytest.StashKey[dict[str, list[str]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[QEMUS] = binary.parse_many(config.getoption("qemu"))
    config.stash[QEMU_SUMMARY] = {}
    config.stash[QEMU_NOTES] = {}


def _specs(config: pytest.Config) -> list[QemuSpec]:
    return config.stash[QEMUS]


def _resolve(spec: QemuSpec) -> str:
    try:
        return binary.resolve(spec)
    except SetupError as exc:
        raise pytest.UsageError(f"--qemu={spec}: {exc}") from None


def ids(specs: list[QemuSpec]) -> list[str]:
    """``qemu-VERSION`` per spec; two of the same version also say which kind (``qemu-7.2.22-debian``)."""
    versions = [".".join(map(str, binary.check(_resolve(s)))) for s in specs]
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
    summary = request.config.stash[QEMU_SUMMARY]
    if str(spec) not in summary:
        summary[str(spec)] = describe(path)
    return path


def describe(path: str) -> str:
    """The summary line: version, what it offers, and for Debian's how it is kept (tree or own root)."""
    from kernels import qemu as debian_qemu

    from .offers import probe

    line = probe(path).line()
    if made := debian_qemu.describe(path):
        size = int(made.get("bytes", 0)) >> 20  # type: ignore[call-overload]
        how = "own root" if made.get("kind") == "root" else "unpacked"
        line += f"; {made.get('suite')}, {how} {size} MB (made in {made.get('seconds')} s)"
    return line


@pytest.fixture(scope="session")
def qemu_offers(qemu: str) -> Offers:
    """What the QEMU under test offers (variants it accepts, /dev/userfaultfd, …), asked of it once."""
    from .offers import probe

    return probe(qemu)


@pytest.fixture
def qemu_note(qemu: str, request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add what a test learnt about this QEMU to its terminal summary line (e.g. how it handles a missing page)."""
    spec = next((str(s) for s in _specs(request.config) if binary.resolve(s) == qemu), qemu)
    notes = request.config.stash[QEMU_NOTES]
    return lambda text: notes.setdefault(spec, []).append(text) if text not in notes.get(spec, []) else None


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the QEMU lines to the controller
        session.config.workeroutput["holecheck_qemu"] = {
            "summary": session.config.stash[QEMU_SUMMARY], "notes": session.config.stash[QEMU_NOTES]}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    config = node.config  # type: ignore[attr-defined]
    got = getattr(node, "workeroutput", {}).get("holecheck_qemu", {})
    config.stash[QEMU_SUMMARY].update(got.get("summary", {}))
    for spec, notes in got.get("notes", {}).items():
        mine = config.stash[QEMU_NOTES].setdefault(spec, [])
        mine += [n for n in notes if n not in mine]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    notes = config.stash.get(QEMU_NOTES, {})
    for spec, line in config.stash.get(QEMU_SUMMARY, {}).items():
        terminalreporter.write_line(f"holecheck qemu {spec}: {'; '.join([line, *notes.get(spec, [])])}")
