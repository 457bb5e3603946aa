"""Every host-wide knob a holecheck run changes and must leave as found, read in one place: the THP knobs (global
and per mTHP size), KSM's knobs, and the cgroup v2 root's ``subtree_control`` (``memcg`` writes ``+memory``).
The session's end check (conftest ``_host_left_as_found``) and ``tests/machine_state.py`` compare two readings."""
from __future__ import annotations

import contextlib
from pathlib import Path

from . import memcg, split_triggers, thp

SUBTREE = "cgroup/subtree_control"


def subtree_root() -> Path | None:
    """The cgroup v2 root whose subtree_control ``memcg.scope`` may change (the memory one, else the first)."""
    roots = [r for r in memcg.V2_CANDIDATES if (r / "cgroup.subtree_control").exists()]
    return memcg.v2_root() or (roots[0] if roots else None)


def now() -> dict[str, str]:
    """Each knob's value, by a name that says which knob (``enabled``, ``hugepages-64kB/enabled``, ``ksm/run``,
    ``cgroup/subtree_control``). Read it under ``thp.exclusive()``: then no holecheck scenario has one changed."""
    out = {**thp.current(), **thp.sizes_current(), **split_triggers.ksm_current()}
    if (root := subtree_root()) is not None:
        out[SUBTREE] = " ".join(sorted((root / "cgroup.subtree_control").read_text().split()))
    return out


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per knob not as found."""
    return [f"{name}: {before.get(name, '(absent)')} before, {after.get(name, '(absent)')} after"
            for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]


def restore(saved: dict[str, str]) -> None:
    """Write back every knob that differs (best effort: the caller reads again to know what stayed)."""
    current = now()
    thp.restore({k: v for k, v in saved.items() if k in thp.KNOBS})
    for name, value in saved.items():
        if current.get(name) == value:
            continue
        if name.startswith("hugepages-"):
            path = thp.SYSFS / name
        elif name.startswith("ksm/"):
            path = split_triggers.KSM / name.removeprefix("ksm/")
        else:
            continue  # subtree_control: memcg.restore_subtree takes back only what holecheck enabled
        with contextlib.suppress(OSError):
            path.write_text(value)
    if (root := subtree_root()) is not None:
        with memcg.subtree_lock():
            memcg.restore_subtree(root)
