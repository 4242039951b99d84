"""Console lines and the experiment trackers of the training loop (written by the last rank only)."""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

from epas.config import LoggingConfig
from epas.trackers import start_trackers


def _peak_memory_gb() -> dict[str, float]:
    """This process's peak GPU memory allocated and reserved, or on CPU its peak resident memory."""
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.max_memory_allocated() / 2**30,
                "reserved": torch.cuda.max_memory_reserved() / 2**30}
    return {"resident": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def peak_memory_by_rank(device: torch.device) -> dict[str, float]:
    """Every rank's peak memory (GiB), gathered: ``memory/peak_{kind}_gb_max``, ``_min`` and ``_max_rank``.

    Collective. The ranks differ: with pipeline parallelism the first stage holds the most activations,
    the last the output layer, so one rank's figure can hide the one that runs out of memory.
    """
    local = _peak_memory_gb()
    mine = torch.tensor(list(local.values()), dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    by_rank = torch.stack(every)
    values = {}
    for column, kind in enumerate(local):
        gb = by_rank[:, column]
        values[f"memory/peak_{kind}_gb_max"] = gb.max().item()
        values[f"memory/peak_{kind}_gb_min"] = gb.min().item()
        values[f"memory/peak_{kind}_gb_max_rank"] = int(gb.argmax())
    return values


def describe_memory(values: dict[str, float]) -> str:
    """One console line for :func:`peak_memory_by_rank`'s values."""
    kinds = [key[len("memory/peak_"):-len("_gb_max")] for key in values if key.endswith("_gb_max")]
    parts = [f"{kind} {values[f'memory/peak_{kind}_gb_max']:.2f} GiB on rank "
             f"{values[f'memory/peak_{kind}_gb_max_rank']} (least: {values[f'memory/peak_{kind}_gb_min']:.2f})"
             for kind in kinds]
    return "peak memory per rank: " + ", ".join(parts)


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
