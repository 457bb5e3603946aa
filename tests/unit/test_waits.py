"""suite.waits: only the exceptions a wait expects are waited out; a harness fault surfaces at once as itself, and a
party that is gone is never reported as a stall (which a runner would record as a kernel finding)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from suite.errors import PartyGoneError, StallError
from suite.waits import process_alive, wait_for


def test_a_probe_raising_typeerror_surfaces_as_typeerror_at_once() -> None:
    calls = []

    def probe() -> int:
        calls.append(1)
        return len(None)  # type: ignore[arg-type]  # a bug in the harness

    t0 = time.monotonic()
    with pytest.raises(TypeError):
        wait_for(probe, lambda n: n > 0, what="a buggy probe", timeout=5.0)
    assert time.monotonic() - t0 < 1.0 and len(calls) == 1  # not retried until the deadline


def test_exceptions_named_as_not_yet_are_retried_and_named_when_the_wait_expires() -> None:
    def probe() -> int:
        raise FileNotFoundError("no socket yet")

    with pytest.raises(StallError, match=r"waiting for the socket; last seen: 'FileNotFoundError: no socket yet'"):
        wait_for(probe, bool, what="the socket", timeout=0.2, retry_on=(OSError,))


def test_not_yet_then_done_returns_the_value() -> None:
    seen = iter([OSError("refused"), 0, 3])

    def probe() -> int:
        v = next(seen)
        if isinstance(v, Exception):
            raise v
        return v

    assert wait_for(probe, lambda n: n > 0, what="three", timeout=2.0, interval=0.001, retry_on=(OSError,)) == 3


def test_an_awaited_process_that_exited_is_a_harness_error_not_a_stall() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(PartyGoneError, match=r"the helper's reply: helper exited \(status 3\) while awaited"):
        wait_for(lambda: None, lambda v: v is not None, what="the helper's reply", timeout=5.0,
                 alive=process_alive(proc.poll, "helper"))


def test_a_process_that_dies_during_the_wait_is_a_harness_error_not_a_stall() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    try:
        with pytest.raises(PartyGoneError, match="helper exited"):
            wait_for(lambda: None, lambda v: v is not None, what="an answer", timeout=10.0,
                     alive=process_alive(proc.poll, "helper"))
    finally:
        proc.kill()
        proc.wait()


def test_a_live_process_that_does_not_answer_is_a_stall() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(StallError, match=r"timed out after 0.3 s waiting for an answer; last seen: None"):
            wait_for(lambda: None, lambda v: v is not None, what="an answer", timeout=0.3,
                     alive=process_alive(proc.poll, "helper"))
    finally:
        proc.kill()
        proc.wait()
