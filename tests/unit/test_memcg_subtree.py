"""memcg takes back the "+memory" it wrote into the cgroup v2 root's subtree_control — only if holecheck enabled
it, and only once no holecheck group is left (concurrent runs share the root). On a stand-in root directory: the
file records what was written, as the kernel's would be acted on."""
from __future__ import annotations

from pathlib import Path

import pytest

from suite import memcg


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(memcg, "SUBTREE_MARK", tmp_path / "mark")
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def test_memory_already_on_is_left_alone(root: Path) -> None:
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    memcg.enable_memory(root)
    memcg.restore_subtree(root)
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n" and not memcg.SUBTREE_MARK.exists()


def test_memory_holecheck_enabled_is_taken_back_by_the_last_group(root: Path) -> None:
    (root / "cgroup.subtree_control").write_text("cpu\n")
    memcg.enable_memory(root)
    assert (root / "cgroup.subtree_control").read_text() == "+memory" and memcg.SUBTREE_MARK.exists()
    other = root / f"{memcg.PREFIX}other-run-1-abcdef"
    other.mkdir()
    memcg.restore_subtree(root)  # another run's group still uses the controller
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    other.rmdir()
    memcg.restore_subtree(root)
    assert (root / "cgroup.subtree_control").read_text() == "-memory" and not memcg.SUBTREE_MARK.exists()
