"""A torch-profiler window over a few training iterations (``profiling.*``), on the ranks listed.

The trace (``rank<R>.<first iteration>.pt.trace.json``) opens in Perfetto (ui.perfetto.dev), in
chrome://tracing and in TensorBoard's PyTorch profiler plugin. The EPAS work is named in it by the
``epas/...`` ranges of megatron_patches (the shared-tensor hand-off, the V-only or Q-only projection,
the pipeline packing). On CUDA, ``profiling.memory_snapshot`` also records every allocation of the
window (``rank<R>.<first iteration>.memory_snapshot.pickle``, for pytorch.org/memory_viz).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, ProfilerAction

from epas.config import RunConfig

RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def trace_dir(run: RunConfig) -> Path:
    return Path(run.profiling.dir or Path(run.logging.tensorboard_dir) / "profile")


class StepProfiler:
    """Profiles iterations ``start_step`` .. ``start_step + num_steps - 1`` (one warm-up iteration before).

    :meth:`step` is called after every iteration; the trace is written when the window ends, or at
    :meth:`close` if training ends inside it.
    """

    def __init__(self, run: RunConfig, completed: int):
        settings, self.rank = run.profiling, dist.get_rank()
        self.profiler = None
        if settings.start_step is None or self.rank not in settings.ranks:
            return
        before = settings.start_step - 1 - completed  # iterations to run before the window
        if before < 0:
            print(f"rank {self.rank}: profiling.start_step={settings.start_step} is not after the resumed iteration "
                  f"{completed}: nothing is profiled", flush=True)
            return
        self.first, self.last = settings.start_step, settings.start_step + settings.num_steps - 1
        self.iteration = completed
        self.dir = trace_dir(run)
        self.memory = settings.memory_snapshot and run.device == "cuda"
        self.recording_memory = False
        warmup = min(1, before)
        self.profiler = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device == "cuda" else []),
            schedule=torch.profiler.schedule(wait=before - warmup, warmup=warmup, active=settings.num_steps,
                                             repeat=1),
            on_trace_ready=self._write,
            record_shapes=settings.record_shapes,
        )
        self.profiler.start()
        self._record_memory_in_window()

    def step(self) -> None:
        """An iteration has ended."""
        if self.profiler is None:
            return
        self.iteration += 1
        self.profiler.step()
        if self.iteration >= self.last:
            self.close()  # the window is over (and written)
        else:
            self._record_memory_in_window()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _record_memory_in_window(self) -> None:
        """Start the allocation history as the window's first iteration begins."""
        if self.memory and not self.recording_memory and self.profiler.current_action in RECORDING:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self.recording_memory = True

    def _write(self, profiler) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}.{self.first}"
        profiler.export_chrome_trace(str(self.dir / f"{name}.pt.trace.json"))
        written = [f"{name}.pt.trace.json"]
        if self.recording_memory:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"{name}.memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(f"{name}.memory_snapshot.pickle")
        print(f"rank {self.rank}: profiled iterations {self.first}-{min(self.last, self.iteration)}: "
              f"{', '.join(written)} in {self.dir}", flush=True)
