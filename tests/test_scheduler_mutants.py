"""Edges of the sharing schedule that `make mutation` found untested: the checkpointed schedule's keys, a block
reaching down to layer 1, and the comparison of the ranks' schedules."""

from __future__ import annotations

import pytest

from epas import scheduler as scheduler_module
from epas.config import EPASConfig
from epas.scheduler import SharingScheduler


def test_the_checkpointed_state_keeps_its_keys():
    """Checkpoints written so far hold these keys: renaming one makes every earlier run unresumable."""
    scheduler = SharingScheduler(8, EPASConfig(num_sharing_layers=4, growth=2, interval=5, start_step=3))
    for _ in range(9):
        scheduler.step()
    saved = {"completed_steps": 9, "target": [4, 5, 6, 7], "interval": 5, "growth": 2, "start_step": 3}
    assert scheduler.state_dict() == saved
    resumed = SharingScheduler(8, EPASConfig(num_sharing_layers=4, growth=2, interval=5, start_step=3))
    resumed.load_state_dict(saved)
    assert resumed.current == scheduler.current == (6, 7)


def test_a_block_may_reach_down_to_layer_1():
    """Layer 0 has no source, layer 1 has layer 0: the largest block that fits starts there."""
    assert SharingScheduler(4, EPASConfig(num_sharing_layers=3, interval=1)).target == (1, 2, 3)
    two_blocks = EPASConfig(num_sharing_layers=4, num_blocks=2, include_last_layer=False, interval=1)
    assert SharingScheduler(7, two_blocks).target == (1, 2, 4, 5)


@pytest.mark.parametrize("other_rank, agrees", [((9, (6, 7)), True), ((8, (6, 7)), False), ((9, (7,)), False)])
def test_the_rank_check_compares_steps_and_sharing_sets(monkeypatch, other_rank, agrees):
    """The check of tests/test_scheduler.py (two real ranks) with a stand-in for the other rank's answer."""
    scheduler = SharingScheduler(8, EPASConfig(num_sharing_layers=4, growth=2, interval=5, start_step=3))
    for _ in range(9):
        scheduler.step()

    def all_gather_object(answers, mine):
        answers[:] = [mine, other_rank]

    monkeypatch.setattr(scheduler_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(scheduler_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(scheduler_module.dist, "all_gather_object", all_gather_object)
    if agrees:
        scheduler.check_same_on_all_ranks()
    else:
        with pytest.raises(RuntimeError, match=r"ranks disagree on the EPAS schedule"):
            scheduler.check_same_on_all_ranks()
