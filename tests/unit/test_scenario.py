"""Scenario data: builders, selectors and JSON round trips."""
from __future__ import annotations

import numpy as np
import pytest

from suite import scenario as sc
from suite.errors import SetupError
from suite.kernelspec import KernelSpec, parse, parse_many
from suite.oracle import runs
from suite.verdict import Finding, PhaseRecord, Verdict


def phases(s: sc.Scenario) -> list[str]:
    return [step.phase for step in s.steps]


def test_postcopy_style_puts_register_and_shrink_where_asked():
    s = sc.postcopy_style("after-nohugepage", "after-place")
    assert phases(s) == ["map(hugepage)", "place(data)", "shrink@after-place", "nohugepage", "register(missing)",
                         "discard(discard)", "touch(read)", "verify"]


@pytest.mark.parametrize(("register_at", "shrink_at", "first"), [
    ("after-shrink", "after-discard", "shrink@after-discard"),
    ("after-discard", "after-register", "register(missing)"),
])
def test_same_point_order(register_at, shrink_at, first):
    s = sc.postcopy_style(register_at, shrink_at)
    names = phases(s)
    i = names.index("discard(discard)")
    assert names[i + 1] == first


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="after the other"):
        sc.postcopy_style("after-shrink", "after-register")
    with pytest.raises(ValueError, match="unknown point"):
        sc.postcopy_style("sometime", "after-place")
    with pytest.raises(ValueError, match="unknown step op"):
        sc.Step("explode")


def test_json_round_trip():
    s = sc.snapshot_style("after-protect", sabotage=True)
    assert sc.Scenario.from_json(s.to_json()) == s


def test_selectors():
    s = sc.postcopy_style("after-discard", "after-place")
    data, zero, discard, sab = (s.selector(n) for n in ("data", "zero", "discard", "sabotage"))
    assert data.sum() == 8 * 32 and np.array_equal(zero, ~data)
    assert discard.sum() == 64 * 8  # every 4th of 32 chunks
    assert not (sab & data).any() and not (sab & discard).any() and sab.sum() == 5
    assert sc.Fill(4, "head").data_mask(1024).nonzero()[0].tolist() == [0, 1, 2, 3, 512, 513, 514, 515]


def test_runs():
    assert list(runs(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool))) == [(0, 2), (3, 1), (6, 1)]
    assert list(runs(np.zeros(4, dtype=bool))) == []


def test_verdict_round_trip_and_message():
    v = Verdict(scenario="x", kernel="6.12", findings=[Finding.of("hole", "touch", [0x3000, 0x1000, 0x2000])],
                phases=[PhaseRecord("touch", {"hole": 3}, 0.1)])
    assert Verdict.from_json(v.to_json()) == v
    assert v.failure_message() == ("x on kernel 6.12\n  [touch] 3 placed pages became pte_none holes "
                                   "(first va 0x1000, va 0x2000, va 0x3000)")


def test_kernel_specs(tmp_path):
    img = tmp_path / "bzImage"
    header = bytearray(1024)  # a bzImage's setup header: 1 setup sector, no payload
    header[0x1F1], header[0x202:0x206] = 1, b"HdrS"
    img.write_bytes(bytes(header))
    assert parse("host") == KernelSpec("host")
    assert parse("debian:6.12.57").id == "debian-6.12.57"
    assert parse(str(img)) == KernelSpec("path", str(img))
    assert parse_many(["host,debian:6.1.0-56", "host"]) == [KernelSpec("host"), KernelSpec("debian", "6.1.0-56")]
    assert parse_many([]) == [KernelSpec("host")]
    with pytest.raises(SetupError, match="no such kernel image"):
        parse(str(tmp_path / "missing"))
    img.write_bytes(header[:600])
    with pytest.raises(SetupError, match=r"bzImage: not a kernel image: a truncated bzImage \(600 bytes"):
        parse(str(img))


def test_postcopy_libvirt_walks_the_phases_libvirt_can_hold() -> None:
    from suite import scenario as sc

    s = sc.postcopy_libvirt("mid-precopy")
    assert s.id == "postcopy-libvirt[shrink@mid-precopy-mpn409-spread8]" and not s.synthetic
    assert [st.op for st in s.steps] == ["before-migrate", "mid-precopy", "shrink", "postcopy-running",
                                         "read-received", "completed"]
    with pytest.raises(ValueError, match="unknown postcopy-libvirt phase 'precopy-done'"):
        sc.postcopy_libvirt("precopy-done")
    assert sc.Scenario.from_json(s.to_json()) == s


def test_fill_content_is_named_in_the_id_and_checked():
    assert sc.snapshot(fill=sc.Fill(content="same")).id.endswith("-spread8-same]")
    assert sc.snapshot_style("after-protect", fill=sc.Fill(content="same")).id.endswith("-spread8-same]")
    assert sc.postcopy("completed", fill=sc.Fill(content="sparse")).id.endswith("-spread8-sparse]")
    with pytest.raises(ValueError, match="fill content 'odd'"):
        sc.snapshot_style("after-protect", fill=sc.Fill(content="odd"))
