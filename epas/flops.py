"""Matmul FLOP model of a LLaMA-style decoder with EPAS sharing layers.

The trainer uses it for TFLOP/s and MFU (FLOPs a sharing layer skips are not counted as done),
the benchmark for the predicted saving of a sharing configuration.

Counted, per token, at 2 FLOPs per multiply-add: per layer the fused QKV projection (only the
V rows in a QK-sharing layer, only the Q rows in a KV-sharing layer), the attention scores
Q·K^T and probs·V, the output projection and the SwiGLU MLP (fc1 of 2*ffn rows, fc2), plus the
final output layer. Norms, RoPE, softmax, activations and the embedding lookup are not matmuls
and count 0. ``causal=False`` (the default) counts the full s×s score matrix, which is what an
implementation without causal-block skipping computes (megatron-core's local
DotProductAttention), and is the convention that reproduces the paper's Table 1 (see
tests/test_flops.py). ``causal=True`` halves both attention matmuls, as FlashAttention does.
``reuses_probabilities=True`` drops Q·K^T from QK-sharing layers, which take their source's
attention probabilities where attention is unfused (the local spec; see
:mod:`megatron_patches.sharing_attention`). The paper counts it, as flash attention computes it.
"""

from __future__ import annotations

import functools

from epas.config import ModelConfig
from epas.sharing import check_mode, check_sharing_layers


def flops_breakdown(
    model: ModelConfig,
    sharing_layers=(),
    mode: str = "qk",
    seq_length: int | None = None,
    causal: bool = False,
    reuses_probabilities: bool = False,
) -> dict[str, int]:
    """Forward matmul FLOPs per token, by component (summed over layers)."""
    check_mode(mode)
    shared = set(check_sharing_layers(sharing_layers, model.num_layers))
    s = model.seq_length if seq_length is None else seq_length
    h, d = model.hidden_size, model.head_dim
    q_rows = model.num_attention_heads * d
    kv_rows = model.query_groups * d
    local_rows = {"qk": kv_rows, "kv": q_rows}[mode]  # the rows a sharing layer still computes
    n_shared = len(shared)
    n_compute = model.num_layers - n_shared

    # Q·K^T and probs·V: per token s keys × heads × head_dim multiply-adds each.
    attention_per_matmul = s * model.num_attention_heads * d * (1 if causal else 2)
    attention_matmuls = 2 * model.num_layers
    if reuses_probabilities and mode == "qk":
        attention_matmuls -= n_shared
    return {
        "qkv": 2 * h * ((q_rows + 2 * kv_rows) * n_compute + local_rows * n_shared),
        "attention": attention_per_matmul * attention_matmuls,
        "output_proj": 2 * q_rows * h * model.num_layers,
        "mlp": (2 * h * 2 * model.ffn_hidden_size + 2 * model.ffn_hidden_size * h)
        * model.num_layers,
        "output_layer": 2 * h * model.padded_vocab_size(),  # the padded rows are computed too
    }


def forward_flops_per_token(
    model: ModelConfig,
    sharing_layers=(),
    mode: str = "qk",
    seq_length: int | None = None,
    causal: bool = False,
    reuses_probabilities: bool = False,
) -> int:
    """Matmul FLOPs of one forward pass, per token."""
    return sum(flops_breakdown(model, sharing_layers, mode, seq_length, causal, reuses_probabilities).values())


def training_flops_per_token(
    model: ModelConfig,
    sharing_layers=(),
    mode: str = "qk",
    seq_length: int | None = None,
    causal: bool = False,
    reuses_probabilities: bool = False,
) -> int:
    """Matmul FLOPs of one training step, per token: forward plus a backward of twice its cost."""
    return 3 * forward_flops_per_token(model, sharing_layers, mode, seq_length, causal, reuses_probabilities)


def sharing_saving(
    model: ModelConfig,
    sharing_layers,
    mode: str = "qk",
    seq_length: int | None = None,
    causal: bool = False,
    reuses_probabilities: bool = False,
) -> float:
    """Fraction of training FLOPs that sharing ``sharing_layers`` saves against no sharing."""
    flops = functools.partial(
        training_flops_per_token, model, mode=mode, seq_length=seq_length, causal=causal,
        reuses_probabilities=reuses_probabilities,
    )
    return 1.0 - flops(sharing_layers) / flops(())


def attention_counting(spec: str) -> dict[str, bool]:
    """How a layer spec's attention is counted: Transformer Engine's flash attention skips the masked
    half and recomputes probabilities in every layer; the local spec's unfused attention computes the
    full score matrix and lets QK-sharing layers reuse their source's probabilities."""
    flash = spec == "te"
    return {"causal": flash, "reuses_probabilities": not flash}


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the device's peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_second * flops_per_token / peak_flops
