"""Process groups wait distributed.timeout_minutes; a collective that fails on another rank is one line.

The end-to-end check (a rank stops answering, the other fails within the timeout) is
``tests/test_training.py::test_a_rank_that_stops_answering_fails_the_run_within_the_timeout_naming_the_collective``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from epas.config import RunConfig
from megatron_training.distributed import CollectiveFailed, collectives_explained

pytestmark = pytest.mark.usefixtures("megatron_cpu")


# megatron-core 0.16.1 creates it without the timeout it is given; it serves mixture-of-experts layers only
NO_TIMEOUT_GIVEN = {"EXPERT_DATA_PARALLEL_GROUP_GLOO"}


def test_every_process_group_waits_distributed_timeout_minutes():
    """The default group and each of megatron-core's (started by the fixture with the default 10 minutes),
    not torch's 30."""
    groups = [group for group in dist.distributed_c10d._world.pg_map if group.group_desc not in NO_TIMEOUT_GIVEN]
    assert len(groups) > 5
    for group in groups:
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        assert timeout == timedelta(minutes=RunConfig().distributed.timeout_minutes), group.group_desc


def _wait_for_a_peer(message: str):
    raise RuntimeError(message)


@pytest.mark.parametrize("gloo_says, expected", [
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete",
     "timed out after 0.1 minutes on rank 0: another rank stopped answering"),
    ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2953",
     "failed on rank 0: another rank closed its connection"),
])
def test_a_collective_failing_on_another_rank_is_one_line_naming_where(gloo_says, expected):
    run = RunConfig()
    run.distributed.timeout_minutes = 0.1
    with pytest.raises(CollectiveFailed) as failed, collectives_explained(run):
        _wait_for_a_peer(gloo_says)
    assert str(failed.value).startswith("a collective (awaited in ")
    assert "tests/test_distributed.py:" in str(failed.value) and " _wait_for_a_peer) " in str(failed.value)
    assert expected in str(failed.value) and failed.value.every_rank


def test_other_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match="^shape mismatch$"), collectives_explained(RunConfig()):
        raise RuntimeError("shape mismatch")
