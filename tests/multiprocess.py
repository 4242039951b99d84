"""Run a test function on several CPU processes joined by gloo (what torchrun does on a cluster)."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        queue.put((rank, fn(rank, *args), None))
    except BaseException:  # report every failure to the parent, which re-raises it
        queue.put((rank, None, traceback.format_exc()))


def run_workers(fn, world_size: int, *args, timeout: float = 300) -> list:
    """Call ``fn(rank, *args)`` in ``world_size`` fresh processes; return results by rank."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(fn, rank, world_size, port, queue, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results, errors = {}, []
    for _ in processes:
        rank, result, error = queue.get()
        results[rank] = result
        if error:
            errors.append(f"rank {rank}:\n{error}")
    for process in processes:
        process.join(timeout)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
