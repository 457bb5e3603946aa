"""Fetching ahead during a bisection: which kernels, in which order, cancelled when.

The fetches are real child processes (a small Python program standing in for ``python -m suite.bisection.prefetch ABI``:
it logs its start, sleeps, and leaves the "unpacked tree"), so start-up, SIGTERM and process groups are real;
the real fetch of Debian packages is measured in the bisection report, not here.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from test_bisect import ABIS, fake_project  # tests/unit is on sys.path (pytest prepend import mode)

from suite import bisect as bs
from suite.bisect import Search
from suite.bisection import step as bisect_step
from suite.bisection.prefetch import Prefetcher

# A fetch takes ~50 ms (0.02 s + start-up): both possible next kernels are fetched during any real step
FETCH = """
import pathlib, sys, time
d, abi, secs = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
with open(d / "started", "a") as f:
    f.write(abi + "\\n")
(d / f"pid-{abi}").write_text(str(__import__("os").getpid()))
time.sleep(secs)
(d / abi).write_text("unpacked")
"""


def fake_fetches(d: Path, slow: dict[str, float] | None = None) -> Prefetcher:
    d.mkdir(parents=True, exist_ok=True)
    return Prefetcher(d / "logs", cached=lambda abi: (d / abi).exists(),
                      argv=lambda abi: [sys.executable, "-c", FETCH, str(d), abi, str((slow or {}).get(abi, 0.02))])


def started(d: Path) -> list[str]:
    return (d / "started").read_text().split() if (d / "started").exists() else []


def until(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_after_names_the_next_step_whatever_the_verdict():
    for size in (3, 11, 33):
        for first_new in range(1, size):
            search = Search(size)
            while (i := search.next()) is not None:
                ahead = search.after(i)
                search.record(i, "new" if i >= first_new else "old")
                assert search.next() in ahead or search.next() is None
    assert Search(11).after(5) == [2, 7]  # 6.12.69 if 6.12.85 is new, 6.12.88 if old


def test_successors_are_fetched_one_at_a_time_in_order(tmp_path: Path):
    d = tmp_path / "cache"
    (d / "a").parent.mkdir(parents=True)
    (d / "a").write_text("unpacked")
    with fake_fetches(d) as p:
        assert p.step("a", ["b", "c"]) == "cached"
        until("b and c fetched", lambda: (d / "b").exists() and (d / "c").exists())
        assert started(d) == ["b", "c"]
        assert p.step("b", ["d"]).startswith("prefetched in ")


def test_a_step_on_an_uncached_kernel_cancels_other_fetches_first(tmp_path: Path):
    d = tmp_path / "cache"
    with fake_fetches(d, slow={"slow": 60}) as p:
        assert p.step("a", ["slow"]).startswith("fetched in ")  # not cached: in the foreground
        until("the slow fetch to start", lambda: (d / "pid-slow").exists())
        pid = int((d / "pid-slow").read_text())
        t0 = time.monotonic()
        assert p.step("e", []).startswith("fetched in ")
        assert time.monotonic() - t0 < 20  # did not wait for the slow one
        assert not alive(pid) and p.cancelled == ["slow"] and not (d / "slow").exists()


def test_a_running_fetch_of_a_possible_successor_goes_on(tmp_path: Path):
    d = tmp_path / "cache"
    (d / "a").parent.mkdir(parents=True)
    (d / "a").write_text("unpacked")
    with fake_fetches(d, slow={"b": 2}) as p:
        p.step("a", ["b", "c"])
        until("b to start", lambda: started(d) == ["b"])
        p.step("a", ["c", "b"])  # b still possible: kept; c queued after it
        until("b and c fetched", lambda: (d / "b").exists() and (d / "c").exists())
        assert started(d) == ["b", "c"] and p.cancelled == []
        assert p.step("b", []).startswith("prefetched in ")


def test_close_stops_a_running_fetch(tmp_path: Path):
    d = tmp_path / "cache"
    (d / "a").parent.mkdir(parents=True)
    (d / "a").write_text("unpacked")
    p = fake_fetches(d, slow={"b": 60})
    p.step("a", ["b"])
    until("b to start", lambda: (d / "pid-b").exists())
    pid = int((d / "pid-b").read_text())
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 15 and not alive(pid) and not p.worker.is_alive()


@pytest.mark.parametrize("fixed_in", [(6, 12, 88)])
def test_bisection_steps_find_their_kernels_prefetched(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      fixed_in: tuple[int, ...]):
    """The real Bisection over the real candidate list, each step's kernel fetched ahead during the one before."""
    plan = bs.make_plan(ABIS, "debian:6.12.95", "debian:6.12.43", first_good=True)
    project = fake_project(tmp_path / "p", fixed_in, set())
    d = tmp_path / "cache"
    with fake_fetches(d) as p:
        assert bs.Bisection(plan, bisect_step.Runner("snapshot_style", timeout=120, project=project),
                            tmp_path / "run.json", {}, p).run() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("old end (expected bad): debian:6.12.43")
    assert lines[1].endswith("(kernel fetched in 0 s)")  # the first kernel: nothing ran before it
    steps = [ln for ln in lines if ln.startswith(("new end", "step "))]
    # fetched ahead during the step before: done by now, or (on a loaded machine) still finishing in the background
    ahead = ("(kernel prefetched in ", "for its background fetch)")
    assert steps and all(any(a in ln for a in ahead) for ln in steps), steps
