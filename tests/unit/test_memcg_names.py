"""Which holecheck memory cgroups are a crashed run's leftovers: by the creator's pid in the group's name."""
from __future__ import annotations

import os

from suite import memcg


def test_a_live_runs_group_is_not_a_leftover_even_while_empty() -> None:
    assert memcg._creator_alive(f"holecheck-{os.getpid()}-abc123")
    assert memcg._creator_alive(f"holecheck-dst-{os.getpid()}-abc123")


def test_a_dead_creators_group_and_a_foreign_name_are_leftovers() -> None:
    assert not memcg._creator_alive("holecheck-4194305-abc123")  # above pid_max: never a live process
    assert not memcg._creator_alive("holecheck-stray")
