"""Run a test function on several CPU processes joined by gloo (what torchrun does on a cluster)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from queue import Empty

import psutil
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args):
    os.setpgrp()  # a group of its own: whatever it starts (checkpoint writers) can be reaped with it
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    # one thread per worker, as torchrun sets it: workers outnumber the cores, and OpenMP threads spinning in
    # one rank starve the rank it waits for (a 4-process layout takes about twice as long with torch's default)
    torch.set_num_threads(1)
    try:
        # plain pickle copies tensors into the message: torch's shared-memory handles would
        # die with this process before the parent reads them
        queue.put((rank, pickle.dumps(fn(rank, *args)), None))
    except BaseException:  # report every failure to the parent, which re-raises it
        queue.put((rank, None, traceback.format_exc()))


def run_workers(fn, world_size: int, *args, timeout: float = 600) -> list:
    """Call ``fn(rank, *args)`` in ``world_size`` fresh processes; return results by rank.

    Raises if a worker raises, dies without reporting (e.g. killed) or the group exceeds
    ``timeout`` seconds; the other workers are then terminated.
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_entry, args=(fn, rank, world_size, port, queue, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, result, error = queue.get(timeout=1.0)
            except Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"a worker died without reporting (exit codes {dead})")
                if time.monotonic() > deadline:
                    raise AssertionError(f"workers did not finish within {timeout} s")
                continue
            results[rank] = None if error else pickle.loads(result)
            if error:
                errors.append(f"rank {rank}:\n{error}")
                break
    finally:
        for process in processes:
            process.join(timeout=5 if errors or len(results) < world_size else None)
            if process.is_alive():
                process.terminate()
            _reap_group(process.pid)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]


_groups: set[int] = set()  # the process group of every worker started


def _reap_group(pid: int) -> None:
    """Kill what a worker left running (e.g. a checkpoint writer whose parent was SIGKILLed)."""
    _groups.add(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def surviving_processes() -> list[str]:
    """Processes still running in a worker's group: orphans the harness failed to reap."""
    survivors = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:  # dead, waiting for init to collect it
            continue
        try:
            if os.getpgid(process.pid) in _groups:
                survivors.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return survivors


def train_worker(rank, run):
    """One rank of a pretraining run (for :func:`run_workers`)."""
    from megatron_training import distributed
    from megatron_training.trainer import Trainer

    distributed.initialize(run)
    Trainer(run).train()
    distributed.shutdown()


def train_runs_worker(rank, runs):
    """One rank of several pretraining runs of one parallel layout, one after the other in the same processes
    (one start-up for all); each starts from its seed, as in a fresh process."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_training import distributed
    from megatron_training.trainer import Trainer

    distributed.initialize(runs[0])
    for run in runs:
        model_parallel_cuda_manual_seed(run.seed)
        Trainer(run).train()
    distributed.shutdown()
