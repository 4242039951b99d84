"""Sharing blocks across pipeline stages: every layout equals the single-stage model (gloo)."""

from __future__ import annotations

import re

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patches import pipeline
from megatron_training import distributed
from megatron_patches.model import build_model, transformer_config
from tests.model_utils import check_rank_results, load_weights, random_weights, relative_error, tiny_run, tp_shard
from tests.multiprocess import run_workers

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

LAYERS, MICRO_BATCHES, MICRO_BATCH, SEQ = 8, 4, 2, 16
# One block spanning three chunks under PP=4 / VPP, plus a block local to the last stage.
SPANNING = (2, 3, 4, 5, 7)
# The region grows across the 3|4 boundary between two iterations (p2p shapes change).
GROWING = [(5, 7), (4, 5, 7)]


def _layout_run(mode, tp=1, pp=1, vp=None, first=None, last=None):
    run = tiny_run(mode, num_layers=LAYERS, tp=tp)
    run.parallel.pipeline_parallel, run.parallel.virtual_pipeline = pp, vp
    run.parallel.first_stage_layers, run.parallel.last_stage_layers = first, last
    return run


def _batches():
    generator = torch.Generator().manual_seed(11)
    return [
        (
            torch.randint(0, 256, (MICRO_BATCH, SEQ), generator=generator),
            torch.randint(0, 256, (MICRO_BATCH, SEQ), generator=generator),
        )
        for _ in range(MICRO_BATCHES)
    ]


def _loss_func(output):
    loss = output.float().mean()
    return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    positions = torch.arange(SEQ).expand_as(tokens)
    return model(tokens, positions, None, labels=labels), _loss_func


def _global_name(chunk, name: str) -> str:
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not match:
        return name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def _pipeline_worker(rank, layouts, cases):
    """Every case at each of ``layouts`` (name -> layout, one world size) in turn, in one process group: the
    results by layout name."""
    results = {}
    for name, layout in layouts.items():
        distributed.initialize(_layout_run("qk", **layout))  # the process group stays, the parallel groups change
        results[name] = _layout_results(layout, cases)
        parallel_state.destroy_model_parallel()
    distributed.shutdown()
    return results


def _layout_results(layout, cases):
    run = _layout_run("qk", **layout)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = run.parallel.tensor_parallel
    vp = run.parallel.virtual_pipeline
    results = []
    for mode, state, iterations in cases:
        run = _layout_run(mode, **layout)
        config = transformer_config(run)
        chunks = []
        for index in range(vp or 1):
            stage = index if vp else None
            chunk = build_model(
                run,
                config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
            load_weights(chunk, {
                name: tp_shard(_global_name(chunk, name), state[_global_name(chunk, name)], tp_rank, tp)
                for name, _ in chunk.named_parameters()
            })
            chunks.append(chunk)
        for sharing, batches, expected_grads in iterations:
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
                chunk.set_sharing_layers(sharing)
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=[iter(batches) for _ in chunks] if vp else iter(batches),
                model=chunks if vp else chunks[0],
                num_microbatches=MICRO_BATCHES,
                seq_length=chunks[0].p2p_seq_length(SEQ),
                micro_batch_size=MICRO_BATCH,
            )
            loss = sum(item["loss"] for item in losses).item() / MICRO_BATCHES if losses else None
            errors = {}
            for chunk in chunks:
                for name, param in chunk.named_parameters():
                    full = _global_name(chunk, name)
                    errors[full] = relative_error(param.grad, tp_shard(full, expected_grads[full], tp_rank, tp))
            worst = max(errors, key=errors.get)
            results.append((mode, sharing, loss, worst, errors[worst]))
    return results


def _single_stage(mode, sharing_sets):
    """Weights and, per sharing set, the loss and gradients of the unsplit model."""
    model = build_model(_layout_run(mode))
    state = random_weights(model, seed=5)
    load_weights(model, state)
    batches = _batches()
    iterations, losses = [], []
    for sharing in sharing_sets:
        model.zero_grad(set_to_none=True)
        model.set_sharing_layers(sharing)
        total = 0.0
        for tokens, labels in batches:
            loss = model(tokens, torch.arange(SEQ).expand_as(tokens), None, labels=labels).mean()
            (loss / MICRO_BATCHES).backward()
            total += loss.item() / MICRO_BATCHES
        iterations.append((sharing, batches, {n: p.grad.clone() for n, p in model.named_parameters()}))
        losses.append(total)
    return (mode, state, iterations), losses


LAYOUTS = {  # name -> (layout, processes)
    "pp2": (dict(pp=2), 2),
    "tp2_pp2": (dict(tp=2, pp=2), 4),
    "pp2_vp2": (dict(pp=2, vp=2), 2),
    "pp4_uneven": (dict(pp=4, first=1, last=3), 4),  # four stages, starting at layers 1, 3, 5
}


@pytest.fixture(scope="module")
def layout_results(megatron_cpu):
    """The single-stage cases and their losses, and a function giving one layout's per-rank results. The layouts
    of one world size run in one group of processes (one start-up), the first time one of them is asked for."""
    cases, expected_losses = [], {}
    for mode in ("qk", "kv"):
        for sets in ([SPANNING], GROWING):
            case, losses = _single_stage(mode, sets)
            cases.append(case)
            expected_losses.update({(mode, s): loss for s, loss in zip(sets, losses)})
    by_layout = {}

    def results(layout):
        world = LAYOUTS[layout][1]
        if layout not in by_layout:
            group = {name: kwargs for name, (kwargs, size) in LAYOUTS.items() if size == world}
            by_rank = run_workers(_pipeline_worker, world, group, cases)
            by_layout.update({name: [ranks[name] for ranks in by_rank] for name in group})
        return by_layout[layout]

    return results, expected_losses


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_layout_equals_single_stage(layout, layout_results):
    results, expected_losses = layout_results
    check_rank_results(results(layout), expected_losses, layout)


def test_chunk_boundaries_and_packing_round_trip():
    config = transformer_config(_layout_run("qk", pp=2, vp=2))
    assert pipeline.chunk_start_layers(config) == {2, 4, 6}
    uneven = transformer_config(_layout_run("qk", pp=4, first=1, last=3))
    assert pipeline.chunk_start_layers(uneven) == {1, 3, 5}
    hidden = torch.randn(SEQ, MICRO_BATCH, 64)
    for mode in ("qk", "kv"):
        query_heads = 4 if mode == "qk" else 2
        shared = (torch.randn(SEQ, MICRO_BATCH, query_heads, 16), torch.randn(SEQ, MICRO_BATCH, 2, 16))
        rows = pipeline.extra_rows(config, mode, SEQ)
        packed = pipeline.pack(hidden, shared, rows)
        assert packed.shape == (pipeline.p2p_seq_length(config, mode, SEQ), MICRO_BATCH, 64)
        got_hidden, shared_rows, seq_length = pipeline.split(config, mode, packed)
        assert seq_length == SEQ and torch.equal(got_hidden, hidden)
        for got, expected in zip(pipeline.unpack(config, mode, shared_rows, seq_length), shared):
            assert torch.equal(got, expected)
