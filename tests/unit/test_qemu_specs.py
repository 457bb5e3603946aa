"""--qemu specs and Debian's QEMU versions, on the qemu-system-x86 versions Debian's mirror served on 2026-12-03."""
from __future__ import annotations

from pathlib import Path

import pytest

from kernels import qemu
from kernels.packages import Stanza
from suite.errors import SetupError
from suite.qemu import binary as qemu_binary
from suite.qemu.binary import QemuSpec
from suite.scenario import Scenario, postcopy

DATA = Path(__file__).parent.parent / "data" / "debian-qemu-versions.txt"


@pytest.fixture(scope="module")
def stanzas() -> list[Stanza]:
    rows = [ln.split("\t") for ln in DATA.read_text().splitlines() if ln and not ln.startswith("#")]
    return [Stanza("qemu-system-x86", version, suite) for suite, version in rows]


@pytest.mark.parametrize(("text", "suite", "version"), [
    ("10.0.2", "bookworm-backports", "1:10.0.2+ds-2+deb13u1~bpo12+1"),  # the host's release beats trixie-security
    ("11.1.3", "trixie-backports", "1:11.1.3+ds-2~bpo13+1"),
    ("11.1.2", "forky", "1:11.1.2+ds-3"),
    ("newest", "trixie-backports", "1:11.1.3+ds-2~bpo13+1"),
    ("7.2", "bookworm", "1:7.2+dfsg-7+deb12u18+b3"),  # Debian's 7.2 package names no micro version
    ("1:10.0.2+ds-2+deb13u1", "trixie-security", "1:10.0.2+ds-2+deb13u1"),  # a Debian version picks exactly
])
def test_select_picks_the_version_and_prefers_the_hosts_release(stanzas, text, suite, version):
    got = qemu.select(text, stanzas, host="bookworm")
    assert (got.suite, got.version) == (suite, version)


def test_an_unknown_version_selects_nothing_and_the_error_lists_what_is_there(stanzas):
    assert qemu.select("9.9", stanzas, host="bookworm") is None
    assert qemu.versions_line(stanzas).startswith("7.2 (")
    assert "11.1.3 (trixie-backports)" in qemu.versions_line(stanzas)


def test_upstream_versions():
    assert qemu.upstream("1:10.0.2+ds-2+deb13u1~bpo12+1") == "10.0.2"
    assert qemu.upstream("1:7.2+dfsg-7+deb12u18+b3") == "7.2"
    assert qemu.upstream("11.1.3~rc1-1") == "11.1.3"


def test_wrappers_give_each_qemu_its_modules_and_firmware_and_a_root_its_loader(tmp_path):
    tree = qemu.wrapper(tmp_path, "tree", "x")
    assert f"QEMU_MODULE_DIR={tmp_path}/tree/usr/lib/x86_64-linux-gnu/qemu" in tree
    assert f"-L {tmp_path}/tree/usr/share/qemu" in tree and "ld-linux" not in tree
    root = qemu.wrapper(tmp_path, "root", "x")
    assert f"exec {tmp_path}/root/usr/lib64/ld-linux-x86-64.so.2 --inhibit-cache --library-path" in root


def test_qemu_specs_parse_repeat_and_dedupe():
    specs = qemu_binary.parse_many(["debian:10.0.2,system", "qemu-system-x86_64", "/opt/q/qemu-system-x86_64"])
    assert specs == [QemuSpec("debian", "10.0.2"), QemuSpec("system"), QemuSpec("path", "/opt/q/qemu-system-x86_64")]
    assert [str(s) for s in specs] == ["debian:10.0.2", "system", "/opt/q/qemu-system-x86_64"]
    assert qemu_binary.parse_many([]) == [QemuSpec("system")]
    with pytest.raises(SetupError, match="missing version"):
        qemu_binary.parse("debian:")


def test_a_variant_is_scenario_data_and_names_the_scenario():
    s = postcopy("precopy-done", variant="multifd")
    assert s.id == "postcopy[multifd-shrink@precopy-done-mpn409-spread8]"
    assert Scenario.from_json(s.to_json()) == s
    assert postcopy("precopy-done").id == "postcopy[shrink@precopy-done-mpn409-spread8]"  # unchanged
    with pytest.raises(ValueError, match="no migration variant"):
        postcopy("precopy-done", variant="rdma")
