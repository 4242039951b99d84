"""TP=2 gives the loss and gradients of TP=1 with sharing layers active (gloo, 2 processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_training import distributed
from megatron_patches.model import build_model
from tests.model_utils import lm_loss, load_weights, random_weights, relative_error, tiny_run, tp_shard
from tests.multiprocess import run_workers

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

SHARING = {"qk": (2, 3, 5), "kv": (3, 4, 5)}


def _tp2_worker(rank, cases, tokens, labels):
    distributed.initialize(tiny_run(tp=2))
    results = {}
    for mode, (state, expected_grads) in cases.items():
        model = build_model(tiny_run(mode, tp=2))
        load_weights(model, {name: tp_shard(name, t, rank, 2) for name, t in state.items()})
        model.set_sharing_layers(SHARING[mode])
        loss = lm_loss(model, tokens, labels)
        loss.backward()
        errors = {
            name: relative_error(p.grad, tp_shard(name, expected_grads[name], rank, 2))
            for name, p in model.named_parameters()
        }
        results[mode] = (loss.item(), errors)
    distributed.shutdown()
    return results


@pytest.mark.usefixtures("megatron_cpu")
def test_tp2_equals_tp1_with_sharing():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 16), generator=generator)
    labels = torch.randint(0, 256, (2, 16), generator=generator)
    cases, tp1_losses = {}, {}
    for mode, sharing in SHARING.items():
        model = build_model(tiny_run(mode))
        state = random_weights(model, seed=len(mode) + sharing[0])
        load_weights(model, state)
        model.set_sharing_layers(sharing)
        loss = lm_loss(model, tokens, labels)
        loss.backward()
        tp1_losses[mode] = loss.item()
        cases[mode] = (state, {name: p.grad for name, p in model.named_parameters()})

    for rank_results in run_workers(_tp2_worker, 2, cases, tokens, labels):
        for mode, (loss, errors) in rank_results.items():
            assert loss == pytest.approx(tp1_losses[mode], rel=1e-6)
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-5, (mode, worst, errors[worst])
