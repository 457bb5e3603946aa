"""Bounded waits. Every wait in holecheck goes through here so that each one has a deadline and its
timeout message says what was awaited and what was seen last.

Only what the wait expects is waited out: a probe's exception retries only if the caller names it as "not yet"
(``retry_on``); any other (a TypeError, a closed socket) propagates at once with its traceback — a harness fault,
never a stall. A wait on a process (``alive``) ends in ``PartyGoneError`` when that process is gone: a StallError,
which a runner may record as a kernel finding, means the party awaited was alive and did not answer.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

from .errors import PartyGoneError, StallError

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
    retry_on: tuple[type[BaseException], ...] = (),
    alive: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until ``done(result)``; return that result, or raise StallError after ``timeout`` s.

    ``retry_on``: the probe's exceptions that mean "not yet" (kept as what was seen last); any other propagates.
    ``alive``: '' while the party awaited runs, else why not (then PartyGoneError, at once and at the deadline).
    The error names ``what`` was awaited and the last value the probe returned (or raised).
    """
    last: list[object] = ["nothing (probe never returned)"]

    def attempt() -> T:
        if alive is not None and (gone := alive()):
            raise PartyGoneError(f"{what}: {gone} (last seen: {last[0]!r})")
        try:
            value = probe()
        except retry_on as exc:  # the probe's "not yet" is what we saw last; keep waiting
            last[0] = f"{type(exc).__name__}: {exc}"
            raise
        last[0] = value
        return value

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=interval, max=max_interval),
        retry=tenacity.retry_if_exception_type(retry_on) | tenacity.retry_if_result(lambda v: not done(v)),
        reraise=False,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError:
        if alive is not None and (gone := alive()):
            raise PartyGoneError(f"{what}: {gone} (last seen: {last[0]!r})") from None
        raise StallError(f"timed out after {timeout:g} s waiting for {what}; last seen: {last[0]!r}") from None


def process_alive(poll: Callable[[], int | None], name: str) -> Callable[[], str]:
    """An ``alive`` for a subprocess: '' while ``poll()`` is None, else how it ended."""
    def check() -> str:
        rc = poll()
        return "" if rc is None else f"{name} exited (status {rc}) while awaited"
    return check
