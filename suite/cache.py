"""Where holecheck caches what it builds or fetches (helper binaries, kernels, images, apt state)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$HOLECHECK_CACHE, else ~/.cache/holecheck."""
    env = os.environ.get("HOLECHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "holecheck"
