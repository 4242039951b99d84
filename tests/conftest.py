"""Shared fixtures: megatron-core initialised once per test process on CPU (gloo, TP=1)."""

from __future__ import annotations

import pytest

from megatron_patches import distributed
from megatron_patches.config import RunConfig


@pytest.fixture(scope="session")
def megatron_cpu():
    """A world of one process with megatron-core's parallel groups (TP=PP=1) on CPU."""
    distributed.initialize(RunConfig(device="cpu"))
    yield
    distributed.shutdown()
