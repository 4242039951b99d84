"""A profiler window over a few training iterations (``profiling.*``), on the ranks listed.

``profiling.tool=torch``: the trace (``rank<R>.<first iteration>.pt.trace.json``) opens in Perfetto
(ui.perfetto.dev), in chrome://tracing and in TensorBoard's PyTorch profiler plugin. On CUDA,
``profiling.memory_snapshot`` also records every allocation of the window
(``rank<R>.<first iteration>.memory_snapshot.pickle``, for pytorch.org/memory_viz).

``profiling.tool=nsys``: the window is Nsight Systems' capture range (``cudaProfilerStart`` /
``cudaProfilerStop``, for ``nsys profile --capture-range=cudaProfilerApi``, as launch/torchrun.sh
``--nsys`` runs it), with every operator an NVTX range; nsys writes the report.

Either way the EPAS work is named by the ``epas/...`` ranges of megatron_patches (the shared-tensor
hand-off, the V-only or Q-only projection, the pipeline packing).
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
    """Profiles iterations ``start_step`` .. ``start_step + num_steps - 1`` with ``profiling.tool``.

    :meth:`step` is called after every iteration; the window ends after its last iteration, or at
    :meth:`close` if training ends inside it.
    """

    def __init__(self, run: RunConfig, completed: int):
        settings, rank = run.profiling, dist.get_rank()
        self.recorder = None
        if settings.start_step is None or rank not in settings.ranks:
            return
        if settings.start_step <= completed:
            print(f"rank {rank}: profiling.start_step={settings.start_step} is not after the resumed iteration "
                  f"{completed}: nothing is profiled", flush=True)
            return
        self.iteration = completed
        self.last = settings.start_step + settings.num_steps - 1
        recorder = NsysCapture if settings.tool == "nsys" else TorchTrace
        self.recorder = recorder(run, rank, settings.start_step, self.last, completed)

    def step(self) -> None:
        """An iteration has ended."""
        if self.recorder is None:
            return
        self.iteration += 1
        self.recorder.after(self.iteration)
        if self.iteration >= self.last:
            self.close()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None


class TorchTrace:
    """``torch.profiler`` over iterations ``first`` .. ``last`` (one warm-up iteration before), written at the end."""

    def __init__(self, run: RunConfig, rank: int, first: int, last: int, completed: int):
        settings = run.profiling
        self.rank, self.first, self.last, self.iteration = rank, first, last, completed
        self.dir = trace_dir(run)
        self.memory = settings.memory_snapshot and run.device == "cuda"
        self.recording_memory = False
        before = first - 1 - completed  # iterations to run before the window
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

    def after(self, iteration: int) -> None:
        self.iteration = iteration
        self.profiler.step()
        if iteration < self.last:
            self._record_memory_in_window()

    def stop(self) -> None:
        self.profiler.stop()  # writes the trace if the window was cut short

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


class NsysCapture:
    """Nsight Systems' capture range over iterations ``first`` .. ``last``: ``cudaProfilerStart`` before the
    first, ``cudaProfilerStop`` after the last, every operator (and EPAS range) an NVTX range in between
    (``emit_nvtx``), so the report holds the window alone and no warm-up or start-up time."""

    def __init__(self, run: RunConfig, rank: int, first: int, last: int, completed: int):
        self.rank, self.first, self.iteration = rank, first, completed
        self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=run.profiling.record_shapes)
        self.capturing = False
        self._start_if_due()

    def after(self, iteration: int) -> None:
        self.iteration = iteration
        self._start_if_due()

    def stop(self) -> None:
        if not self.capturing:
            return
        torch.cuda.synchronize()  # the window's kernels end inside the capture
        self.nvtx.__exit__(None, None, None)
        torch.cuda.profiler.stop()
        self.capturing = False
        print(f"rank {self.rank}: Nsight Systems captured iterations {self.first}-{self.iteration}; "
              "nsys writes the report when this process exits", flush=True)

    def _start_if_due(self) -> None:
        if self.iteration == self.first - 1:
            torch.cuda.profiler.start()
            self.nvtx.__enter__()
            self.capturing = True
