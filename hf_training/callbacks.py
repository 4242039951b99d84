"""Trainer callbacks: the EPAS schedule, saving and stopping as pretrain_epas.py does, the profiler window and
the trackers.

The Trainer's ``global_step`` counts completed optimizer steps, which is exactly what
epas.scheduler.SharingScheduler takes, so the region grows at the same steps as in
pretrain_epas.py and a resumed run continues the schedule from its checkpoint's step.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from epas.config import LoggingConfig, OptimizerConfig, ProfilingConfig
from epas.errors import ConfigError
from epas.profiling import StepProfiler
from epas.scheduler import SharingScheduler
from epas.trackers import TensorBoardTracker

SCHEDULE_FILE = "epas_schedule.json"
# what a resumed Trainer takes from its checkpoint whatever the config says: the optimizer's groups (rate, weight
# decay, Adam's betas and eps) and the LR scheduler's base rate
RESTORED_OPTIMIZER_SETTINGS = ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")


class EpasScheduleCallback(TrainerCallback):
    """Sets the model's sharing set before every optimizer step, logs its size and saves the schedule, with the
    optimizer settings a resume restores from the checkpoint (so a resume can tell when they were changed)."""

    def __init__(self, model, scheduler: SharingScheduler, optimizer: OptimizerConfig):
        self.model, self.scheduler = model, scheduler
        self.optimizer_settings = {key: getattr(optimizer, key) for key in RESTORED_OPTIMIZER_SETTINGS}

    def _apply(self, completed_steps: int) -> None:
        self.scheduler.completed_steps = completed_steps
        layers = list(self.scheduler.current)
        if layers != self.model.config.sharing_layers:
            self.model.set_sharing_layers(layers)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # the step is complete: what the next one (and a checkpoint taken now) trains with
        self._apply(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            # the set the logged steps trained with (the step's own set, before a growth at its end); the
            # Trainer has already stored these logs in its history (trainer_state.json), so they get it too
            size = len(self.scheduler.sharing_layers_at(state.global_step - 1))
            logs["epas/num_sharing_layers"] = size
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["epas/num_sharing_layers"] = size

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            schedule = self.scheduler.state_dict() | {"optimizer": self.optimizer_settings}
            (folder / SCHEDULE_FILE).write_text(json.dumps(schedule, indent=2) + "\n")


class SaveAndStopCallback(TrainerCallback):
    """Saves the last step, and saves and stops on SIGTERM/SIGUSR1 (SLURM's pre-emption and time-limit
    warnings) or at a step divisible by ``exit_interval``; all ranks agree on the step to stop after."""

    def __init__(self, exit_interval: int | None = None):
        self.exit_interval = exit_interval
        self.stop_signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)

    def _request_stop(self, signum, frame):
        self.stop_signal = signum

    def _signalled_anywhere(self, device) -> bool:
        flag = torch.tensor([self.stop_signal is not None], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True  # a finished run is resumable (to more steps) like any other
        reason = None
        if self._signalled_anywhere(args.device):
            reason = "received a stop signal"
        elif self.exit_interval and state.global_step % self.exit_interval == 0:
            reason = f"training.exit_interval={self.exit_interval} reached"
        if reason and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"{reason}: saving at step {state.global_step} and stopping", flush=True)


class ProfilerCallback(TrainerCallback):
    """The ``profiling.*`` window (torch trace or Nsight Systems' capture range) over optimizer steps, counted
    from the resumed step as pretrain_epas.py counts iterations."""

    def __init__(self, settings: ProfilingConfig, tensorboard_dir: str | None):
        self.settings, self.tensorboard_dir = settings, tensorboard_dir
        self.profiler = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.profiler = StepProfiler(self.settings, state.global_step, args.device.type == "cuda", self.tensorboard_dir)

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.close()


def check_resumed_schedule(checkpoint: str | Path, scheduler: SharingScheduler, optimizer: OptimizerConfig) -> None:
    """Refuse to resume a Trainer checkpoint saved with other EPAS settings, or with optimizer settings the
    checkpoint would silently restore over the config's (ConfigError names the fix)."""
    state = json.loads((Path(checkpoint) / SCHEDULE_FILE).read_text())
    scheduler.load_state_dict(state)
    saved = state.get("optimizer", {})  # absent from checkpoints of earlier versions
    changed = [f"optimizer.{key}={getattr(optimizer, key)!r} (checkpoint: {saved[key]!r})"
               for key in RESTORED_OPTIMIZER_SETTINGS if key in saved and saved[key] != getattr(optimizer, key)]
    if changed:
        raise ConfigError(
            f"resuming {checkpoint} with another {', '.join(changed)}: the Trainer restores the optimizer and its "
            "learning rate from the checkpoint, so the new values would be silently ignored. Drop these overrides, "
            f"or train on with them as a new run from the checkpoint's weights (model={checkpoint}, a new "
            "training.output_dir, data.tokenizer=the tokenizer)"
        )


def tracking_callbacks(settings: LoggingConfig, trackers: list) -> list:
    """The Trainer's own TensorBoard and W&B callbacks for the trackers ``settings`` names, to be placed after
    :class:`EpasScheduleCallback` so that they log the sharing size it adds. They write to the trackers started
    on the main process (TensorBoard's writer, the W&B run holding the config); the W&B callback adds the
    Trainer's arguments to the run's config."""
    callbacks = []
    if settings.tensorboard_dir:
        writer = next((tracker.writer for tracker in trackers if isinstance(tracker, TensorBoardTracker)), None)
        callbacks.append(TensorBoardCallback(writer))
    if settings.wandb_project:
        callbacks.append(WandbCallback())
    return callbacks
