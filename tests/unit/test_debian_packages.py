"""Debian kernels by version on real captured ``Packages`` data: resolution across suites and series, the one
version order, ``newest*``, the split packaging's parts, the listing; unpacking real .debs (built with
``dpkg-deb -b``) into the cache layout; the apt lock that names its holder; a corrupt cached .deb fetched again
(a real 2 KB download, skipped with its reason when holecheck's apt lists or Debian's mirror are not there).

``tests/data/debian-packages/SUITE.Packages`` are the kernel stanzas (Package/Version/Depends) of bookworm-backports,
trixie-backports and forky as Debian's mirror served them on 2026-12-03 (tests/data/capture_debian_packages.py;
the cloud parts of 7.3.4+deb13 and 7.2.12+deb14 added by it on 2026-12-07, the rest unchanged). The mirror still
lists 20 trixie-backports images (6.18.5 … 7.1.13) whose linux-base/-modules it no longer carries: not fetchable.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels import debian, packages, versions
from kernels.apt import Apt, check_deb
from suite import bisect as bs
from suite import locks
from suite.errors import SetupError, StallError

DATA = Path(__file__).resolve().parent.parent / "data" / "debian-packages"
SUITES = ("bookworm-backports", "trixie-backports", "forky")


@pytest.fixture(scope="module")
def index() -> packages.KernelIndex:
    return packages.KernelIndex(s for suite in SUITES for s in packages.parse((DATA / f"{suite}.Packages").read_text(),
                                                                              suite))


def pick(index: packages.KernelIndex, spec: str) -> str | None:
    return versions.select(versions.parse_spec(spec), index.images())


@pytest.mark.parametrize(("spec", "package"), [
    ("7.3.4", "linux-image-7.3.4+deb13-amd64"),
    ("7.3.4-cloud", "linux-image-7.3.4+deb13-cloud-amd64"),
    ("6.16.3", "linux-image-6.16.3+deb13-amd64"),  # the first trixie-backports kernel
    ("6.19.14", "linux-image-6.19.14+deb13-amd64"),
    ("6.12.90", "linux-image-6.12.90+deb12.1-amd64"),  # the newest rebuild of one upstream version
    ("6.12.90+deb12", "linux-image-6.12.90+deb12-amd64"),
    ("7.2.12", "linux-image-7.2.12+deb13-amd64"),  # trixie-backports' build before forky's
    ("7.2.12+deb14", "linux-image-7.2.12+deb14-amd64"),
    ("newest", "linux-image-7.3.4+deb13-amd64"),
    ("newest-cloud", "linux-image-7.3.4+deb13-cloud-amd64"),
    ("newest-7.3", "linux-image-7.3.4+deb13-amd64"),
    ("newest-7.0", "linux-image-7.0.13+deb13-amd64"),
    ("newest-6.18", "linux-image-6.18.15+deb13-amd64"),  # numeric: .15 after .5 and .9
    ("newest-6.1", None),  # no 6.1 in these three suites
    ("newest-6.12", "linux-image-6.12.95+deb12-amd64"),
    ("newest-6.12+deb12", "linux-image-6.12.95+deb12-amd64"),
    ("newest-7.2+deb14", "linux-image-7.2.12+deb14-amd64"),
    ("newest-7.2", "linux-image-7.2.12+deb13-amd64"),
    ("7.3.5", None),
])
def test_spec_resolves_across_suites_and_series(index: packages.KernelIndex, spec: str, package: str | None) -> None:
    assert pick(index, spec) == package


def test_every_suite_is_read(index: packages.KernelIndex) -> None:
    assert index.suites("linux-image-6.12.95+deb12-amd64") == ["bookworm-backports"]
    assert index.suites("linux-image-7.3.4+deb13-amd64") == ["trixie-backports"]
    assert index.suites("linux-image-7.2.12+deb14-amd64") == ["forky"]
    assert index.stanza("linux-image-7.3.4+deb13-amd64").version == "7.3.4-1~bpo13+1"


def test_version_order_across_series(index: packages.KernelIndex) -> None:
    order = ["6.1.0-9", "6.1.0-56", "6.12.9+deb12", "6.12.90+deb12", "6.12.90+deb12.1", "6.12.90+deb13",
             "6.12.118+deb12", "6.16.3+deb13", "6.16.12+deb13", "6.19.14+deb13", "7.0.4+deb13", "7.2.12+deb13",
             "7.2.12+deb14", "7.3.4+deb13"]
    assert sorted(reversed(order), key=versions.abi_key) == order
    assert versions.series("6.1.0-56") == "6.1" and versions.series("7.3.4+deb13") == "7.3"
    generic = [a for a in debian.abis(index) if not a.endswith("-cloud")]
    assert generic == sorted(generic, key=versions.abi_key)
    assert generic.index("6.19.14+deb13") + 1 == generic.index("7.0.4+deb13")


def test_bisect_walks_the_same_order_across_series(index: packages.KernelIndex) -> None:
    abis = bs.generic_abis(debian.abis(index))
    plan = bs.make_plan(abis, "debian:6.19.13", "debian:7.0.7", first_good=False)
    assert [c.abi for c in plan.candidates] == ["6.19.13+deb13", "6.19.14+deb13", "7.0.4+deb13", "7.0.7+deb13"]
    assert [c.upstream for c in bs.preferred_builds(abis)][-3:] == ["7.2.11", "7.2.12", "7.3.4"]
    assert bs.resolve_endpoint("debian:7.2.12", abis).abi == "7.2.12+deb13"  # the same pick as --kernel


def test_split_packaging_parts(index: packages.KernelIndex) -> None:
    parts = index.parts("linux-image-7.3.4+deb13-amd64")
    assert [p.package for p in parts] == ["linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64",
                                          "linux-modules-7.3.4+deb13-amd64"]
    assert {p.suite for p in parts} == {"trixie-backports"} and {p.version for p in parts} == {"7.3.4-1~bpo13+1"}
    forky = index.parts("linux-image-7.2.12+deb14-amd64")
    assert [p.suite for p in forky] == ["forky"] * 3
    old = index.parts("linux-image-6.16.3+deb13-amd64")  # the old packaging: the image holds everything
    assert [p.package for p in old] == ["linux-image-6.16.3+deb13-amd64"]


def test_split_part_missing_from_every_suite_is_named(index: packages.KernelIndex) -> None:
    image = index.stanza("linux-image-7.3.4+deb13-amd64")
    lone = packages.KernelIndex([image])
    with pytest.raises(LookupError, match=re.escape("linux-modules-7.3.4+deb13-amd64")):
        lone.parts(image.package)


def test_depends_field() -> None:
    assert packages.depends("dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
                            "linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)") == (
        "dracut", "initramfs-tools", "linux-initramfs-tool", "linux-base-7.3.4+deb13-amd64")


def test_one_package_in_two_versions_takes_dpkgs_newest() -> None:
    name = "linux-image-6.1.0-56-amd64"
    index = packages.KernelIndex([packages.Stanza(name, "6.1.192-2", "bookworm-security"),
                                  packages.Stanza(name, "6.1.192-10", "bookworm")])
    assert index.stanza(name).version == "6.1.192-10"  # not string order
    assert index.suites(name) == ["bookworm-security", "bookworm"]


def test_listing_is_one_line_per_series(index: packages.KernelIndex) -> None:
    lines = debian.series_lines(index)
    assert "7.3: 7.3.4+deb13 (trixie-backports)" in lines
    assert "7.2: 7.2.6+deb13, 7.2.9+deb13, 7.2.11+deb13, 7.2.12+deb13 (trixie-backports), 7.2.12+deb14 (forky)" in lines
    assert [ln.split(":")[0] for ln in lines] == ["6.12", "6.16", "6.17", "6.18", "6.19", "7.0", "7.1", "7.2", "7.3",
                                                  "newest", "not fetchable"]
    assert lines[-2].startswith("newest: 7.3.4+deb13;")


def test_listing_marks_what_cannot_be_fetched_and_why(index: packages.KernelIndex) -> None:
    lines = debian.series_lines(index)
    assert ("6.18: 6.18.5+deb13, 6.18.9+deb13, 6.18.12+deb13, 6.18.15+deb13 (trixie-backports; not fetchable: "
            "linux-base-* gone from the archive)") in lines
    assert ("7.1: 7.1.3+deb13, 7.1.7+deb13, 7.1.8+deb13, 7.1.13+deb13 (trixie-backports; not fetchable: "
            "linux-base-*, linux-modules-* gone from the archive)") in lines
    assert lines[-1] == "not fetchable: 20 of 42 versions; newest-* and bisection skip them"
    gone = debian.unfetchable(index)
    generic = sorted((a for a in gone if not a.endswith("-cloud")), key=versions.abi_key)
    assert (len(generic), generic[0], generic[-1]) == (20, "6.18.5+deb13", "7.1.13+deb13")
    assert "7.3.4+deb13-cloud" not in gone and "6.16.3+deb13" not in gone  # split parts there; old packaging
    assert index.missing("linux-image-6.19.14+deb13-amd64") == ["linux-base-6.19.14+deb13-amd64",
                                                               "linux-modules-6.19.14+deb13-amd64"]


@pytest.mark.parametrize(("spec", "package"), [
    ("newest-6.19", None),  # listed, none fetchable
    ("newest-7.1", None),
    ("6.19.13", None),  # an upstream version: only fetchable builds
    ("6.19.13+deb13", "linux-image-6.19.13+deb13-amd64"),  # exact: fetching names the missing parts
    ("newest-7.2", "linux-image-7.2.12+deb13-amd64"),
    ("newest", "linux-image-7.3.4+deb13-amd64"),
    ("newest-cloud", "linux-image-7.3.4+deb13-cloud-amd64"),
])
def test_newest_and_upstream_specs_pick_only_fetchable(index: packages.KernelIndex, spec: str,
                                                       package: str | None) -> None:
    assert debian.pick(versions.parse_spec(spec), index) == package


def test_bisect_plan_leaves_unfetchable_versions_out_up_front(index: packages.KernelIndex) -> None:
    abis, gone = bs.generic_abis(debian.abis(index)), debian.unfetchable(index)
    plan = bs.make_plan(abis, "debian:6.17.8", "debian:7.3.4", first_good=False, unfetchable=gone)
    assert [c.abi for c in plan.candidates] == ["6.17.8+deb13", "6.17.13+deb13", "7.2.6+deb13", "7.2.9+deb13",
                                                "7.2.11+deb13", "7.2.12+deb13", "7.3.4+deb13"]
    assert plan.notes() == [
        "left out 20 versions Debian lists but cannot be fetched (linux-base-* gone from the archive; linux-base-*, "
        "linux-modules-* gone from the archive):",
        "  6.18.5 … 7.1.13 (20): a change there is located only to 6.17.13 … 7.2.6"]
    assert bs.make_plan(abis, "debian:6.16.3", "debian:6.17.13", first_good=False, unfetchable=gone).notes() == []
    with pytest.raises(SetupError, match=re.escape("debian:newest-7.0: 7.0.13+deb13 is listed but not fetchable "
                                                   "(linux-base-*, linux-modules-* gone from the archive)")):
        bs.make_plan(abis, "debian:6.17.8", "debian:newest-7.0", first_good=False, unfetchable=gone)


@pytest.mark.parametrize("bad", ["newest-7", "newest-", "7.3", "latest-7.3", "newest-7.3-rt"])
def test_bad_newest_spec_is_one_line_setup_error(bad: str) -> None:
    with pytest.raises(SetupError) as err:
        versions.parse_spec(bad)
    assert "\n" not in str(err.value)


# --- unpacking: real .debs in both packagings -------------------------------------------------------------------

R = "7.3.4+deb13-amd64"


def build_deb(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp / f"{name}-root"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1\nArchitecture: amd64\n"
                                             "Maintainer: holecheck <holecheck@localhost>\nDescription: test\n")
    deb = tmp / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.fixture
def split_debs(tmp_path: Path) -> list[Path]:
    mod = f"usr/lib/modules/{R}"
    return [build_deb(tmp_path, f"linux-binary-{R}", {f"{mod}/vmlinuz": b"MZkernel"}),
            build_deb(tmp_path, f"linux-base-{R}", {f"{mod}/config": b"CONFIG_USERFAULTFD=y\n"}),
            build_deb(tmp_path, f"linux-modules-{R}", {f"{mod}/kernel/drivers/virtio/virtio_mmio.ko.xz": b"xz"})]


def test_split_packaging_unpacks_into_the_old_layout(tmp_path: Path, split_debs: list[Path]) -> None:
    tree = tmp_path / "kernels" / R
    debian.install(split_debs, tree, R)
    assert (tree / "boot" / f"vmlinuz-{R}").read_bytes() == b"MZkernel"
    assert (tree / "boot" / f"config-{R}").read_text() == "CONFIG_USERFAULTFD=y\n"
    assert (tree / f"usr/lib/modules/{R}/kernel/drivers/virtio/virtio_mmio.ko.xz").is_file()
    assert debian.is_complete(tree)
    assert [p.name for p in tree.parent.iterdir()] == [R]  # no temporary sibling left


def test_old_packaging_unpacks_as_it_is(tmp_path: Path) -> None:
    r = "6.16.3+deb13-amd64"
    deb = build_deb(tmp_path, f"linux-image-{r}", {f"boot/vmlinuz-{r}": b"MZ", f"boot/config-{r}": b"",
                                                   f"usr/lib/modules/{r}/kernel/fs/fuse/fuse.ko.xz": b""})
    debian.install([deb], tmp_path / r, r)
    assert (tmp_path / r / "boot" / f"vmlinuz-{r}").read_bytes() == b"MZ" and debian.is_complete(tmp_path / r)


def test_a_tree_without_its_marker_does_not_count_and_is_replaced(tmp_path: Path, split_debs: list[Path]) -> None:
    tree = tmp_path / R
    (tree / "boot").mkdir(parents=True)  # a half-extracted entry of an interrupted run (old code, or a crash)
    (tree / "boot" / f"vmlinuz-{R}").write_bytes(b"MZker")
    stale = tmp_path / f".{R}.abc123"  # a temporary sibling of a run killed mid-unpack
    stale.mkdir()
    assert not debian.is_complete(tree)
    debian.install(split_debs, tree, R)
    assert (tree / "boot" / f"vmlinuz-{R}").read_bytes() == b"MZkernel" and debian.is_complete(tree)
    assert not stale.exists()


def test_debs_without_a_kernel_leave_no_tree(tmp_path: Path, split_debs: list[Path]) -> None:
    kernels = tmp_path / "kernels"
    with pytest.raises(SetupError, match=re.escape(f"no boot/vmlinuz-{R} nor usr/lib/modules/{R}/vmlinuz")):
        debian.install(split_debs[1:], kernels / R, R)
    assert list(kernels.iterdir()) == []


# --- the apt lock says who holds it ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from suite import locks
with locks.held(sys.argv[1], "test lock", 10):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_waiter_names_the_holder_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "apt.lock"
    proc = hold(lock, 1.5)
    try:
        caplog.set_level(logging.WARNING, logger="suite.locks")
        t0 = time.monotonic()
        with locks.held(lock, "the apt cache", timeout=30):
            waited = time.monotonic() - t0
            assert lock.read_text().startswith(f"{os.getpid()} ")
    finally:
        proc.wait(timeout=10)
    assert 0.5 < waited < 10
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once at once; again only every 30 s
    assert warnings[0].startswith(f"waiting for the apt cache: held by pid {proc.pid} (")
    assert "test lock" in warnings[0] and " s (waited 0 s" in warnings[0]


def test_a_lock_held_too_long_is_a_stall_naming_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "apt.lock"
    proc = hold(lock, 5)
    try:
        with pytest.raises(StallError, match=f"waiting for the apt cache .*last seen: 'pid {proc.pid} \\("), \
                locks.held(lock, "the apt cache", timeout=0.5):
            pass
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- a corrupt cached .deb is fetched again (a real 2 KB download from Debian's mirror) -------------------------------

META = "linux-image-7.3.4+deb13-amd64"  # the split packaging's empty meta package: 1.9 KB


@pytest.fixture
def live_apt(tmp_path: Path) -> Apt:
    """A private Apt reading the package lists of holecheck's cache (no apt-get update of its own)."""
    default = Apt.default()
    with default.locked():
        default.update()  # the lists of every suite (a no-op while a day old)
    apt = Apt(tmp_path / "apt")
    (apt.root / "state").mkdir(parents=True)
    (apt.root / "state" / "lists").symlink_to(default.lists)
    shutil.copy(default.sources, apt.sources)
    return apt


def test_a_truncated_cached_deb_is_fetched_again(live_apt: Apt, caplog: pytest.LogCaptureFixture) -> None:
    meta = live_apt.index().stanza(META)
    if meta is None:
        pytest.skip(f"{META} is no longer in trixie-backports' package list")
    try:
        deb = live_apt.download(meta)
    except SetupError as exc:
        pytest.skip(f"Debian's mirror not reachable: {exc}")
    assert deb.parent == live_apt.debs and check_deb(deb, meta) == "" and deb.stat().st_size == meta.size
    assert live_apt.download(meta) == deb  # a verified cached .deb is reused
    deb.write_bytes(deb.read_bytes()[: meta.size // 2])  # what a killed download left
    assert "truncated" in check_deb(deb, meta)
    caplog.set_level(logging.WARNING, logger="kernels.apt")
    again = live_apt.download(meta)
    assert again == deb and check_deb(again, meta) == ""
    assert [r.getMessage().split(";")[1] for r in caplog.records] == [" fetching it again"]
    assert [p.name for p in live_apt.debs.iterdir()] == [deb.name]  # no partial download left beside it
