"""Helpers the model tests share: small configs, weight perturbation, TP sharding, comparisons."""

from __future__ import annotations

import pytest
import torch

from epas.config import EPASConfig, ModelConfig, ParallelConfig, RunConfig
from tests.epas_reference import ReferenceLlama


def tiny_run(mode: str = "qk", num_layers: int = 6, heads: int = 4, groups: int = 2, tp: int = 1) -> RunConfig:
    """A small LLaMA (GQA by default) that runs in well under a second on CPU."""
    return RunConfig(
        model=ModelConfig(
            num_layers=num_layers,
            hidden_size=64,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=96,
            vocab_size=256,
            make_vocab_size_divisible_by=64,
            seq_length=16,
        ),
        parallel=ParallelConfig(tensor_parallel=tp),
        epas=EPASConfig(mode=mode),
        device="cpu",
        seed=7,
    )


def random_weights(model: torch.nn.Module, seed: int = 0) -> dict:
    """Give every parameter O(1)-scale random values so attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.named_parameters():
        noise = torch.randn(tensor.shape, generator=generator)
        state[name] = 1 + 0.1 * noise if "layernorm" in name else 0.15 * noise
    return state


def load_weights(model: torch.nn.Module, state: dict) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The slice of a TP=1 tensor (weight or gradient) that tensor-parallel rank ``rank`` holds."""
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds [gate_r; up_r]
        return torch.cat([half.chunk(size)[rank] for half in full.chunk(2)])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):  # row-parallel: input columns
        return full.chunk(size, dim=1)[rank]
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return full.chunk(size)[rank]
    return full  # norms are replicated


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation over the largest value: one wrong entry shows."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def frobenius_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the Frobenius norm: rounding (bf16) averages out, a wrong tensor does not."""
    return ((actual - expected).norm() / expected.norm()).item()


def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss through megatron-core's (vocab-parallel) cross entropy."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).mean()


def reference_llama(run: RunConfig, state: dict) -> ReferenceLlama:
    """The plain-PyTorch fp32 reference with the weights of megatron-core state ``state`` (TP=1)."""
    m = run.model
    reference = ReferenceLlama(
        m.num_layers,
        m.hidden_size,
        m.num_attention_heads,
        m.query_groups,
        m.ffn_hidden_size,
        m.padded_vocab_size(),
        eps=m.norm_epsilon,
        rope_base=m.rotary_base,
    )
    reference.load_megatron(state)
    return reference


def check_rank_results(results_by_rank, expected_losses: dict, label) -> None:
    """Every rank's (mode, sharing, loss, worst, error) rows: each gradient error below 1e-5, and the
    losses (reported by the last stage only) equal to ``expected_losses`` for every (mode, sharing)."""
    checked = set()
    for rank_results in results_by_rank:
        for mode, sharing, loss, worst, error in rank_results:
            assert error < 1e-5, (label, mode, sharing, worst, error)
            if loss is not None:
                assert loss == pytest.approx(expected_losses[(mode, sharing)], rel=1e-6)
                checked.add((mode, sharing))
    assert checked == set(expected_losses)  # the last stage reported every loss
