"""Shared activations across pipeline stages, packed into megatron-core's single p2p tensor.

megatron-core's schedules send one ``[rows, micro_batch, hidden]`` tensor between stages and
back-propagate through it alone. When a sharing block starts on one stage (or virtual chunk)
and continues on the next, the source's Q/K (or K/V) ride along as extra rows appended to the
hidden states (dim 0, which survives sequence parallelism); their gradients come back the same
way. Every message carries the same number of rows (the schedules use one shape), and none are
added while no sharing block crosses a boundary. Packing and unpacking are named ``epas/pipeline_*``
in profiler traces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_patches.ranges import in_range


def chunk_start_layers(config) -> set[int]:
    """0-based indices of the layers that begin a pipeline stage or virtual chunk (not layer 0)."""
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vp is None else range(vp)
    starts = {
        get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank)
        for rank in range(pp)
        for stage in stages
    }
    return starts - {0}


def shared_width(config, mode: str) -> int:
    """Elements per token and micro-batch sample of the shared pair on one tensor-parallel rank."""
    tp = config.tensor_model_parallel_size
    head_dim = config.kv_channels
    query = config.num_attention_heads // tp * head_dim
    key_value = config.num_query_groups // tp * head_dim
    return (query + key_value) if mode == "qk" else 2 * key_value


def extra_rows(config, mode: str, seq_length: int) -> int:
    """Rows of ``[micro_batch, hidden]`` that the shared pair of one micro-batch occupies."""
    return math.ceil(seq_length * shared_width(config, mode) / config.hidden_size)


def _sequence_parallel_factor(config) -> int:
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def p2p_seq_length(config, mode: str, seq_length: int) -> int:
    """The ``seq_length`` to hand the schedule so its p2p buffers hold hidden plus shared rows."""
    return seq_length + extra_rows(config, mode, seq_length) * _sequence_parallel_factor(config)


@in_range("epas/pipeline_pack")
def pack(hidden: torch.Tensor, shared, rows: int) -> torch.Tensor:
    """Append the shared tensors (or zeros when this boundary carries none) as ``rows`` rows."""
    batch, width = hidden.shape[1:]
    if shared is None:
        return torch.cat([hidden, hidden.new_zeros(rows, batch, width)])
    flat = torch.cat([t.reshape(-1) for t in shared]).to(hidden.dtype)
    flat = F.pad(flat, (0, rows * batch * width - flat.numel()))
    return torch.cat([hidden, flat.view(rows, batch, width)])


@in_range("epas/pipeline_split")
def split(config, mode: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Split a received tensor into hidden rows and shared rows; also return the sequence length.

    The sequence length is recovered from the row count, which grows strictly with it.
    """
    total = tensor.size(0)
    factor = _sequence_parallel_factor(config)

    def rows(seq_length: int) -> int:
        return seq_length // factor + extra_rows(config, mode, seq_length)

    low, high = 1, total
    while low < high:  # smallest multiple k of the factor with rows(k * factor) >= total
        middle = (low + high) // 2
        if rows(middle * factor) >= total:
            high = middle
        else:
            low = middle + 1
    seq_length = low * factor
    if rows(seq_length) != total:
        raise RuntimeError(f"received {total} rows, which match no sequence length for EPAS packing")
    hidden_rows = seq_length // factor
    return tensor[:hidden_rows], tensor[hidden_rows:], seq_length


@in_range("epas/pipeline_unpack")
def unpack(config, mode: str, rows: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair ``[seq, batch, heads, head_dim]`` from the rows :func:`pack` appended."""
    tp, head_dim = config.tensor_model_parallel_size, config.kv_channels
    groups = config.num_query_groups // tp
    heads = (config.num_attention_heads // tp, groups) if mode == "qk" else (groups, groups)
    batch = rows.size(1)
    sizes = [seq_length * batch * h * head_dim for h in heads]
    flat = rows.reshape(-1)[: sum(sizes)]
    first, second = flat.split(sizes)
    return (
        first.view(seq_length, batch, heads[0], head_dim),
        second.view(seq_length, batch, heads[1], head_dim),
    )
