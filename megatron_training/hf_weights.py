"""Weights between Hugging Face's LLaMA layout and this recipe's megatron-core model.

Pure functions on state dicts (no process groups), used by :mod:`megatron_training.convert`; the
matching configs are in :mod:`epas.hf_config`.
Megatron-core fuses Q, K and V into one ``linear_qkv`` weight ordered by query group
([q heads of group 0, k0, v0, q heads of group 1, ...]) and gate/up into ``linear_fc1``; both
use the rotate-half RoPE of Hugging Face's LLaMA, so no permutation of heads is needed.

Both directions yield one Megatron tensor's worth at a time and read their input only when they
need it, so a conversion streams: the input may be a lazy mapping (:class:`~megatron_training.hf_files.HfWeights`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from epas.config import ModelConfig
from epas.errors import ConfigError

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class WeightPair:
    """One Megatron tensor and the Hugging Face tensors it is made of, with the maps both ways."""

    megatron: str
    hf: tuple[str, ...]
    fuse: Callable[[Tensors], torch.Tensor]  # Hugging Face tensors -> the Megatron tensor
    split: Callable[[torch.Tensor], Tensors]  # and back


def weight_pairs(model: ModelConfig) -> list[WeightPair]:
    """Every weight of the model (local spec, TP=1), in Hugging Face's order: embedding, layers, norm, head."""
    groups, vocab, padded = model.query_groups, model.vocab_size, model.padded_vocab_size()
    qkv_rows = [model.num_attention_heads // groups * model.head_dim, model.head_dim, model.head_dim]

    def same(name: str, megatron: str) -> WeightPair:
        return WeightPair(megatron, (name,), lambda t: t[0], lambda t: [t])

    def vocab_rows(name: str, megatron: str) -> WeightPair:
        def pad(tensors: Tensors) -> torch.Tensor:
            (weight,) = tensors
            if weight.shape[0] != vocab:
                raise ConfigError(f"{name} has {weight.shape[0]} rows but config.json's vocab_size is {vocab}")
            return torch.cat([weight, weight.new_zeros(padded - vocab, weight.shape[1])])

        return WeightPair(megatron, (name,), pad, lambda t: [t[:vocab]])

    def fuse_qkv(tensors: Tensors) -> torch.Tensor:
        hidden = tensors[0].shape[-1]
        return torch.cat([t.view(groups, -1, hidden) for t in tensors], 1).reshape(-1, hidden)

    def split_qkv(qkv: torch.Tensor) -> Tensors:
        hidden = qkv.shape[-1]
        return [t.reshape(-1, hidden) for t in qkv.view(groups, -1, hidden).split(qkv_rows, dim=1)]

    pairs = [vocab_rows("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for i in range(model.num_layers):
        hf, megatron = f"model.layers.{i}.", f"decoder.layers.{i}."
        pairs += [
            WeightPair(megatron + "self_attention.linear_qkv.weight",
                       tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), fuse_qkv, split_qkv),
            same(hf + "self_attn.o_proj.weight", megatron + "self_attention.linear_proj.weight"),
            same(hf + "input_layernorm.weight", megatron + "input_layernorm.weight"),
            same(hf + "post_attention_layernorm.weight", megatron + "pre_mlp_layernorm.weight"),
            WeightPair(megatron + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                       torch.cat, lambda t: list(t.chunk(2))),
            same(hf + "mlp.down_proj.weight", megatron + "mlp.linear_fc2.weight"),
        ]
    pairs.append(same("model.norm.weight", "decoder.final_layernorm.weight"))
    if not model.tie_embeddings:
        pairs.append(vocab_rows("lm_head.weight", "output_layer.weight"))
    return pairs


def hf_to_megatron(hf: Mapping[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron-core (local spec, TP=1) weights from Hugging Face ones, one at a time; vocab rows zero-padded.

    The names are checked by this call, so a missing or unknown tensor is named before anything is read.
    """
    pairs = weight_pairs(model)
    wanted = [name for pair in pairs for name in pair.hf]
    missing = [name for name in wanted if name not in hf]
    if missing:
        raise ConfigError(f"the Hugging Face weights lack {', '.join(missing[:5])}")
    known = {*wanted, *(["lm_head.weight"] if model.tie_embeddings else [])}  # a tied head some exports keep
    unknown = [name for name in hf if name not in known and not name.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise ConfigError(f"the Hugging Face weights hold tensors the LLaMA layout does not know: {unknown[:5]}")
    return ((pair.megatron, pair.fuse([hf[name] for name in pair.hf])) for pair in pairs)


def megatron_to_hf(state: Mapping[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face ``LlamaForCausalLM`` weights from megatron-core (local spec, TP=1) ones, one at a time and
    contiguous (views of ``state`` where no copy is needed)."""
    for pair in weight_pairs(model):
        for name, tensor in zip(pair.hf, pair.split(state[pair.megatron]), strict=True):
            yield name, tensor.contiguous()
