"""Wall time of one real-QEMU cell (256 MiB guest), start to verdict. Target: <= 8 s each on the project's
machines. A benchmark, not a timed test: the figures land in pytest-benchmark's table and JSON."""
from __future__ import annotations

import pytest

from suite import scenario as sc

pytestmark = [pytest.mark.bench, pytest.mark.host, pytest.mark.qemu]


@pytest.mark.parametrize("scenario", [sc.postcopy("precopy-done"), sc.snapshot("snapshot-running")],
                         ids=lambda s: f"{s.kind}-{s.name}-{s.size_mib}MiB")
def test_bench_cell(benchmark, run, qemu, scenario):
    verdict = benchmark.pedantic(run, args=(scenario,), rounds=3, iterations=1)
    assert verdict.ok, verdict.failure_message()
    benchmark.extra_info["phases_s"] = {p.phase: p.seconds for p in verdict.phases}
