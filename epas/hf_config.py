"""Hugging Face ``config.json`` and the recipe's model section, both ways (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

from epas.config import ModelConfig
from epas.errors import ConfigError, InputError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "EpasLlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "epas_llama")
# megatron-core's GPTModel takes only the llama3 scaling factor: RotaryEmbedding._apply_scaling keeps these at its
# defaults, which are Llama 3.1's and 3.2's (a test checks they still are megatron-core's)
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The recipe's model section for a Hugging Face LLaMA ``config.json``; refuses what differs."""
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES and not (
        architecture is None and hf.get("model_type") in SUPPORTED_MODEL_TYPES
    ):
        raise ConfigError(
            f"unsupported architecture {architecture or hf.get('model_type')}: the converter handles "
            f"the LLaMA family ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json has hidden_act={hf['hidden_act']!r}; the megatron-core model's MLP is "
                          "SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ConfigError(
                f"config.json has {flag}=true; the megatron-core model here has no bias terms (as LLaMA, Llama 3.x, "
                "TinyLlama and SmolLM), so these biases would be lost"
            )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConfigError(f"config.json has head_dim={head_dim} ≠ hidden_size / num_attention_heads")
    groups = hf.get("num_key_value_heads") or heads
    rope = _rope_parameters(hf)
    scaling = _llama3_factor(rope)
    context = hf.get("max_position_embeddings", 2048)
    # a long-context model trains at the context it had before RoPE scaling extended it
    seq_length = min(context, MEGATRON_LLAMA3_ROPE["original_max_position_embeddings"]) if scaling else context
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        seq_length=seq_length,
        max_position_embeddings=None if context == seq_length else context,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        rope_scaling_factor=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def _rope_parameters(hf: dict) -> dict:
    """RoPE settings as one dict: transformers 5 writes ``rope_parameters``, 4.x (and the Hub's Llama 3 folders)
    ``rope_theta`` and ``rope_scaling``."""
    parameters = {"rope_theta": hf.get("rope_theta", 10000.0),
                  "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0),
                  **(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    parameters["rope_type"] = parameters.get("rope_type", parameters.get("type", "default"))
    return parameters


def _llama3_factor(rope: dict) -> float | None:
    """The llama3 scaling factor of ``rope`` (None for plain RoPE); refuses what megatron-core cannot build."""
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json has partial_rotary_factor={rope['partial_rotary_factor']}; the megatron-core "
                          "model rotates whole heads")
    if rope["rope_type"] == "default":
        return None
    if rope["rope_type"] != "llama3":
        raise ConfigError(f"config.json has RoPE scaling of type {rope['rope_type']!r}; the converter supports plain "
                          "RoPE and llama3 scaling (Llama 3.1 and 3.2)")
    fixed = ", ".join(f"{key}={value}" for key, value in MEGATRON_LLAMA3_ROPE.items())
    for key, value in MEGATRON_LLAMA3_ROPE.items():
        if rope.get(key) != value:
            raise ConfigError(f"config.json's llama3 RoPE scaling has {key}={rope.get(key)!r}; megatron-core's "
                              f"GPTModel applies llama3 scaling only with {fixed} (Llama 3.1's and 3.2's)")
    return float(rope["factor"])


def hf_config_from_model(model: ModelConfig, sharing_layers, sharing_mode: str, trained_sharing_layers) -> dict:
    """``EpasLlamaConfig`` keyword arguments for a recipe model (the standard LLaMA fields + EPAS)."""
    return dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.head_dim,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rotary_base,
        rope_scaling=None if model.rope_scaling_factor is None else {
            "rope_type": "llama3", "factor": model.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE},
        tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_method_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        sharing_layers=list(sharing_layers),
        sharing_mode=sharing_mode,
        trained_sharing_layers=list(trained_sharing_layers),
    )


def read_model_config(folder: str | Path) -> dict:
    """``config.json`` of a folder that holds a plain LLaMA or an EPAS export; refuses anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist; pass a Hugging Face LLaMA folder or an EPAS "
                         "export (tools/convert_checkpoint.py megatron-to-hf)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder} has no config.json: it is not a Hugging Face model folder; pass a Hugging "
                         "Face LLaMA folder or an EPAS export (tools/convert_checkpoint.py megatron-to-hf)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{folder} holds a {config.get('model_type')!r} model; EPAS works with "
                         f"{' or '.join(SUPPORTED_MODEL_TYPES)} models (a plain LLaMA or an EPAS export)")
    return config
