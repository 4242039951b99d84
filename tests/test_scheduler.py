"""Algorithm 1: deep-to-shallow growth at exact steps, exact resume, every configuration error."""

from __future__ import annotations

import pytest

from megatron_training import distributed
from epas import scheduler as scheduler_module
from epas.config import EPASConfig, RunConfig
from epas.errors import ConfigError
from epas.scheduler import SharingScheduler, resolve_target_layers
from tests.multiprocess import run_workers


def test_grows_deep_to_shallow_at_exact_steps():
    scheduler = SharingScheduler(12, EPASConfig(num_sharing_layers=6, growth=2, interval=10))
    assert scheduler.target == (6, 7, 8, 9, 10, 11)
    changed_at, sets = [], {}
    for step in range(1, 1001):
        if scheduler.step():
            changed_at.append(step)
        sets[step] = scheduler.current
    assert changed_at == [10, 20, 30]
    assert sets[9] == () and sets[10] == (10, 11) and sets[20] == (8, 9, 10, 11)
    assert sets[30] == sets[1000] == (6, 7, 8, 9, 10, 11)
    assert scheduler.growth_steps == [(10, (10, 11)), (20, (8, 9, 10, 11)), (30, sets[30])]


def test_start_step_and_last_layer_excluded():
    scheduler = SharingScheduler(8, EPASConfig(num_sharing_layers=2, interval=5, start_step=7, include_last_layer=False))
    assert scheduler.target == (5, 6)
    assert [scheduler.sharing_layers_at(s) for s in (11, 12, 17)] == [(), (6,), (5, 6)]


def test_explicit_list_and_blocks_grow_deepest_first():
    listed = SharingScheduler(10, EPASConfig(sharing_layers=[9, 2, 5], interval=1))
    assert [listed.sharing_layers_at(s) for s in (1, 2, 3)] == [(9,), (5, 9), (2, 5, 9)]
    blocks = SharingScheduler(22, EPASConfig(num_sharing_layers=6, num_blocks=3, interval=1, growth=2))
    assert blocks.target == (14, 15, 17, 18, 20, 21)
    assert [blocks.sharing_layers_at(s) for s in (1, 2)] == [(20, 21), (17, 18, 20, 21)]


def test_resume_mid_schedule_is_exact():
    epas = EPASConfig(num_sharing_layers=4, interval=4)
    first = SharingScheduler(8, epas)
    for _ in range(7):
        first.step()
    resumed = SharingScheduler(8, epas)
    resumed.load_state_dict(first.state_dict())
    for _ in range(20):
        assert first.step() == resumed.step()
        assert first.current == resumed.current
    other = SharingScheduler(8, EPASConfig(num_sharing_layers=4, interval=5))
    with pytest.raises(ConfigError, match="interval=4 but this run has interval=5"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sharing_layers=[0, 3]), "epas.sharing_layers: layer 0 cannot share"),
        (dict(sharing_layers=[3, 8]), r"epas.sharing_layers: sharing layers \[8\] are outside the model's 0\.\.7"),
        (dict(sharing_layers=[-1]), "outside the model's 0..7"),
        (dict(sharing_layers=[3, 3]), "lists a layer twice"),
        (dict(num_sharing_layers=3, growth=2), "not a multiple of epas.growth=2"),
        (dict(num_sharing_layers=2, interval=0), "epas.interval must be at least 1"),
        (dict(num_sharing_layers=2, growth=0), "epas.growth must be at least 1"),
        (dict(start_step=-1), "epas.start_step must be 0 or more"),
        (dict(mode="q"), "epas.mode must be one of"),
        (dict(num_sharing_layers=8), "do not fit in 8 layers"),
        (dict(num_sharing_layers=6, num_blocks=3), "do not fit in 8 layers"),
        (dict(num_sharing_layers=4, num_blocks=3), "cannot be split into epas.num_blocks=3"),
        (dict(num_sharing_layers=2, sharing_layers=[5, 6]), "not both"),
    ],
)
def test_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve_target_layers(8, EPASConfig(**settings))


def _agreement_worker(rank, extra_steps_on_rank1):
    distributed.initialize(RunConfig(device="cpu"))
    scheduler = SharingScheduler(8, EPASConfig(num_sharing_layers=2, interval=1))
    for _ in range(1 + (extra_steps_on_rank1 if rank == 1 else 0)):
        scheduler.step()
    try:
        scheduler.check_same_on_all_ranks()
        return "agree"
    except RuntimeError as error:
        return str(error)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_ranks_are_checked_for_agreement():
    assert run_workers(_agreement_worker, 2, 0) == ["agree", "agree"]
    for result in run_workers(_agreement_worker, 2, 1):
        assert "ranks disagree on the EPAS schedule" in result


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
