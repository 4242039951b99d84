"""Shared fixtures: megatron-core initialised once per test process on CPU (gloo, TP=1).

megatron is imported inside its fixture, so the Hugging Face model tests also run in an
environment with transformers alone (e.g. to check another transformers version).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def no_orphans():
    """Fail the run if a multi-process test left a process behind (each worker's group is reaped)."""
    yield
    from tests.multiprocess import surviving_processes

    survivors = surviving_processes()
    assert not survivors, f"processes outlived their test: {survivors}"


@pytest.fixture(scope="session")
def megatron_cpu():
    """A world of one process with megatron-core's parallel groups (TP=PP=1) on CPU."""
    from megatron_training import distributed
    from epas.config import RunConfig

    distributed.initialize(RunConfig(device="cpu"))
    yield
    distributed.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread, and OpenMP threads stall badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
