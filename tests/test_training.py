"""The training loop: exact resume, atomic checkpoints, signals, config errors, real training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from megatron.core import parallel_state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_training import checkpointing, distributed
from epas.config import load_config, to_dict
from epas.errors import ConfigError
from epas.trackers import CONFIG_TAG
from megatron_training.step_guard import NonFiniteStepError, weights_finite
from megatron_training.trainer import Trainer
from megatron_training.validation import validate_run
from tests.multiprocess import free_port, run_workers, train_runs_worker, train_worker
from tests.wandb_offline import as_float32, read_offline_run, tensorboard_series, tensorboard_texts

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
        (["parallel.ddp_bucket_size=1000"], 1, "Set parallel.overlap_grad_reduce=true or drop it"),
        (["profiling.tool=nsys"], 1, "set profiling.start_step=N"),
        (["profiling.tool=nsys", "profiling.start_step=3"], 1, "but this run is on the CPU; use profiling.tool=torch"),
        (["profiling.tool=nsys", "profiling.start_step=3", "profiling.memory_snapshot=true"], 1,
         "with profiling.tool=nsys add --cuda-memory-usage=true to nsys instead"),
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


def _resume_from_a_copy(source: Path, run) -> Path:
    """Start ``run`` from a copy of the checkpoint ``source`` (an ``iter_N`` folder of another run)."""
    root = Path(run.checkpoint.dir)
    shutil.copytree(source, root / source.name)
    (root / "latest").write_text(f"{int(source.name[5:])}\n")
    return root


def _bucket_counts_worker(rank, runs):
    from megatron_training import builders

    distributed.initialize(runs[0])
    try:
        counts = []
        for run in runs:
            (chunk,) = builders.build_chunks(run, builders.training_transformer_config(run))
            counts.append((sum(len(buffer.buckets) for buffer in chunk.buffers), len(list(chunk.parameters()))))
        return counts
    finally:
        distributed.shutdown()


def test_ddp_bucket_size_sizes_the_gradient_buckets(tmp_path):
    overlap = "parallel.overlap_grad_reduce=true"
    runs = [_run(tmp_path, "default", overlap), _run(tmp_path, "one_each", overlap, "parallel.ddp_bucket_size=1")]
    ((default, one_each),) = run_workers(_bucket_counts_worker, 1, runs)
    assert default[0] == 1  # the tiny model is far below megatron-core's 40M parameters
    assert one_each[0] == one_each[1] > 10  # every parameter in a bucket of its own


def test_resume_and_overlapped_communication_are_exact_at_tp2_dp2_across_a_region_change(tmp_path):
    """TP=2 x DP=2 while the region grows (steps 3-4 share one layer, 5-6 two): a run resumed from another's
    checkpoint at step 3 continues it bit for bit, and overlapped communication trains as without it. The run
    with parallel.overlap_grad_reduce is continued without it; the distributed optimizer's run that also has
    parallel.overlap_param_gather is continued without the gather overlap (a resume keeps the gradient buckets)
    and equals the first run to rounding. It saves at step 3 (its weights must be gathered first), evaluates at
    step 4 and gathers step 5's update by its forward pre-hooks at step 6 (they must be back after the
    evaluation), in the sharing layers too. Every parameter has a bucket of its own (parallel.ddp_bucket_size=1),
    so each weight is gathered when the first module using it runs: a weight read before its gather finished
    would be stale."""
    layout = ["training.train_steps=6", "parallel.tensor_parallel=2", "epas.interval=2",
              "training.eval_interval=4", "training.eval_steps=1"]
    zero1 = ["optimizer.use_distributed_optimizer=true"]
    overlap = ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=1"]
    pairs = {
        "grad_reduce": (_run(tmp_path, "grad_reduce", *layout, *overlap, "checkpoint.save_interval=3"), []),
        "zero1": (_run(tmp_path, "zero1", *layout, *zero1, *overlap, "parallel.overlap_param_gather=true",
                       "checkpoint.save_interval=3"), [*zero1, *overlap]),  # the same buckets (see resume.py)
    }
    runs = []
    for name, (straight, continuation) in pairs.items():
        load = f"checkpoint.load={Path(straight.checkpoint.dir) / 'iter_0000003'}"
        runs += [straight, _run(tmp_path, f"{name}_resumed", *layout, *continuation, load)]
    for straight in runs[::2]:
        validate_run(straight, 4)
    run_workers(train_runs_worker, 4, runs)

    def logged(run, tag):
        return _scalars(Path(run.logging.tensorboard_dir), tag)

    for straight, resumed in zip(runs[::2], runs[1::2]):
        for tag in ("train/loss", "train/grad_norm"):
            expected = logged(straight, tag)
            assert sorted(expected) == list(range(1, 7))
            assert logged(resumed, tag) == {s: expected[s] for s in range(4, 7)}, (resumed.checkpoint.dir, tag)
        assert logged(resumed, "valid/loss") == logged(straight, "valid/loss")
    sharing = logged(runs[1], "epas/num_sharing_layers")
    assert sharing[4] == 1 and sharing[5] == 2
    # ZeRO-1 sums the gradients in another order: equal to the plain optimizer's run to rounding
    plain, zero = logged(runs[0], "train/loss"), logged(runs[2], "train/loss")
    assert zero == pytest.approx(plain, rel=1e-5)


def test_resume_is_exact_with_the_distributed_optimizer_and_background_saves(tmp_path):
    """ZeRO-1 over DP=2 (every large preset's setting) with checkpoint.async_save: the sharded Adam states save
    and resume, a checkpoint written in the background while the next step trains holds its own iteration's
    state, and checkpoint.keep_last deletes older checkpoints but not the one resumed from."""
    steps = ["training.train_steps=4", "optimizer.use_distributed_optimizer=true", "checkpoint.async_save=true"]
    straight = _run(tmp_path, "straight", *steps, "checkpoint.save_interval=2")
    run_workers(train_worker, 2, straight)
    written_during_step_3 = Path(straight.checkpoint.dir) / "iter_0000002"
    resumed = _run(tmp_path, "resumed", *steps, "checkpoint.save_interval=1", "checkpoint.keep_last=1")
    root = _resume_from_a_copy(written_during_step_3, resumed)
    run_workers(train_worker, 2, resumed)
    expected = _scalars(Path(straight.logging.tensorboard_dir), "train/loss")
    assert sorted(expected) == [1, 2, 3, 4]
    assert _scalars(Path(resumed.logging.tensorboard_dir), "train/loss") == {3: expected[3], 4: expected[4]}
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]  # 3 deleted


def _load_losses_worker(rank, runs, path):
    """Load checkpoint ``path`` at each run's layout in turn, in one process group: the loss of one forward pass
    before the load (the fresh weights) and after it, at each."""
    losses = []
    for run in runs:
        distributed.initialize(run)  # the process group stays: only megatron-core's parallel groups change
        trainer = Trainer(run)

        def loss():
            return trainer._run_microbatches(trainer._iterators(trainer.train_data, 0), forward_only=True).item()

        untrained = loss()
        checkpointing.load(Path(path), trainer.models, None, run)
        losses.append((untrained, loss()))
        parallel_state.destroy_model_parallel()
    distributed.shutdown()
    return losses


def _train_then_load_worker(rank, saved, runs):
    """Train ``saved``, then load its last checkpoint at ``runs``' layouts in the same processes (one start-up)."""
    distributed.initialize(saved)
    Trainer(saved).train()
    parallel_state.destroy_model_parallel()
    return _load_losses_worker(rank, runs, checkpointing.resolve(Path(saved.checkpoint.dir)))


def test_checkpoint_loads_at_another_layout(tmp_path):
    """A TP=2 checkpoint loads at TP=2, at PP=2 (the two processes that trained it, regrouped) and at TP=1 (one
    process), and gives the same loss at each, not the fresh weights' loss."""
    saved = _run(tmp_path, "tp2", "training.train_steps=3", "parallel.tensor_parallel=2")
    fresh = [f"checkpoint.dir={tmp_path / 'none'}"]
    two = [_run(tmp_path, "a", "parallel.tensor_parallel=2", *fresh),
           _run(tmp_path, "c", "parallel.pipeline_parallel=2", *fresh)]
    tp2, pp2 = run_workers(_train_then_load_worker, 2, saved, two)[0]
    path = str(checkpointing.resolve(Path(saved.checkpoint.dir)))
    [tp1] = run_workers(_load_losses_worker, 1, [_run(tmp_path, "b", *fresh)], path)[0]
    assert tp1[1] != pytest.approx(tp1[0], rel=1e-6), "the trained weights give the untrained loss: nothing loaded"
    assert tp2[1] == pytest.approx(tp1[1], rel=1e-6), "TP=2 load"
    assert pp2[1] == pytest.approx(tp1[1], rel=1e-6), "PP=2 load"


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
        replace(source, target)
        if point == "after the rename" and Path(target).name == "iter_0000004":
            die()

    checkpointing.dist_checkpointing.save = write_then_die
    checkpointing.os.replace = publish_then_die
    distributed.initialize(run)
    Trainer(run).train()


# where a save of iteration 4 is killed (the next start resumes from 2). test_checkpoint_publish.py stops a save at
# every step in one process; a real kill and a real resume run at the two points that leave different folders: a
# partial iter_0000004.tmp, and a complete iter_0000004 that `latest` does not name yet.
KILL_POINTS = ("writing the data", "after the rename")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_anywhere_resumes_from_a_complete_checkpoint(tmp_path, point):
    run = _run(tmp_path, "killed", "training.train_steps=6", "checkpoint.save_interval=2")
    with pytest.raises(AssertionError, match="died without reporting"):
        run_workers(_killed_during_save_worker, 1, run, point)
    root = Path(run.checkpoint.dir)
    assert checkpointing.latest_iteration(root) == 2
    assert (root / "iter_0000004").exists() == (point == "after the rename")
    # the next start ends at iteration 4, so `latest` must name the checkpoint it saved (or found saved)
    resumed = _run(tmp_path, "killed", "training.train_steps=4", "checkpoint.save_interval=2")
    run_workers(train_worker, 1, resumed)
    assert checkpointing.latest_iteration(root) == 4
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    losses = _scalars(Path(run.logging.tensorboard_dir), "train/loss")
    assert set(losses) == set(range(1, 5))


def _pretrain_process(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """pretrain_epas.py on the tiny preset and mock data, in a session of its own (to find its children)."""
    args = ["data.mock=true", f"data.cache_dir={tmp_path / 'cache'}", "training.log_interval=1",
            "training.eval_interval=0", *overrides]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pretrain_epas.py"), "--config", TINY, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True,
        env=env,
    )


def test_a_rank_that_stops_answering_fails_the_run_within_the_timeout_naming_the_collective(tmp_path):
    """Rank 0 of two stops (SIGSTOP: a hung process or a lost node, as the others see it) once training runs:
    rank 1 gives up within distributed.timeout_minutes (6 s) with one line that names the collective, and
    exits 1 instead of hanging."""
    port, ranks = free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        ranks.append(_pretrain_process(tmp_path, "training.train_steps=1000", "distributed.timeout_minutes=0.1",
                                       env=env))
    stopped, waiting = ranks  # rank 1, the last, prints the log lines
    watchdog = threading.Timer(120, waiting.kill)  # a hang fails the test instead of holding it
    watchdog.start()
    try:
        started = []
        for line in waiting.stdout:
            started.append(line)
            if line.startswith("iteration      2/"):
                break
        assert started[-1].startswith("iteration      2/"), "".join(started)
        stopped.send_signal(signal.SIGSTOP)
        since, lines = time.monotonic(), []
        for line in waiting.stdout:
            lines.append(line)
            if line.startswith("error: "):
                took = time.monotonic() - since
        output = "".join(lines)
        assert waiting.wait(timeout=60) == 1, output
        messages = [line for line in lines if line.startswith("error: ")]
        assert len(messages) == 1, output
        assert re.match(r"error: a collective \((\w+, called|awaited) in \S+:\d+ \w+\) timed out after 0.1 minutes on "
                        r"rank 1: another rank stopped answering .*; see that rank's log. distributed.timeout_minutes",
                        messages[0])
        assert "Traceback" not in output
        assert took < 6 + 10, took
    finally:
        watchdog.cancel()
        for process in ranks:
            process.kill()  # the stopped one too
            process.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_current_step_and_exits_cleanly(tmp_path, stop_signal):
    """SIGTERM as SLURM sends it before a time limit, SIGINT as Ctrl-C sends it: save, then exit 0."""
    checkpoint_dir = tmp_path / "sigterm" / "ckpt"
    process = _pretrain_process(tmp_path, "data.micro_batch_size=2", "data.global_batch_size=8",
                                "training.train_steps=100000", f"checkpoint.dir={checkpoint_dir}")
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("iteration      3/"):
            process.send_signal(stop_signal)
            break
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    assert f"received a stop signal ({stop_signal.name}): saving at iteration" in output
    assert "Traceback" not in output
    saved_at = int(output.split("saving at iteration ")[1].split()[0])
    assert saved_at >= 3
    assert checkpointing.latest_iteration(checkpoint_dir) == saved_at


def _session(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


@pytest.mark.parametrize("async_save", [False, True])
def test_a_kill_during_a_save_leaves_no_process_behind(tmp_path, async_save):
    """megatron-core's checkpoint writer starts helper processes (with checkpoint.async_save, a forked writer that
    runs while training goes on); a SIGKILLed trainer must take them along."""
    process = _pretrain_process(tmp_path, "training.train_steps=100000", "checkpoint.save_interval=1",
                                f"checkpoint.dir={tmp_path / 'ckpt'}", f"checkpoint.async_save={async_save}")
    try:
        for line in process.stdout:
            if line.startswith("saved checkpoint"):
                break
        deadline = time.monotonic() + 60
        while len(_session(process.pid)) < 2 and time.monotonic() < deadline:  # the writer's helpers
            time.sleep(0.01)
        assert len(_session(process.pid)) >= 2, "the save started no helper process to test with"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while _session(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _session(process.pid), [p.cmdline() for p in _session(process.pid)]
    finally:
        process.kill()
        process.wait()
        for left in _session(process.pid):
            left.kill()


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path):
    args = ["training.train_steps=4", "optimizer.warmup_steps=1", "checkpoint.save_interval=2",
            f"checkpoint.dir={tmp_path / 'ckpt'}"]
    first = _pretrain_process(tmp_path, *args)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    shard = tmp_path / "ckpt" / "iter_0000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short

    again = _pretrain_process(tmp_path, *args)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert f"warning: {shard}" in output and "Resuming from" in output and "iter_0000002 instead" in output
    assert "loaded" in output and "resuming at iteration 2" in output
    assert checkpointing.latest_iteration(tmp_path / "ckpt") == 4
    checkpointing.verify_checkpoint(tmp_path / "ckpt" / "iter_0000004")  # saved again, complete


def test_a_full_disk_fails_the_save_by_name_and_keeps_the_previous_checkpoint(tmp_path):
    """A 24 MiB tmpfs holds one 15 MB checkpoint of the tiny preset, not two (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        process = _pretrain_process(tmp_path, "training.train_steps=4", "optimizer.warmup_steps=1",
                                    "checkpoint.save_interval=2",
                                    f"checkpoint.dir={disk / 'ckpt'}")
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 2, output
        (message,) = [line for line in output.splitlines() if line.startswith("error: ")]
        assert "no space left on the device of" in message and "while saving iteration 4" in message
        assert "`latest` still points at the complete iter_0000002" in message
        assert "Traceback" not in output
        root = disk / "ckpt"
        assert checkpointing.latest_iteration(root) == 2
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- a real run --------------------------------------------------------------------------------


def test_training_on_real_text_lowers_the_loss_and_logs_every_metric(tmp_path, monkeypatch):
    """The demo corpus for 60 steps: the loss falls, TensorBoard and W&B (offline) hold the same metrics and the
    resolved config, and the profiler window traces the EPAS work of two iterations."""
    from epas.data.demo_corpus import main as build_corpus
    from analysis.plot_runs import plot_runs

    assert build_corpus(["--output-dir", str(tmp_path / "demo")]) == 0
    run = load_config(TINY, [
        f"data.paths=[{tmp_path / 'demo' / 'corpus'}]", f"data.tokenizer={tmp_path / 'demo' / 'tokenizer'}",
        f"data.cache_dir={tmp_path / 'cache'}", "training.train_steps=60", "training.log_interval=1",
        "training.eval_interval=30", "training.eval_steps=2", "training.peak_tflops=1.0",
        "optimizer.warmup_steps=5", "epas.interval=15", f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=30", f"logging.tensorboard_dir={tmp_path / 'tb'}",
        "logging.wandb_project=epas-test", "logging.wandb_run_name=real-text", "logging.wandb_tags=[cpu,demo]",
        f"logging.wandb_dir={tmp_path}", "profiling.start_step=20", "profiling.num_steps=2",
        "profiling.record_shapes=true",
    ])
    validate_run(run, 1)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the worker inherits it
    run_workers(train_worker, 1, run)

    tensorboard = tmp_path / "tb"
    losses = _scalars(tensorboard, "train/loss")
    first, last = [sum(losses[s] for s in steps) / 5 for steps in (range(1, 6), range(56, 61))]
    assert last < first - 1.0, (first, last)
    valid = _scalars(tensorboard, "valid/loss")
    assert sorted(valid) == [30, 60] and valid[60] < valid[30]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_gpu", "train/mfu",
                "memory/peak_resident_gb_max", "memory/peak_resident_gb_min"):
        values = _scalars(tensorboard, tag)
        assert sorted(values) == list(range(1, 61)) and all(v > 0 for v in values.values()), tag
    sharing = _scalars(tensorboard, "epas/num_sharing_layers")
    assert [sharing[s] for s in (15, 16, 31, 46, 60)] == [0, 1, 2, 3, 3]  # grows after steps 15, 30, 45
    assert checkpointing.latest_iteration(tmp_path / "ckpt") == 60
    assert (tmp_path / "ckpt" / "iter_0000030" / "run_config.yaml").is_file()
    written = plot_runs([tensorboard], tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "throughput.png"]

    wandb_run = read_offline_run(tmp_path)
    assert (wandb_run.project, wandb_run.name, wandb_run.tags) == ("epas-test", "real-text", ["cpu", "demo"])
    assert as_float32(wandb_run.series()) == tensorboard_series(tensorboard)
    texts = tensorboard_texts(tensorboard)
    resolved = json.loads(json.dumps(to_dict(run)))
    assert yaml.safe_load(texts.pop(CONFIG_TAG)[0].removeprefix("```yaml\n").removesuffix("```")) == resolved
    assert wandb_run.texts() == texts and len(texts["epas/sharing_layers"]) == 3
    assert {key: value for key, value in wandb_run.config.items() if key != "_wandb"} == resolved

    # iterations 20 and 21 train with one sharing layer, in two micro-batches each
    trace = json.loads((tensorboard / "profile" / "rank0.20.pt.trace.json").read_text())["traceEvents"]
    ranges = Counter(event["name"] for event in trace if event.get("name", "").startswith("epas/"))
    work = ("epas/publish_shared", "epas/take_shared", "epas/project_v_only", "epas/context_from_shared_probabilities")
    assert ranges == {name: 4 for name in work}
    assert any("Input Dims" in event.get("args", {}) for event in trace)  # profiling.record_shapes


def _nonfinite_worker(rank, run, poison_at=None):
    """Train ``run``; with ``poison_at``, one gradient turns NaN at that iteration (the loss stays finite).

    Returns the error (or None), the skipped-step count, the LR scheduler's steps, whether the weights
    after the poisoned step equal those before it, and whether ``latest``'s saved weights are finite.
    """
    distributed.initialize(run)
    trainer = Trainer(run)
    run_microbatches, train_step, weights = trainer._run_microbatches, trainer.train_step, {}

    def poisoned(iterators, forward_only):
        loss = run_microbatches(iterators, forward_only)
        if not forward_only and trainer.iteration + 1 == poison_at:
            trainer.chunks[0].buffers[0].grad_data[0] = float("nan")
        return loss

    def recorded():
        metrics = train_step()
        weights[trainer.iteration] = [p.detach().clone() for p in trainer.models[0].parameters()]
        return metrics

    trainer._run_microbatches, trainer.train_step = poisoned, recorded
    try:
        trainer.train()
        error = None
    except NonFiniteStepError as raised:
        error = str(raised)
    unchanged = poison_at in weights and all(
        (a == b).all() for a, b in zip(weights[poison_at - 1], weights[poison_at])
    )
    checkpointing.load(checkpointing.resolve(Path(run.checkpoint.dir)), trainer.models, None, run)
    result = (error, trainer.guard.skipped, trainer.lr_scheduler.num_steps, unchanged,
              weights_finite(trainer.models))
    distributed.shutdown()
    return result


def test_a_step_with_nan_gradients_is_never_applied_nor_saved(tmp_path):
    """The reproducer of a NaN checkpoint published as `latest`: a huge LR, a save every step."""
    run = _run(tmp_path, "nan", "training.train_steps=6", "checkpoint.save_interval=1",
               "optimizer.lr=1.0e+6", "optimizer.min_lr=0.0")
    (error, _, _, _, saved_finite), = run_workers(_nonfinite_worker, 1, run)
    assert error is not None and "not finite at iteration" in error and "override_on_resume" in error
    failed_at = int(error.split("at iteration ")[1].split(";")[0])
    root = Path(run.checkpoint.dir)
    assert checkpointing.latest_iteration(root) == failed_at - 1 and saved_finite
    assert not (root / f"iter_{failed_at:07d}").exists() and not list(root.glob("*.tmp"))


def test_nan_gradients_stop_or_skip_the_step_as_configured(tmp_path):
    stop = _run(tmp_path, "stop", "training.train_steps=6", "checkpoint.save_interval=2")
    (error, *_), = run_workers(_nonfinite_worker, 1, stop, 3)
    assert error.startswith("the gradients are not finite at iteration 3; the step was not applied")
    assert checkpointing.latest_iteration(Path(stop.checkpoint.dir)) == 2

    skip = _run(tmp_path, "skip", "training.train_steps=6", "checkpoint.save_interval=2",
                "training.on_nonfinite=skip")
    (error, skipped, lr_steps, unchanged, saved_finite), = run_workers(_nonfinite_worker, 1, skip, 3)
    assert error is None and skipped == 1 and lr_steps == 5 and unchanged and saved_finite
    assert checkpointing.latest_iteration(Path(skip.checkpoint.dir)) == 6
    assert _scalars(Path(skip.logging.tensorboard_dir), "train/skipped_steps")[6] == 1


def _resume_settings_worker(rank, first, refused, overridden):
    """Train ``first``; resume with a new LR and betas without and with optimizer.override_on_resume."""
    distributed.initialize(first)
    Trainer(first).train()
    try:
        Trainer(refused)
        message = None
    except ConfigError as error:
        message = str(error)
    trainer = Trainer(overridden)
    group = trainer.optimizer.param_groups[0]
    result = message, trainer.lr_scheduler.max_lr, trainer.lr_scheduler.lr_decay_steps, group["betas"], group["eps"]
    distributed.shutdown()
    return result


def test_resume_refuses_a_new_learning_rate_unless_told_to_override(tmp_path):
    first = _run(tmp_path, "resume", "training.train_steps=3")
    changed = ["training.train_steps=5", "optimizer.lr=1.0e-3", "optimizer.adam_beta2=0.99", "optimizer.adam_eps=1.0e-6"]
    refused = _run(tmp_path, "resume", *changed)
    overridden = _run(tmp_path, "resume", *changed, "optimizer.override_on_resume=true")
    (message, max_lr, decay_steps, betas, eps), = run_workers(
        _resume_settings_worker, 1, first, refused, overridden
    )
    assert "optimizer.lr=0.001 (checkpoint: 0.002)" in message and "override_on_resume=true" in message
    assert (max_lr, decay_steps, betas, eps) == (1e-3, 5, (0.9, 0.99), 1e-6)


def _memory_worker(rank):
    import torch
    import torch.distributed as dist

    from megatron_training import metrics

    dist.init_process_group("gloo")
    metrics._peak_memory_gb = lambda: {"allocated": [3.0, 7.0, 5.0][rank], "reserved": [8.0, 8.0, 9.0][rank]}
    values = metrics.peak_memory_by_rank(torch.device("cpu"))
    dist.destroy_process_group()
    return values, metrics.describe_memory(values)


def test_peak_memory_is_gathered_from_every_rank():
    (values, line), *others = run_workers(_memory_worker, 3)
    assert all(other == (values, line) for other in others)  # every rank gets the same figures
    assert values == {"memory/peak_allocated_gb_max": 7.0, "memory/peak_allocated_gb_min": 3.0,
                      "memory/peak_allocated_gb_max_rank": 1, "memory/peak_reserved_gb_max": 9.0,
                      "memory/peak_reserved_gb_min": 8.0, "memory/peak_reserved_gb_max_rank": 2}
    assert line == ("peak memory per rank: allocated 7.00 GiB on rank 1 (least: 3.00), "
                    "reserved 9.00 GiB on rank 2 (least: 8.00)")
