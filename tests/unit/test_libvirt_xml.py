"""The libvirt backend's domain XML says what QemuVm's command line says (pure function; no libvirt needed)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from suite.targets import vm
from suite.targets.libvirt_vm import QEMU_NS, ROOT_RE, domain_xml


def spec(**kw: object) -> vm.VmSpec:
    base = dict(kernel=Path("/k/vmlinux"), initrd=Path("/k/init.cpio"), cmdline="console=ttyS0 HC_X='a b' <&>",
                console_log=Path("/art/console.log"), qemu="/usr/bin/qemu-system-x86_64",
                shares=(vm.Share("hostroot", Path("/")), vm.Share("artifacts", Path("/art"), writable=True)))
    return vm.VmSpec(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _virtiofsd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "find_virtiofsd", lambda: "/usr/lib/qemu/virtiofsd")


def test_microvm_tcg() -> None:
    dom = ET.fromstring(domain_xml(spec(), "holecheck-l1-x", {"holecheck": Path("/r/port.sock")}))
    assert dom.get("type") == "qemu"
    assert dom.findtext("os/cmdline") == "console=ttyS0 HC_X='a b' <&>"  # escaped, and round-trips
    assert dom.find("os/type").get("machine") == "microvm"
    assert dom.find("features/acpi") is not None
    assert dom.find("cpu").get("mode") == "maximum"
    assert dom.find("memoryBacking/source").get("type") == "memfd"
    fs = dom.findall("devices/filesystem")
    assert [f.find("target").get("dir") for f in fs] == ["hostroot", "artifacts"]
    assert [f.find("binary/cache") is not None for f in fs] == [True, False]  # read-only root: cache=always
    assert all(f.find("address").get("type") == "virtio-mmio" for f in fs)
    chan = dom.find("devices/channel")
    assert chan.find("source").get("mode") == "connect" and chan.find("target").get("name") == "holecheck"
    assert dom.find("devices/serial/source").get("path") == "/art/console.log"
    args = [a.get("value") for a in dom.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-global", "virtio-mmio.force-legacy=false"]


def test_kvm_no_acpi_extra_args() -> None:
    kvm = spec(accel="kvm", acpi=False, extra_args=("-d", "int"))
    dom = ET.fromstring(domain_xml(kvm, "n", {"holecheck": Path("/p")}))
    assert dom.get("type") == "kvm" and dom.find("cpu").get("mode") == "host-passthrough"
    assert dom.find("features/acpi") is None
    assert [a.get("value") for a in dom.iter(f"{{{QEMU_NS}}}arg")][-2:] == ["-d", "int"]


def test_root_names_its_owner() -> None:
    assert ROOT_RE.findall("-object secret,file=/tmp/hclv-4242-ab_c/lib/qemu/x") == ["4242"]
