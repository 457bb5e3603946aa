"""Checks of holecheck's option values, made when pytest configures: a bad value is one SetupError line
(what, why, what to do) before anything starts, not an exception half-way through a test."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from .errors import SetupError


def positive_seconds(option: str, text: str | float) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SetupError(f"{option}={text}: not a number of seconds: give e.g. {option}=10") from None
    if not math.isfinite(value) or value <= 0:
        raise SetupError(f"{option}={text}: must be a finite number of seconds above 0 (every bounded wait uses it): "
                         f"give e.g. {option}=10") from None
    return value


def writable_dir(option: str, text: str) -> Path:
    """A directory that exists or can be created, and can be written, checked by creating (and removing) a
    probe directory in it or in its nearest existing ancestor. Creates nothing that stays."""
    path = Path(text).expanduser()
    todo = f"give {option} a directory you can write"
    probe_in = path
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise SetupError(f"{option}={text}: {probe_in} is not a directory: {todo}")
    try:
        Path(tempfile.mkdtemp(prefix=".holecheck-probe-", dir=probe_in)).rmdir()
    except OSError as exc:
        raise SetupError(f"{option}={text}: cannot create directories in {probe_in} "
                         f"({exc.strerror or exc}): {todo}") from None
    return path
