"""When the trainer acts: each component owns one "should I act now" rule."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from epas.config import RunConfig


@dataclass
class Intervals:
    """Log, validate and save every so many iterations (0 or None: never; the last step always logs)."""

    log: int
    evaluate: int | None
    save: int | None
    last: int

    @classmethod
    def of(cls, run: RunConfig) -> "Intervals":
        training = run.training
        return cls(training.log_interval, training.eval_interval, run.checkpoint.save_interval, training.train_steps)

    def log_due(self, iteration: int) -> bool:
        return iteration % self.log == 0 or iteration == self.last

    def evaluate_due(self, iteration: int) -> bool:
        return bool(self.evaluate) and iteration % self.evaluate == 0

    def save_due(self, iteration: int) -> bool:
        return bool(self.save) and iteration % self.save == 0


class StopConditions:
    """Save and stop on SIGTERM/SIGUSR1 (a scheduler's warning), Ctrl-C, a time limit or an exit interval.

    The handlers are installed at construction, so a stop requested during start-up is honoured; the
    signal and time-limit decisions are agreed by all ranks, so every rank stops at the same iteration.
    A second Ctrl-C interrupts at once, without saving.
    """

    def __init__(self, run: RunConfig, device: torch.device):
        self.limit_minutes = run.training.exit_duration_minutes
        self.exit_interval = run.training.exit_interval
        self.device = device
        self.started = time.time()
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def start_clock(self) -> None:
        self.started = time.time()

    def reason(self, iteration: int) -> str | None:
        """Why to save and stop after ``iteration``, or None to go on."""
        out_of_time = self.limit_minutes is not None and (time.time() - self.started) / 60 > self.limit_minutes
        flags = torch.tensor([self.signal or 0, out_of_time], dtype=torch.int32).to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"received a stop signal ({signal.Signals(int(flags[0])).name})"
        if flags[1]:
            return f"exit_duration_minutes={self.limit_minutes} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"exit_interval={self.exit_interval} reached"
        return None


@dataclass
class ThroughputWindow:
    """The training steps since the last log line: their time and the FLOPs they really did."""

    steps: int = 0
    seconds: float = 0.0
    flops: float = 0.0

    def add(self, seconds: float, flops: float) -> None:
        self.steps, self.seconds, self.flops = self.steps + 1, self.seconds + seconds, self.flops + flops

    @property
    def step_time(self) -> float:
        return self.seconds / self.steps

    def tflops_per_device(self) -> float:
        return self.flops / self.seconds / dist.get_world_size() / 1e12
