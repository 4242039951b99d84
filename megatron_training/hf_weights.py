"""Weights between Hugging Face's LLaMA layout and this recipe's megatron-core model.

Pure functions on state dicts (no process groups), used by :mod:`megatron_training.convert`; the
matching configs are in :mod:`epas.hf_config`.
Megatron-core fuses Q, K and V into one ``linear_qkv`` weight ordered by query group
([q heads of group 0, k0, v0, q heads of group 1, ...]) and gate/up into ``linear_fc1``; both
use the rotate-half RoPE of Hugging Face's LLaMA, so no permutation of heads is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from epas.config import ModelConfig
from epas.errors import ConfigError

def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face folder: safetensors or PyTorch ``.bin``, single or sharded."""
    from safetensors.torch import load_file

    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single_name]
        paths = [folder / name for name in files]
        if all(path.is_file() for path in paths):
            state = {}
            for path in paths:
                if path.suffix == ".safetensors":
                    state.update(load_file(str(path)))
                else:
                    state.update(torch.load(path, map_location="cpu", weights_only=True))
            return state
    raise ConfigError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or their sharded "
        "index (.index.json)"
    )


def _qkv_split(model: ModelConfig) -> list[int]:
    per_group = model.num_attention_heads // model.query_groups
    return [per_group * model.head_dim, model.head_dim, model.head_dim]


def hf_to_megatron(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron-core (local spec, TP=1) weights from Hugging Face ones; vocab rows zero-padded."""
    hf = dict(hf)
    padded = model.padded_vocab_size()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"the Hugging Face weights lack {name}")
        return hf.pop(name)

    def pad_vocab(weight: torch.Tensor, name: str) -> torch.Tensor:
        if weight.shape[0] != model.vocab_size:
            raise ConfigError(
                f"{name} has {weight.shape[0]} rows but config.json's vocab_size is {model.vocab_size}"
            )
        return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])])

    groups = model.query_groups
    out = {
        "embedding.word_embeddings.weight": pad_vocab(take("model.embed_tokens.weight"), "model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": take("model.norm.weight"),
    }
    if model.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["output_layer.weight"] = pad_vocab(take("lm_head.weight"), "lm_head.weight")
    for i in range(model.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (take(src + f"self_attn.{p}_proj.weight") for p in "qkv")
        hidden = q.shape[-1]
        qkv = torch.cat([q.view(groups, -1, hidden), k.view(groups, -1, hidden), v.view(groups, -1, hidden)], 1)
        out[dst + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, hidden)
        out[dst + "self_attention.linear_proj.weight"] = take(src + "self_attn.o_proj.weight")
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")])
        out[dst + "mlp.linear_fc2.weight"] = take(src + "mlp.down_proj.weight")
    leftover = [name for name in hf if not name.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ConfigError(f"the Hugging Face weights hold tensors the LLaMA layout does not know: {leftover[:5]}")
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face ``LlamaForCausalLM`` weights from megatron-core (local spec, TP=1) ones."""
    vocab = model.vocab_size
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"]
        hidden = qkv.shape[-1]
        q, k, v = qkv.view(model.query_groups, -1, hidden).split(_qkv_split(model), dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(-1, hidden)
        out[dst + "self_attn.k_proj.weight"] = k.reshape(-1, hidden)
        out[dst + "self_attn.v_proj.weight"] = v.reshape(-1, hidden)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}
