"""Pipeline packing in one process, for every sequence length, both modes, TP 1/2 and sequence parallelism.

tests/test_pipeline.py shows that pipelines with packed shared tensors train like one stage (several processes);
these check the packing itself against sizes computed here from the model's shape, so ``make mutation`` has a
quick test for each line of megatron_patches/pipeline.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_patches import pipeline
from megatron_patches.model import transformer_config
from tests.model_utils import tiny_run

HIDDEN, HEADS, GROUPS, HEAD_DIM, BATCH = 96, 8, 2, 8, 3  # GQA, and head_dim * heads != hidden


def _config(tp: int, sequence_parallel: bool) -> SimpleNamespace:
    return SimpleNamespace(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, hidden_size=HIDDEN,
        num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=HEAD_DIM,
    )


def _shared(mode: str, tp: int, seq_length: int):
    """A source's pair on one TP rank as [seq, batch, heads, head_dim]: Q and K (qk) or K and V (kv)."""
    first_heads = HEADS // tp if mode == "qk" else GROUPS // tp
    generator = torch.Generator().manual_seed(seq_length)
    return (
        torch.randn(seq_length, BATCH, first_heads, HEAD_DIM, generator=generator),
        torch.randn(seq_length, BATCH, GROUPS // tp, HEAD_DIM, generator=generator),
    )


LAYOUTS = [(1, False), (2, False), (2, True)]


@pytest.mark.parametrize("mode", ["qk", "kv"])
@pytest.mark.parametrize("tp, sequence_parallel", LAYOUTS, ids=["tp1", "tp2", "tp2-sp"])
def test_pack_split_unpack_round_trip_at_every_length(mode, tp, sequence_parallel):
    config = _config(tp, sequence_parallel)
    factor = tp if sequence_parallel else 1
    for seq_length in range(factor, 41, factor):
        shared = _shared(mode, tp, seq_length)
        elements = sum(t[:, 0].numel() for t in shared)  # per micro-batch sample
        rows = pipeline.extra_rows(config, mode, seq_length)
        assert rows == math.ceil(elements / HIDDEN)
        hidden = torch.randn(seq_length // factor, BATCH, HIDDEN)  # this rank's part of the sequence
        packed = pipeline.pack(hidden, shared, rows)
        # the schedule's buffer: p2p_seq_length rows over the whole sequence, of which this rank holds 1/factor
        assert packed.shape == (pipeline.p2p_seq_length(config, mode, seq_length) // factor, BATCH, HIDDEN)
        assert pipeline.p2p_seq_length(config, mode, seq_length) % factor == 0
        flat = packed[len(hidden):].reshape(-1)
        assert torch.equal(flat[:elements * BATCH], torch.cat([t.reshape(-1) for t in shared]))
        assert not flat[elements * BATCH:].any()  # padding is zeros

        got_hidden, got_rows, got_length = pipeline.split(config, mode, packed)
        assert got_length == seq_length and torch.equal(got_hidden, hidden), seq_length
        for got, sent in zip(pipeline.unpack(config, mode, got_rows, got_length), shared):
            assert got.shape == sent.shape and torch.equal(got, sent)


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_a_boundary_without_shared_tensors_sends_zero_rows_of_the_same_shape(mode):
    config = _config(1, False)
    hidden = torch.randn(12, BATCH, HIDDEN)
    rows = pipeline.extra_rows(config, mode, 12)
    empty = pipeline.pack(hidden, None, rows)
    assert empty.shape == pipeline.pack(hidden, _shared(mode, 1, 12), rows).shape
    assert torch.equal(empty[:12], hidden) and not empty[12:].any()


def test_row_counts_that_match_no_sequence_length_are_refused():
    config = _config(1, False)
    valid = {n // 1 + pipeline.extra_rows(config, "qk", n) for n in range(1, 60)}
    invalid = min(set(range(2, 60)) - valid)
    with pytest.raises(RuntimeError, match=f"received {invalid} rows"):
        pipeline.split(config, "qk", torch.zeros(invalid, BATCH, HIDDEN))


def test_shared_width_is_the_pair_on_one_rank():
    for tp in (1, 2):
        config = _config(tp, False)
        assert pipeline.shared_width(config, "qk") == (HEADS + GROUPS) // tp * HEAD_DIM
        assert pipeline.shared_width(config, "kv") == 2 * GROUPS // tp * HEAD_DIM


@pytest.mark.parametrize(
    "parallel, starts",
    [
        (dict(pipeline_parallel=1), set()),
        (dict(pipeline_parallel=2), {4}),
        (dict(pipeline_parallel=2, virtual_pipeline=2), {2, 4, 6}),
        (dict(pipeline_parallel=4, first_stage_layers=1, last_stage_layers=3), {1, 3, 5}),
    ],
    ids=["pp1", "pp2", "pp2-vp2", "pp4-uneven"],
)
def test_chunk_start_layers(parallel, starts):
    run = tiny_run(num_layers=8)
    for key, value in parallel.items():
        setattr(run.parallel, key, value)
    assert pipeline.chunk_start_layers(transformer_config(run)) == starts


def test_packing_is_named_in_profiler_traces():
    config, shared = _config(1, False), _shared("kv", 1, 12)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        packed = pipeline.pack(torch.randn(12, BATCH, HIDDEN), shared, pipeline.extra_rows(config, "kv", 12))
        _, rows, seq_length = pipeline.split(config, "kv", packed)
        pipeline.unpack(config, "kv", rows, seq_length)
    ranges = [event.name for event in profiler.events() if event.name.startswith("epas/")]
    assert ranges == ["epas/pipeline_pack", "epas/pipeline_split", "epas/pipeline_unpack"]
