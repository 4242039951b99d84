"""The training loop: exact resume, atomic checkpoints, signals, config errors, real training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_training import checkpointing, distributed
from epas.config import load_config
from epas.errors import ConfigError
from megatron_training.trainer import NonFiniteLossError, Trainer
from megatron_training.validation import validate_run
from tests.multiprocess import run_workers, train_worker

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def _run(tmp: Path, name: str, *overrides: str):
    """The tiny preset on mock data, logging every step, with its own checkpoint and log dirs."""
    return load_config(
        TINY,
        [
            "data.mock=true",
            "data.micro_batch_size=2",
            "data.global_batch_size=8",
            f"data.cache_dir={tmp / 'cache'}",
            "training.log_interval=1",
            "training.eval_interval=0",
            "optimizer.warmup_steps=2",
            "epas.interval=3",
            f"checkpoint.dir={tmp / name / 'ckpt'}",
            f"logging.tensorboard_dir={tmp / name / 'tb'}",
            *overrides,
        ],
    )


def _scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


# ---- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tensor_parallel=3", "model.num_attention_heads=6", "model.hidden_size=96"], 3,
         "must divide model.num_attention_heads=6 and model.num_query_groups=2"),
        (["parallel.tensor_parallel=4"], 4, "must divide model.num_attention_heads=4 and model.num_query_groups=2"),
        (["parallel.pipeline_parallel=4"], 4, "model.num_layers=6 is not divisible by pipeline_parallel"),
        (["parallel.pipeline_parallel=2", "parallel.first_stage_layers=7"], 2, "cannot be split evenly"),
        (["parallel.pipeline_parallel=4", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"], 4,
         "the other 3 of model.num_layers=6 cannot be split evenly over 2 middle stage(s)"),
        (["data.global_batch_size=6"], 2, "data.global_batch_size=6 is not divisible by"),
        (["data.mock=false", "data.paths=[/nonexistent/corpus]"], 1, "data file /nonexistent/corpus.bin not found"),
        (["parallel.tensor_parallel=2"], 3, "3 processes cannot be split"),
        (["training.recompute=full"], 1, "would drop the gradients"),
        (["epas.num_sharing_layers=4", "epas.growth=3"], 1, "growth"),
    ],
)
def test_config_errors_are_clear(tmp_path, overrides, world, message):
    run = _run(tmp_path, "x", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(run, world)


def test_cli_reports_config_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_epas.py"), "--config", TINY, "trainig.train_steps=5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config section 'trainig'; did you mean 'training'" in result.stderr


# ---- resume and checkpoints ----------------------------------------------------------------------


def test_resume_is_exact_with_tp2_across_a_region_change(tmp_path):
    steps = ["training.train_steps=8", "parallel.tensor_parallel=2"]
    straight = _run(tmp_path, "straight", *steps)
    run_workers(train_worker, 2, straight)
    halves = _run(tmp_path, "halves", *steps)
    first_half = _run(tmp_path, "halves", *steps, "training.exit_interval=4")
    run_workers(train_worker, 2, first_half)
    assert checkpointing.latest_iteration(Path(halves.checkpoint.dir)) == 4
    run_workers(train_worker, 2, halves)

    expected = _scalars(Path(straight.logging.tensorboard_dir), "train/loss")
    resumed = _scalars(Path(halves.logging.tensorboard_dir), "train/loss")
    assert sorted(expected) == list(range(1, 9))
    assert resumed == expected  # bit-identical, steps 1-4 before and 5-8 after the resume
    sharing = _scalars(Path(halves.logging.tensorboard_dir), "epas/num_sharing_layers")
    assert sharing[4] == 1 and sharing[7] == 2  # steps 4-6 train with one sharing layer, 7-8 with two


def _load_loss_worker(rank, run, path):
    distributed.initialize(run)
    trainer = Trainer(run)
    checkpointing.load(Path(path), trainer.models, None, run)
    loss = trainer._run_microbatches(trainer._iterators(trainer.train_data, 0), forward_only=True)
    distributed.shutdown()
    return loss.item()


def test_checkpoint_loads_at_another_layout(tmp_path):
    saved = _run(tmp_path, "tp2", "training.train_steps=3", "parallel.tensor_parallel=2")
    run_workers(train_worker, 2, saved)
    path = str(checkpointing.resolve(Path(saved.checkpoint.dir)))
    fresh = [f"checkpoint.dir={tmp_path / 'none'}"]
    tp2 = run_workers(_load_loss_worker, 2, _run(tmp_path, "a", "parallel.tensor_parallel=2", *fresh), path)
    tp1 = run_workers(_load_loss_worker, 1, _run(tmp_path, "b", *fresh), path)
    pp2 = run_workers(_load_loss_worker, 2, _run(tmp_path, "c", "parallel.pipeline_parallel=2", *fresh), path)
    assert tp2[0] == pytest.approx(tp1[0], rel=1e-6)
    assert pp2[0] == pytest.approx(tp1[0], rel=1e-6)


def _killed_during_save_worker(rank, run, point):
    """Train with saves every 2 steps and die (SIGKILL) at ``point`` of the second save (iteration 4)."""
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    write, replace = checkpointing.dist_checkpointing.save, checkpointing.os.replace

    def write_then_die(state, directory, *args, **kwargs):
        if point == "writing the data" and directory.endswith("iter_0000004.tmp"):
            Path(directory, "partial.distcp").write_bytes(b"half a shard")
            die()
        return write(state, directory, *args, **kwargs)

    def publish_then_die(source, target):
        target = Path(target)
        if point == "before the rename" and target.name == "iter_0000004":
            die()
        replace(source, target)
        if point == "after the rename" and target.name == "iter_0000004":
            die()
        if point == "after latest" and target.name == "latest" and target.read_text().strip() == "4":
            die()

    checkpointing.dist_checkpointing.save = write_then_die
    checkpointing.os.replace = publish_then_die
    distributed.initialize(run)
    Trainer(run).train()


# where a save can be killed -> the iteration the next start resumes from
KILL_POINTS = {"writing the data": 2, "before the rename": 2, "after the rename": 2, "after latest": 4}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_anywhere_resumes_from_a_complete_checkpoint(tmp_path, point):
    run = _run(tmp_path, "killed", "training.train_steps=6", "checkpoint.save_interval=2")
    with pytest.raises(AssertionError, match="died without reporting"):
        run_workers(_killed_during_save_worker, 1, run, point)
    root = Path(run.checkpoint.dir)
    assert checkpointing.latest_iteration(root) == KILL_POINTS[point]
    assert (root / "iter_0000004").exists() == (point in ("after the rename", "after latest"))
    # the next start ends at iteration 4, so `latest` must name the checkpoint it saved (or found saved)
    resumed = _run(tmp_path, "killed", "training.train_steps=4", "checkpoint.save_interval=2")
    run_workers(train_worker, 1, resumed)
    assert checkpointing.latest_iteration(root) == 4
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    losses = _scalars(Path(run.logging.tensorboard_dir), "train/loss")
    assert set(losses) == set(range(1, 5))


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    run = _run(tmp_path, "sigterm", "training.train_steps=100000")
    args = [f"{k}={v}" for k, v in {
        "data.mock": "true", "data.micro_batch_size": 2, "data.global_batch_size": 8,
        "data.cache_dir": tmp_path / "cache", "training.log_interval": 1, "training.eval_interval": 0,
        "training.train_steps": 100000, "checkpoint.dir": run.checkpoint.dir,
    }.items()]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "pretrain_epas.py"), "--config", TINY, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("iteration      3/"):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    assert "received a stop signal: saving at iteration" in output
    saved_at = int(output.split("saving at iteration ")[1].split()[0])
    assert saved_at >= 3
    assert checkpointing.latest_iteration(Path(run.checkpoint.dir)) == saved_at


# ---- a real run --------------------------------------------------------------------------------


def test_training_on_real_text_lowers_the_loss_and_logs_every_metric(tmp_path):
    from epas.data.demo_corpus import main as build_corpus
    from analysis.plot_runs import plot_runs

    assert build_corpus(["--output-dir", str(tmp_path / "demo")]) == 0
    run = load_config(TINY, [
        f"data.paths=[{tmp_path / 'demo' / 'corpus'}]", f"data.tokenizer={tmp_path / 'demo' / 'tokenizer'}",
        f"data.cache_dir={tmp_path / 'cache'}", "training.train_steps=60", "training.log_interval=1",
        "training.eval_interval=30", "training.eval_steps=2", "training.peak_tflops=1.0",
        "optimizer.warmup_steps=5", "epas.interval=15", f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=30", f"logging.tensorboard_dir={tmp_path / 'tb'}",
    ])
    validate_run(run, 1)
    run_workers(train_worker, 1, run)

    tensorboard = tmp_path / "tb"
    losses = _scalars(tensorboard, "train/loss")
    first, last = [sum(losses[s] for s in steps) / 5 for steps in (range(1, 6), range(56, 61))]
    assert last < first - 1.0, (first, last)
    valid = _scalars(tensorboard, "valid/loss")
    assert sorted(valid) == [30, 60] and valid[60] < valid[30]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_gpu", "train/mfu",
                "memory/peak_gb"):
        values = _scalars(tensorboard, tag)
        assert sorted(values) == list(range(1, 61)) and all(v > 0 for v in values.values()), tag
    sharing = _scalars(tensorboard, "epas/num_sharing_layers")
    assert [sharing[s] for s in (15, 16, 31, 46, 60)] == [0, 1, 2, 3, 3]  # grows after steps 15, 30, 45
    assert checkpointing.latest_iteration(tmp_path / "ckpt") == 60
    assert (tmp_path / "ckpt" / "iter_0000030" / "run_config.yaml").is_file()
    written = plot_runs([tensorboard], tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "throughput.png"]


def _nan_worker(rank, run):
    distributed.initialize(run)
    try:
        Trainer(run).train()
    except NonFiniteLossError as error:
        return str(error)
    finally:
        distributed.shutdown()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = _run(tmp_path, "nan", "training.train_steps=8", "checkpoint.save_interval=2",
               "optimizer.lr=1.0e+12", "optimizer.min_lr=1.0e+12", "optimizer.clip_grad=0.0")
    (message,) = run_workers(_nan_worker, 1, run)
    assert message is not None and "at iteration" in message
    failed_at = int(message.split("at iteration ")[1].split(";")[0])
    root = Path(run.checkpoint.dir)
    assert failed_at > 2  # the first two steps are finite with this seed: a checkpoint exists
    assert checkpointing.latest_iteration(root) == 2 * ((failed_at - 1) // 2)
    assert not list(root.glob("*.tmp"))
