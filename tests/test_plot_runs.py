"""tools/plot_runs.py on synthetic TensorBoard runs: the PNGs, the detected region growth, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from analysis.plot_runs import main, plot_runs, read_scalars, sharing_changes
from epas.errors import InputError

STEPS = 60
GROWTH = [(15, 1), (30, 2), (45, 3)]  # (step, sharing layers from then on)


def _sharing_at(step: int) -> int:
    return max([count for start, count in GROWTH if step >= start], default=0)


def _write_run(run_dir: Path, epas: bool) -> None:
    """A run logging every step; the EPAS run's region grows 0 -> 1 -> 2 -> 3 and speeds it up."""
    writer = SummaryWriter(str(run_dir))
    for step in range(1, STEPS + 1):
        sharing = _sharing_at(step) if epas else 0
        writer.add_scalar("train/loss", 8 * math.exp(-step / 20) + 2 + 0.1 * math.sin(step), step)
        writer.add_scalar("train/tokens_per_s", 1000 * (1 + 0.1 * sharing), step)
        writer.add_scalar("train/tflops_per_gpu", 50 + sharing, step)
        if epas:
            writer.add_scalar("epas/num_sharing_layers", sharing, step)
        if step % 20 == 0:
            writer.add_scalar("valid/loss", 8 * math.exp(-step / 20) + 2.2, step)
    writer.close()


@pytest.fixture
def runs(tmp_path):
    baseline, epas = tmp_path / "baseline", tmp_path / "epas"
    _write_run(baseline, epas=False)
    _write_run(epas, epas=True)
    return baseline, epas


def test_plots_are_written_and_growth_detected(runs, tmp_path):
    written = plot_runs(runs, tmp_path / "plots", labels=["baseline", "EPAS"], smooth=0.8)

    assert [p.name for p in written] == ["loss.png", "throughput.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = imread(path).shape[:2]
        assert height > 200 and width > 200
    assert sharing_changes(*read_scalars(runs[1])["epas/num_sharing_layers"]) == GROWTH


def test_sharing_changes():
    assert sharing_changes([], []) == []
    assert sharing_changes([1, 2, 3], [2.0, 2.0, 2.0]) == []
    assert sharing_changes([10, 20, 30, 40], [0.0, 1.0, 1.0, 3.0]) == [(20, 1), (40, 3)]


def test_cli_prints_paths(runs, tmp_path, capsys):
    assert main([str(runs[0]), str(runs[1]), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / "loss.png"), str(tmp_path / "out" / "throughput.png")]


def test_resumed_run_keeps_latest_write(tmp_path):
    """A resume rewrites steps after the checkpoint in a new event file; the newer values win."""
    run_dir = tmp_path / "run"
    for values in ([5.0, 4.0, 3.0], [5.0, 3.5, 2.5]):
        writer = SummaryWriter(str(run_dir), filename_suffix=f".{values[1]}")
        for step, value in enumerate(values, start=1):
            writer.add_scalar("train/loss", value, step)
        writer.close()
    assert read_scalars(run_dir)["train/loss"] == ([1, 2, 3], [5.0, 3.5, 2.5])


def test_missing_run_dir(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plot_runs([tmp_path / "nope"], tmp_path / "plots")


def test_no_event_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no TensorBoard event files"):
        plot_runs([tmp_path / "empty"], tmp_path / "plots")


def test_run_without_train_loss_names_run_and_tags(runs, tmp_path):
    other = tmp_path / "other"
    writer = SummaryWriter(str(other))
    writer.add_scalar("train/lr", 1e-4, 1)
    writer.close()
    with pytest.raises(InputError, match=r"run .*other has no train/loss; its scalar tags: \['train/lr'\]"):
        plot_runs([runs[0], other], tmp_path / "plots")


def test_label_count_mismatch(runs, tmp_path, capsys):
    with pytest.raises(InputError, match="1 labels for 2 run directories"):
        plot_runs(runs, tmp_path / "plots", labels=["only"])
    assert main([str(runs[0]), str(runs[1]), "--labels", "only", "--output", str(tmp_path)]) == 2
    assert "error: 1 labels for 2 run directories" in capsys.readouterr().err
