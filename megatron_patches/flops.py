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
import math

from megatron_patches.config import ModelConfig

MODES = ("qk", "kv")


def flops_breakdown(
    model: ModelConfig,
    sharing_layers=(),
    mode: str = "qk",
    seq_length: int | None = None,
    causal: bool = False,
    reuses_probabilities: bool = False,
) -> dict[str, int]:
    """Forward matmul FLOPs per token, by component (summed over layers)."""
    if mode not in MODES:
        raise ValueError(f"sharing mode must be one of {MODES}, got {mode!r}")
    shared = set(sharing_layers)
    bad = sorted(i for i in shared if not 0 < i < model.num_layers)
    if bad:
        raise ValueError(
            f"sharing layers {bad} out of range: valid are 1..{model.num_layers - 1} "
            "(layer 0 has no preceding layer to share from)"
        )
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


def deepest_layers(num_layers: int, fraction: float) -> tuple[int, ...]:
    """The deepest ``round(fraction * num_layers)`` layers (halves round up), never layer 0."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sharing fraction must be in [0, 1], got {fraction}")
    count = min(math.floor(fraction * num_layers + 0.5), num_layers - 1)
    return tuple(range(num_layers - count, num_layers))


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
