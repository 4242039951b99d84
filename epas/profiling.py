"""A profiler window over a few training iterations (``profiling.*``), on the ranks listed; pretrain_epas.py
steps it after every iteration, finetune_epas.py after every optimizer step.

``profiling.tool=torch``: the trace (``rank<R>.<first iteration>.pt.trace.json``) opens in Perfetto
(ui.perfetto.dev), in chrome://tracing and in TensorBoard's PyTorch profiler plugin. On CUDA,
``profiling.memory_snapshot`` also records every allocation of the window
(``rank<R>.<first iteration>.memory_snapshot.pickle``, for pytorch.org/memory_viz).

``profiling.tool=nsys``: the window is Nsight Systems' capture range (``cudaProfilerStart`` /
``cudaProfilerStop``, for ``nsys profile --capture-range=cudaProfilerApi``, as launch/torchrun.sh
``--nsys`` runs it), with every operator an NVTX range; nsys writes the report.

Either way pretrain_epas.py's EPAS work is named by the ``epas/...`` ranges of megatron_patches (the
shared-tensor hand-off, the V-only or Q-only projection, the pipeline packing).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, ProfilerAction

from epas.config import ProfilingConfig
from epas.errors import ConfigError

RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def check_profiling(settings: ProfilingConfig, tensorboard_dir: str | None, world_size: int, cuda: bool) -> None:
    """Settings that need another setting (or CUDA) to mean anything; ConfigError names the fix."""
    if settings.tool == "nsys":
        if settings.start_step is None:
            raise ConfigError("profiling.tool=nsys captures the iterations from profiling.start_step, which is not "
                              "set; set profiling.start_step=N (and profiling.num_steps)")
        if settings.memory_snapshot:
            raise ConfigError("profiling.memory_snapshot is written by the torch profiler (profiling.tool=torch); "
                              "with profiling.tool=nsys add --cuda-memory-usage=true to nsys instead")
        if not cuda:
            raise ConfigError("profiling.tool=nsys records CUDA work (cudaProfilerStart/Stop, NVTX) but this run is "
                              "on the CPU; use profiling.tool=torch, or run on a GPU (pretrain_epas.py: device=cuda)")
    if settings.start_step is None:
        return
    if settings.tool == "torch" and not (settings.dir or tensorboard_dir):
        raise ConfigError("profiling.start_step is set but there is nowhere to write the traces; set "
                          "profiling.dir (or logging.tensorboard_dir, whose profile/ folder is then used)")
    outside = [rank for rank in settings.ranks if rank >= world_size]
    if outside:
        raise ConfigError(f"profiling.ranks={settings.ranks} names rank(s) {outside} of a world of "
                          f"{world_size} processes; give ranks below {world_size}")


def trace_dir(settings: ProfilingConfig, tensorboard_dir: str | None) -> Path:
    return Path(settings.dir or Path(tensorboard_dir) / "profile")


class StepProfiler:
    """Profiles iterations ``start_step`` .. ``start_step + num_steps - 1`` with ``profiling.tool``.

    :meth:`step` is called after every iteration; the window ends after its last iteration, or at
    :meth:`close` if training ends inside it.
    """

    def __init__(self, settings: ProfilingConfig, completed: int, cuda: bool, tensorboard_dir: str | None = None):
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.recorder = None
        if settings.start_step is None or rank not in settings.ranks:
            return
        if settings.start_step <= completed:
            print(f"rank {rank}: profiling.start_step={settings.start_step} is not after the resumed iteration "
                  f"{completed}: nothing is profiled", flush=True)
            return
        self.iteration = completed
        self.last = settings.start_step + settings.num_steps - 1
        if settings.tool == "nsys":
            self.recorder = NsysCapture(settings, rank, completed)
        else:
            self.recorder = TorchTrace(settings, rank, completed, self.last, cuda, trace_dir(settings, tensorboard_dir))

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

    def __init__(self, settings: ProfilingConfig, rank: int, completed: int, last: int, cuda: bool, folder: Path):
        self.rank, self.first, self.last, self.iteration = rank, settings.start_step, last, completed
        self.dir = folder
        self.memory = settings.memory_snapshot and cuda
        self.recording_memory = False
        before = self.first - 1 - completed  # iterations to run before the window
        warmup = min(1, before)
        self.profiler = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
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

    def __init__(self, settings: ProfilingConfig, rank: int, completed: int):
        self.rank, self.first, self.iteration = rank, settings.start_step, completed
        self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=settings.record_shapes)
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
