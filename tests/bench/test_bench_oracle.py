"""How fast the oracle classifies address space (the issue's target: >= 4 GiB/s on the project's machines).

A benchmark, not a timed test: pytest-benchmark records the figures (`extra_info['gib_per_s']`)."""
from __future__ import annotations

import ctypes
import mmap

import pytest

from suite import pagemap

pytestmark = [pytest.mark.bench, pytest.mark.host]
GIB = 1 << 30
MAP_NORESERVE = 0x4000  # not exported by Python 3.11's mmap


@pytest.fixture(scope="module")
def region():
    """4 GiB of reserved anonymous memory with a THP faulted in every 64 MiB and a 4 KiB page every 1 MiB."""
    m = mmap.mmap(-1, 4 * GIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = (base + pagemap.THP_SIZE - 1) // pagemap.THP_SIZE * pagemap.THP_SIZE
    length = 4 * GIB - pagemap.THP_SIZE
    m.madvise(mmap.MADV_HUGEPAGE, start - base, 256 << 20)
    for off in range(0, length, 1 << 20):
        m[start - base + off] = 1
    yield start, length
    del base
    import gc

    gc.collect()
    m.close()


def _rate(benchmark, gib: float) -> None:
    """GiB/s into the benchmark's JSON; nothing when benchmarking is off (pytest-xdist runs each body once)."""
    if benchmark.stats is not None:
        benchmark.extra_info["gib_per_s"] = round(gib / benchmark.stats.stats.median, 1)


def test_bench_classify_4gib(benchmark, region):
    """Read the pagemap of 4 GiB and classify every page (present, zero page, hole, uffd-wp, soft-dirty)."""
    start, length = region

    def classify():
        return pagemap.snapshot("self", start, length).counts()

    counts = benchmark(classify)
    assert counts["pages"] == length // pagemap.PAGE
    assert counts["data"] >= length // (1 << 20)
    _rate(benchmark, length / GIB)


def test_bench_classify_with_kpageflags(benchmark, region):
    """The same with kpageflags THP bits for every present page (read in PFN runs, a THP's 512 at once)."""
    start, length = region
    states = benchmark(lambda: pagemap.snapshot("self", start, length, with_thp=True))
    assert states.thp is not None and states.thp.sum() >= 512
    _rate(benchmark, length / GIB)


def test_bench_classify_populated_1gib(benchmark):
    """1 GiB where every page is present (THP-backed, as a migrated guest's RAM): the dense case."""
    m = mmap.mmap(-1, GIB + pagemap.THP_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = (base + pagemap.THP_SIZE - 1) // pagemap.THP_SIZE * pagemap.THP_SIZE
    m.madvise(mmap.MADV_HUGEPAGE)
    for off in range(0, GIB, pagemap.PAGE * 64):
        m[start - base + off] = 1
    try:
        counts = benchmark(lambda: pagemap.snapshot("self", start, GIB).counts())
        assert counts["data"] == GIB // pagemap.PAGE
        _rate(benchmark, 1)
    finally:
        del base
        import gc

        gc.collect()
        m.close()
