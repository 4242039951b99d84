"""Process-group and model-parallel start-up shared by the trainer, the tools and the tests.

Every process group waits at most ``distributed.timeout_minutes`` for the other ranks in a collective.
On gloo a collective that waits longer raises in the waiting rank, which :func:`collectives_explained`
turns into one line naming the collective; on NCCL the process group's watchdog ends the process with
its own line (``Watchdog caught collective operation timeout: WorkNCCL(... OpType=ALLREDUCE ...)``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patches import cpu_bridge
from epas.config import RunConfig
from epas.errors import EpasError


def initialize(run: RunConfig) -> None:
    """Start torch.distributed (gloo on CPU, NCCL on GPU) and megatron-core's parallel groups.

    Launched without torchrun, the process becomes a world of one so tools and the demo run
    as plain ``python`` commands.
    """
    if run.device == "cpu":
        cpu_bridge.enable()
    elif run.device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {run.device!r}")
    if not dist.is_initialized():
        backend = "gloo" if run.device == "cpu" else "nccl"
        if run.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun, SLURM or the tests' launcher set the world; a plain `python` command is a world of
        # one, with no network port needed
        world = {} if "WORLD_SIZE" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend, timeout=timedelta(minutes=run.distributed.timeout_minutes), **world)
    parallel = run.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        distributed_timeout_minutes=run.distributed.timeout_minutes,
    )
    model_parallel_cuda_manual_seed(run.seed)


class CollectiveFailed(EpasError):
    """A collective gave up on another rank: it stopped answering, or its connection closed."""

    every_rank = True  # only the ranks left waiting see it


# what gloo says (lower case) when a peer does not answer in time, or has gone
_TIMED_OUT = ("timed out waiting", "wait timeout", "operation timed out", "application timeout caused pair closure")
_PEER_GONE = ("connection closed by peer", "connection reset by peer")


def _collective_in(error: BaseException) -> str:
    """The torch.distributed call that failed and the code that made it, from the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    calls = [i for i, frame in enumerate(frames) if frame.filename.endswith("distributed_c10d.py")]
    if not calls:  # an asynchronous collective, failing where its handle is waited for
        caller = frames[-1]
        return f"awaited in {_short(caller.filename)}:{caller.lineno} {caller.name}"
    call = frames[calls[0]]
    callers = [frame for frame in frames[: calls[0]] if "torch/distributed" not in frame.filename]
    if not callers:
        return call.name
    return f"{call.name}, called in {_short(callers[-1].filename)}:{callers[-1].lineno} {callers[-1].name}"


def _short(filename: str) -> str:
    """A source file from its package down (megatron/core/..., megatron_training/...)."""
    parts = Path(filename).parts
    for index, part in enumerate(parts):
        if part in ("megatron", "megatron_training", "megatron_patches", "torch"):
            return "/".join(parts[index:])
    return filename


@contextmanager
def collectives_explained(run: RunConfig):
    """Turn a gloo collective that timed out, or lost its peer, into one :class:`CollectiveFailed` line."""
    try:
        yield
    except RuntimeError as error:  # gloo's errors (torch.distributed.DistBackendError is one too)
        text, rank = str(error).lower(), os.environ.get("RANK", "0")  # the process group is gone by now
        if any(marker in text for marker in _TIMED_OUT):
            what = (f"timed out after {run.distributed.timeout_minutes:g} minutes on rank {rank}: another rank "
                    "stopped answering (hung, stopped, crashed, or lost its node); see that rank's log. "
                    "distributed.timeout_minutes sets the limit")
        elif any(marker in text for marker in _PEER_GONE):
            what = f"failed on rank {rank}: another rank closed its connection (it crashed or was killed); see its log"
        else:
            raise
        raise CollectiveFailed(f"a collective ({_collective_in(error)}) {what}") from error


def shutdown() -> None:
    """Tear down the parallel groups and the process group (tests start several in a row)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere a no-op).

    For the helper processes multiprocessing spawns from a trainer (megatron-core's checkpoint
    writer starts a manager process): after a ``kill -9`` of the trainer they would live on, blocked
    on a pipe, holding the memory of a full import of the recipe.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
