"""The checkpoint publish sequence in one process: a save stopped at any step leaves ``latest`` on a complete
checkpoint whose weights are those saved at that iteration, and the next save completes and cleans up.

The quick, single-process twin of the kill tests in tests/test_training.py (which kill a real training run):
it runs under ``make mutation``, so each step of ``checkpointing.save`` is checked by a test that can reach it.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
import yaml

from epas.config import to_dict
from epas.errors import InputError
from megatron_patches.model import build_model
from megatron_training import checkpointing
from tests.model_utils import tiny_run

pytestmark = pytest.mark.usefixtures("megatron_cpu")


@pytest.fixture(scope="module", autouse=True)
def no_writer_process_left():
    """megatron-core's checkpoint writer starts a manager process for its results queue, stopped only at interpreter
    exit; a test process that ends with os._exit (a mutmut worker) would leave it behind."""
    yield
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        filesystem_async._results_queue._manager.shutdown()
        filesystem_async._results_queue = None


class Killed(BaseException):
    """Stands for the process dying: no ``except Exception`` of the code under test catches it."""


def _weights(model, iteration: int) -> dict[str, torch.Tensor]:
    """Give every parameter values that name the iteration, so a loaded checkpoint shows which one it is."""
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            param.fill_(iteration + index / 100)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _resumed_iteration(root: Path, run) -> int:
    """What the next start resumes from: ``latest``'s checkpoint, loaded, with the weights saved at it."""
    path = checkpointing.resolve(root)
    model = build_model(run)
    state = checkpointing.load(path, [model], None, run)
    expected = _weights(build_model(run), state["iteration"])
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert path == checkpointing.iteration_dir(root, state["iteration"]) and state["tokens"] == 10 * state["iteration"]
    return state["iteration"]


def _save(root: Path, iteration: int, run) -> Path:
    model = build_model(run)
    _weights(model, iteration)
    return checkpointing.save(root, iteration, [model], None, {"tokens": 10 * iteration}, run)


def test_a_complete_save_publishes_the_folder_then_latest(tmp_path):
    run = tiny_run(num_layers=2)
    root = tmp_path / "new" / "checkpoints"  # made by the first save
    for iteration in (3, 5):
        assert _save(root, iteration, run) == root / f"iter_{iteration:07d}"
        assert checkpointing.latest_iteration(root) == iteration
        assert _resumed_iteration(root, run) == iteration
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000005", "latest"]
    assert (root / "latest").read_text() == "5\n"
    written = yaml.safe_load((root / "iter_0000005" / "run_config.yaml").read_text())
    assert written == to_dict(run) and list(written) == list(to_dict(run))  # in the order of the presets


def test_a_resume_at_the_same_layout_continues_the_random_stream(tmp_path):
    run = tiny_run(num_layers=2)
    torch.manual_seed(123)
    _save(tmp_path, 1, run)
    expected = torch.rand(4)
    torch.manual_seed(7)  # what a new process would start from
    checkpointing.load(tmp_path / "iter_0000001", [build_model(run)], None, run)
    assert torch.equal(torch.rand(4), expected)


# where the process dies during the save of iteration 4 -> what is on disk besides iter_0000002 and latest
STOPS = {
    "writing the data": ["iter_0000004.tmp"],
    "renaming the folder": ["iter_0000004.tmp"],
    "moving latest": ["iter_0000004", "latest.tmp"],
}


@pytest.mark.parametrize("stop", STOPS)
def test_a_save_stopped_at_any_step_leaves_latest_on_a_complete_checkpoint(tmp_path, monkeypatch, stop):
    run = tiny_run(num_layers=2)
    root = tmp_path / "checkpoints"
    _save(root, 2, run)
    write, replace = checkpointing.dist_checkpointing.save, checkpointing.os.replace

    def write_and_die(state, directory, *args, **kwargs):
        if stop == "writing the data":
            Path(directory, "half_a_shard").write_bytes(b"\0")
            raise Killed
        return write(state, directory, *args, **kwargs)

    def replace_and_die(source, target):
        dying = {"renaming the folder": "iter_0000004", "moving latest": "latest"}.get(stop)
        if Path(target).name == dying:
            raise Killed
        replace(source, target)

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", write_and_die)
    monkeypatch.setattr(checkpointing.os, "replace", replace_and_die)
    with pytest.raises(Killed):
        _save(root, 4, run)
    monkeypatch.undo()

    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["iter_0000002", "latest", *STOPS[stop]])
    assert (root / "latest").read_text() == "2\n"
    assert _resumed_iteration(root, run) == 2
    # the resumed run reaches iteration 4 again and saves it
    assert _save(root, 4, run) == root / "iter_0000004"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert _resumed_iteration(root, run) == 4


def test_a_replacement_stopped_before_its_cleanup_is_finished_by_the_next_save(tmp_path, monkeypatch):
    """Saving an iteration that exists moves the old folder aside and deletes it last; stopped just before that, the
    next save of the same iteration clears the leftover first."""
    run = tiny_run(num_layers=2)
    root = tmp_path / "checkpoints"
    _save(root, 2, run)
    _save(root, 3, run)
    rmtree = checkpointing.shutil.rmtree

    def rmtree_and_die(path, *args, **kwargs):
        if Path(path).name.endswith(".replaced"):
            raise Killed
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree_and_die)
    with pytest.raises(Killed):
        _save(root, 2, run)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000002.replaced", "iter_0000003", "latest"]
    assert _resumed_iteration(root, run) == 3
    _save(root, 2, run)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    assert _resumed_iteration(root, run) == 2


def test_a_background_save_is_published_once_written_with_the_weights_of_its_iteration(tmp_path):
    """checkpoint.async_save: nothing is published until the writer has finished; the weights written are those of
    the iteration saved, although training changes them while the writer runs."""
    run = tiny_run(num_layers=2)
    root, model, background = tmp_path / "checkpoints", build_model(run), checkpointing.BackgroundSaves()
    published = []
    for iteration in (2, 4):
        _weights(model, iteration)
        checkpointing.save(root, iteration, [model], None, {"tokens": 10 * iteration}, run, background,
                           on_published=published.append)
        _weights(model, iteration + 1)  # the next step's weights, while the save is in flight
        assert checkpointing.latest_iteration(root) == (None if iteration == 2 else 2)
        assert not (root / f"iter_{iteration:07d}").exists()
        background.finish(wait=True)
        assert published[-1] == root / f"iter_{iteration:07d}" and checkpointing.latest_iteration(root) == iteration
        assert _resumed_iteration(root, run) == iteration
    background.finish(wait=True)  # nothing left in flight: no collective, no error
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]


def test_a_background_write_that_fails_is_named_and_publishes_nothing(tmp_path, monkeypatch):
    """The disk fills while the writer process runs: the next finish says so on every rank, the partial folder
    is removed and ``latest`` stays on the previous checkpoint."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    run = tiny_run(num_layers=2)
    root, background = tmp_path / "checkpoints", checkpointing.BackgroundSaves()
    _save(root, 1, run)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)  # inherited by the forked writer
    checkpointing.save(root, 2, [build_model(run)], None, {"tokens": 20}, run, background)
    with pytest.raises(InputError, match="no space left on the device of .*while saving iteration 2.*"
                                         "`latest` still points at the complete iter_0000001"):
        background.finish(wait=True)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest"]
    assert _resumed_iteration(root, run) == 1
