"""The kernel under test booted in an L1 VM (real QEMU, real Debian kernels, no mocks): the agent answers, a
scenario runs inside and its verdict comes back; bad kernels fail fast with one clear message."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from machine_state import processes_mentioning

from suite import scenario as sc
from suite.errors import SetupError
from suite.kernelspec import KernelSpec
from suite.options import RunOptions
from suite.targets.guest import BootOptions, GuestTarget

pytestmark = [pytest.mark.vm, pytest.mark.qemu]

# The newest generic 6.12 from bookworm-backports (has the underused-THP shrinker) and the newest 6.1 (has not).
KERNELS = ["newest-6.12+deb12", "newest-6.1"]
PANIC_DEADLINE = 60.0


def _prerequisites() -> str:
    if os.geteuid() != 0:
        return "booting L1 VMs needs root (virtiofsd)"
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return ""


@pytest.fixture(scope="module", autouse=True)
def _vm_capable() -> None:
    if reason := _prerequisites():
        pytest.skip(reason)


@pytest.fixture(scope="module", params=KERNELS, ids=lambda v: f"debian-{v}")
def guest(request: pytest.FixtureRequest) -> Iterator[GuestTarget]:
    target = GuestTarget(KernelSpec("debian", request.param), RunOptions())
    yield target
    target.close()


def test_agent_reports_the_booted_release(guest: GuestTarget) -> None:
    assert guest.kernel_release == guest.kernel.release  # the hello
    assert guest.call("uname")["release"] == guest.kernel.release
    assert "pong" in guest.call("ping")
    features = guest.call("features")  # asked of the guest kernel, not the host's
    assert features["soft_dirty"] is True  # Debian's 6.1 and 6.12 have CONFIG_MEM_SOFT_DIRTY (the host may not)
    assert features["shrink_underused"] == (not guest.kernel.release.startswith("6.1."))
    assert 0 < guest.boot_seconds < 60


def test_synthetic_scenario_runs_in_the_guest(guest: GuestTarget) -> None:
    scenario = dataclasses.replace(sc.postcopy_style("after-discard", "after-place"), size_mib=8)
    verdict = guest.run(scenario)
    assert verdict.kernel == guest.kernel.release
    assert verdict.ok, verdict.failure_message()
    assert [p.phase for p in verdict.phases][-1] == "verify"
    if guest.kernel.release.startswith("6.1."):  # no underused-THP shrinker: a baseline where nothing splits
        assert not verdict.split_expected and verdict.no_split_reason, verdict.summary()
    else:
        assert verdict.split_expected, verdict.summary()
        assert verdict.shrinks[0]["thp_after"] < verdict.shrinks[0]["thp_before"], verdict.summary()


def test_missing_kernel_path_is_one_line_setup_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError) as err:
        GuestTarget(KernelSpec("path", str(tmp_path / "bzImage")), RunOptions())
    assert "no such kernel image" in str(err.value)
    assert "\n" not in str(err.value)


def test_config_lacking_options_is_named_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOLECHECK_CACHE", str(tmp_path / "cache"))
    image = bytearray(4096)  # a bzImage's setup header and nothing else: never gets as far as booting
    image[0x1F1], image[0x202:0x206] = 1, b"HdrS"
    (tmp_path / "vmlinuz-9.9.9-test").write_bytes(bytes(image))
    (tmp_path / "config-9.9.9-test").write_text("CONFIG_TRANSPARENT_HUGEPAGE=y\n# CONFIG_USERFAULTFD is not set\n")
    with pytest.raises(SetupError) as err:
        GuestTarget(KernelSpec("path", str(tmp_path / "vmlinuz-9.9.9-test")), RunOptions())
    lines = str(err.value).splitlines()
    assert "CONFIG_USERFAULTFD is not set: holecheck needs =y" in [ln.strip() for ln in lines]
    assert not any("TRANSPARENT_HUGEPAGE" in ln for ln in lines)


def test_kernel_panic_fails_fast_with_console_tail(tmp_path: Path) -> None:
    """No /init in the initramfs → 'VFS: Unable to mount root fs' panic; reported at once, not at the timeout."""
    boot = BootOptions(artifacts_root=tmp_path, extra_cmdline=("rdinit=/no-such-init",))
    t0 = time.monotonic()
    with pytest.raises(SetupError) as err:
        GuestTarget(KernelSpec("debian", KERNELS[0]), RunOptions(), boot)
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "Kernel panic - not syncing" in message.splitlines()[0]
    assert "console" in message and len(message.splitlines()) > 3  # the tail came along
    assert elapsed < PANIC_DEADLINE, f"took {elapsed:.1f} s"
    assert not processes_mentioning([str(tmp_path)]), "QEMU or virtiofsd outlived the failed boot"


def test_init_failure_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6.1 needs virtio modules: an initramfs without them cannot mount the host's root; /init says so."""
    from kernels import kernel

    monkeypatch.setattr(kernel, "needed_modules", lambda config, machine: [])
    t0 = time.monotonic()
    with pytest.raises(SetupError) as err:
        GuestTarget(KernelSpec("debian", KERNELS[1]), RunOptions(), BootOptions(artifacts_root=tmp_path))
    first = str(err.value).splitlines()[0]  # the reason itself, before the console tail
    assert "holecheck-init: [" in first and "FAILED: mount -t virtiofs" in first, first
    assert time.monotonic() - t0 < PANIC_DEADLINE
    assert not processes_mentioning([str(tmp_path)])


def _copy_checkout(dest: Path) -> None:
    """The project's files as a fresh clone would have them (tracked and new, not ignored), with a venv of its
    own: site-packages copied from ours minus our editable install, so `suite` resolves to the copy."""
    import subprocess
    import sys

    project = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (project / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, dest / rel)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest / ".venv")], check=True, timeout=120)
    ours = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    theirs = next((dest / ".venv").glob("lib/python3*/site-packages"))
    shutil.copytree(ours, theirs, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("__editable__*", "holecheck-*", "__pycache__"))


def test_checkout_anywhere_boots() -> None:
    """A checkout under /tmp (the guest mounts its own tmpfs there), in a directory with a space, reached
    through a symlink, with its venv inside and its cache under /dev/shm: the L1 VM still sees all three."""
    import subprocess
    import tempfile

    real = Path(tempfile.mkdtemp(prefix="holecheck clone ", dir="/tmp"))
    link = Path(tempfile.mkdtemp(prefix="holecheck-link-", dir="/run")) / "checkout"
    cache = Path(tempfile.mkdtemp(prefix="holecheck-cache-", dir="/dev/shm"))
    try:
        _copy_checkout(real)
        link.symlink_to(real)
        ours = Path(os.environ.get("HOLECHECK_CACHE") or Path.home() / ".cache" / "holecheck")
        for shared in ("apt", "kernels", "images"):  # host-side only: no second download of the kernel
            if (ours / shared).exists():
                (cache / shared).symlink_to(ours / shared)
        cell = "tests/test_synthetic.py::test_postcopy_style[register@after-discard-shrink@after-place-mpn409]"
        proc = subprocess.run(
            [str(link / ".venv/bin/python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
             f"--kernel=debian:{KERNELS[0]}", cell], cwd=link, capture_output=True, text=True, timeout=900,
            env={**os.environ, "HOLECHECK_CACHE": str(cache)}, check=False)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    finally:
        shutil.rmtree(real, ignore_errors=True)
        shutil.rmtree(link.parent, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
