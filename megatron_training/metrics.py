"""Console lines and the experiment trackers of the training loop (written by the last rank only)."""

from __future__ import annotations

import resource
import sys

import torch

from epas.config import LoggingConfig
from epas.trackers import start_trackers


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Hands every scalar and text to each tracker (TensorBoard, W&B) alike; one readable console line per log
    interval. ``config`` (the resolved run) is stored with each tracker's run."""

    def __init__(self, settings: LoggingConfig, config: dict, enabled: bool):
        self.enabled = enabled
        self.trackers = start_trackers(settings, config) if enabled else []

    def scalars(self, step: int, values: dict) -> None:
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        for tracker in self.trackers:
            tracker.text(step, tag, text)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
