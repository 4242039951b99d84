"""checkpoint.keep_last: which checkpoints are deleted after a publish, and a delete killed half-way."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_training import checkpointing, retention


def _checkpoints(root: Path, *iterations: int, latest: int) -> Path:
    for iteration in iterations:
        folder = checkpointing.iteration_dir(root, iteration)
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
    (root / "latest").write_text(f"{latest}\n")
    return root


def _left(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_the_newest_are_kept_and_older_ones_deleted(tmp_path):
    root = _checkpoints(tmp_path, 100, 200, 300, 400, latest=400)
    assert retention.prune(root, 2, 400, set()) == [100, 200]
    assert _left(root) == ["iter_0000300", "iter_0000400", "latest"]
    assert retention.prune(root, 2, 400, set()) == []  # nothing more to do


def test_the_resumed_checkpoint_and_pinned_ones_are_kept(tmp_path):
    root = _checkpoints(tmp_path, 100, 200, 300, 400, 500, latest=500)
    (root / "iter_0000100" / retention.PIN).touch()  # pinned: kept, and not counted among the newest
    assert retention.prune(root, 1, 500, protected={300}) == [200, 400]
    assert _left(root) == ["iter_0000100", "iter_0000300", "iter_0000500", "latest"]


def test_latest_is_kept_even_when_pinned_ones_are_newer_and_checkpoints_past_latest_are_left(tmp_path):
    """A run resumed from 300 past a damaged 500 publishes 400: 500 is the run's to replace, not to delete."""
    root = _checkpoints(tmp_path, 200, 300, 400, 500, latest=400)
    assert retention.prune(root, 1, 400, protected=set()) == [200, 300]
    assert _left(root) == ["iter_0000400", "iter_0000500", "latest"]


def test_saves_in_progress_and_replaced_folders_are_not_touched(tmp_path):
    root = _checkpoints(tmp_path, 100, 200, latest=200)
    for name in ("iter_0000300.tmp", "iter_0000200.replaced"):
        (root / name).mkdir()
    assert retention.prune(root, 1, 200, set()) == [100]
    assert _left(root) == ["iter_0000200", "iter_0000200.replaced", "iter_0000300.tmp", "latest"]


def test_a_delete_killed_half_way_leaves_nothing_loadable_and_is_finished_next_time(tmp_path, monkeypatch):
    root = _checkpoints(tmp_path, 100, 200, 300, latest=300)

    class Killed(BaseException):
        pass

    def die(path, *args, **kwargs):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(retention.shutil, "rmtree", die)
        with pytest.raises(Killed):
            retention.prune(root, 1, 300, set())
    assert _left(root) == ["iter_0000100.deleting", "iter_0000200", "iter_0000300", "latest"]
    assert checkpointing.saved_iterations(root) == [300, 200]  # the half-deleted one is no checkpoint
    assert retention.prune(root, 1, 300, set()) == [200]
    assert _left(root) == ["iter_0000300", "latest"]
