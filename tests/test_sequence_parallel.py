"""Sequence parallelism with the local spec and sharing blocks active (gloo).

TP=2 with sequence parallelism gives the loss and every gradient of TP=1, also under PP=2 with a
sharing block across the stage boundary and with a region growing across it (the cases and the
single-stage reference of ``tests/test_pipeline.py``). Gradients are taken after megatron-core's
``finalize_model_grads``, as in training, which sums the norms' partial gradients over the
tensor-parallel ranks. Training keeps the norms identical on both ranks, and its checkpoint gives
the same loss at TP=1.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from epas.errors import ConfigError
from megatron_patches import pipeline
from megatron_patches.model import transformer_config
from megatron_training import checkpointing, distributed
from megatron_training.builders import build_chunks
from megatron_training.trainer import Trainer
from megatron_training.validation import validate_run
from tests.model_utils import check_rank_results, load_weights, relative_error, tp_shard
from tests.multiprocess import run_workers
from tests.test_pipeline import (
    GROWING, MICRO_BATCH, MICRO_BATCHES, SEQ, SPANNING, _forward_step, _global_name, _layout_run, _single_stage,
)
from tests.test_training import _run


def _sp_run(mode: str, pp: int = 1):
    run = _layout_run(mode, tp=2, pp=pp)
    run.parallel.sequence_parallel = True
    return run


def _sp_worker(rank, pp, cases):
    distributed.initialize(_sp_run("qk", pp))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    results = []
    for mode, state, iterations in cases:
        run = _sp_run(mode, pp)
        config = transformer_config(run)
        config.finalize_model_grads_func = finalize_model_grads  # as the trainer does
        (chunk,) = build_chunks(run, config)  # inside megatron-core's DDP: gradients land in main_grad
        (model,) = unwrap_model([chunk])
        load_weights(model, {
            name: tp_shard(_global_name(model, name), state[_global_name(model, name)], tp_rank, 2)
            for name, _ in model.named_parameters()
        })
        for sharing, batches, expected_grads in iterations:
            chunk.zero_grad_buffer()
            model.set_sharing_layers(sharing)
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iter(batches),
                model=chunk,
                num_microbatches=MICRO_BATCHES,
                seq_length=model.p2p_seq_length(SEQ),
                micro_batch_size=MICRO_BATCH,
            )
            loss = sum(item["loss"] for item in losses).item() / MICRO_BATCHES if losses else None
            errors = {}
            for name, param in model.named_parameters():
                full = _global_name(model, name)
                errors[full] = relative_error(param.main_grad, tp_shard(full, expected_grads[full], tp_rank, 2))
            worst = max(errors, key=errors.get)
            results.append((mode, sharing, loss, worst, errors[worst]))
    distributed.shutdown()
    return results


@pytest.mark.slow
@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("pp", [1, 2], ids=["tp2_sp", "tp2_sp_pp2"])
def test_sequence_parallel_equals_single_process(pp):
    """Both modes; one block across the PP boundary (3|4), and a region growing across it."""
    cases, expected_losses = [], {}
    for mode in ("qk", "kv"):
        for sets in ([SPANNING], GROWING) if pp > 1 else ([SPANNING],):  # growth matters at a boundary
            case, losses = _single_stage(mode, sets)
            cases.append(case)
            expected_losses.update({(mode, s): loss for s, loss in zip(sets, losses)})

    check_rank_results(run_workers(_sp_worker, 2 * pp, pp, cases), expected_losses, pp)


def _train_worker(rank, run):
    """Train; return this rank's norm weights, which every tensor-parallel rank holds in full."""
    distributed.initialize(run)
    trainer = Trainer(run)
    trainer.train()
    norms = {name: p.detach().clone() for name, p in trainer.models[0].named_parameters() if "layernorm" in name}
    distributed.shutdown()
    return norms


def _checkpoint_loss_worker(rank, run, path, sharing):
    distributed.initialize(run)
    trainer = Trainer(run)
    checkpointing.load(Path(path), trainer.models, None, run)
    for model in trainer.models:
        model.set_sharing_layers(sharing)
    loss = trainer._run_microbatches(trainer._iterators(trainer.train_data, 0), forward_only=True)
    distributed.shutdown()
    return loss.item()


@pytest.mark.slow
def test_sequence_parallel_training_and_checkpoint(tmp_path):
    """Training at TP=2+SP keeps the norms identical on both ranks; its checkpoint gives the same loss at TP=1."""
    sp = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    trained = _run(tmp_path, "sp", "training.train_steps=4", "epas.interval=2", *sp)  # steps 3-4 share layer 5
    norms = run_workers(_train_worker, 2, trained)
    assert norms[0].keys() == norms[1].keys() and len(norms[0]) == 2 * 6 + 1
    for name, weight in norms[0].items():
        assert torch.equal(weight, norms[1][name]), name

    path = str(checkpointing.resolve(Path(trained.checkpoint.dir)))
    fresh = [f"checkpoint.dir={tmp_path / 'none'}"]
    sharing = (3, 4, 5)
    at_sp = run_workers(_checkpoint_loss_worker, 2, _run(tmp_path, "a", *sp, *fresh), path, sharing)
    at_tp1 = run_workers(_checkpoint_loss_worker, 1, _run(tmp_path, "b", *fresh), path, sharing)
    assert at_sp[0] == pytest.approx(at_tp1[0], rel=1e-6)


def test_sequence_parallel_packing_round_trip():
    """Each TP rank sends its s/tp hidden rows plus ceil(s·w/h) rows of its own heads (docs/PIPELINE.md)."""
    config = transformer_config(_sp_run("qk", pp=2))
    hidden = torch.randn(SEQ // 2, MICRO_BATCH, 64)
    for mode, query_heads, width in (("qk", 2, (2 + 1) * 16), ("kv", 1, 2 * 16)):
        shared = (torch.randn(SEQ, MICRO_BATCH, query_heads, 16), torch.randn(SEQ, MICRO_BATCH, 1, 16))
        rows = pipeline.extra_rows(config, mode, SEQ)
        assert rows == math.ceil(SEQ * width / 64)
        packed = pipeline.pack(hidden, shared, rows)
        assert packed.shape == (SEQ // 2 + rows, MICRO_BATCH, 64)
        assert pipeline.p2p_seq_length(config, mode, SEQ) // 2 == packed.size(0)  # what the schedule sizes
        got_hidden, shared_rows, seq_length = pipeline.split(config, mode, packed)
        assert seq_length == SEQ and torch.equal(got_hidden, hidden)
        for got, expected in zip(pipeline.unpack(config, mode, shared_rows, seq_length), shared):
            assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor_parallel=1"], "needs parallel.tensor_parallel > 1; set parallel.sequence_parallel=false"),
        (["model.seq_length=63"], "model.seq_length=63 must be divisible by parallel.tensor_parallel=2"),
    ],
)
def test_sequence_parallel_config_errors(tmp_path, overrides, message):
    run = _run(tmp_path, "x", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(run, 2)


def test_sequence_parallel_with_local_spec_passes_validation(tmp_path):
    validate_run(_run(tmp_path, "x", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"), 2)
