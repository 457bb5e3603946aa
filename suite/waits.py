"""Bounded waits. Every wait in holecheck goes through here so that each one has a deadline and its
timeout message says what was awaited and what was seen last."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

from .errors import StallError

log = logging.getLogger(__name__)
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    what: str,
    timeout: float,
    interval: float = 0.02,
    max_interval: float = 0.5,
) -> T:
    """Call ``probe`` until ``done(result)``; return that result, or raise StallError after ``timeout`` s.

    The error names ``what`` was awaited and the last value the probe returned (or raised).
    """
    last: list[object] = ["nothing (probe never returned)"]

    def attempt() -> T:
        try:
            value = probe()
        except Exception as exc:  # the probe's failure is what we saw last; keep waiting
            last[0] = f"{type(exc).__name__}: {exc}"
            raise
        last[0] = value
        return value

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=interval, max=max_interval),
        retry=tenacity.retry_if_exception_type(Exception) | tenacity.retry_if_result(lambda v: not done(v)),
        reraise=False,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError:
        raise StallError(f"timed out after {timeout:g} s waiting for {what}; last seen: {last[0]!r}") from None
