"""``--backend``: which implementation of ``vm.Vm`` boots an L1 VM — QEMU directly (``vm.QemuVm``) or a transient
libvirt domain (``libvirt_vm.LibvirtVm``, imported only when asked for: a qemu run needs no libvirt-python)."""
from __future__ import annotations

from ..errors import SetupError
from .vm import QemuVm, Vm, VmSpec

BACKENDS = ("qemu", "libvirt")


def open_vm(spec: VmSpec, backend: str = "qemu") -> Vm:
    """A started VM (call ``stop()``, or use ``with``); a failed start stops what it started."""
    if backend == "libvirt":
        from .libvirt_vm import LibvirtVm
        return LibvirtVm(spec).start()
    if backend != "qemu":
        raise SetupError(f"--backend={backend}: unknown, choose one of {', '.join(BACKENDS)}")
    return QemuVm(spec).start()
