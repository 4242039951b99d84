"""Process-group and model-parallel start-up shared by the trainer, the tools and the tests."""

from __future__ import annotations

import ctypes
import os
import signal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patches import cpu_bridge
from epas.config import RunConfig


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
        if "WORLD_SIZE" in os.environ:  # torchrun, SLURM or the tests' launcher
            dist.init_process_group(backend)
        else:  # a plain `python` command: a world of one, no network port needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel = run.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
    )
    model_parallel_cuda_manual_seed(run.seed)


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
