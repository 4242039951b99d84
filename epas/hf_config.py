"""Hugging Face ``config.json`` and the recipe's model section, both ways (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

from epas.config import ModelConfig
from epas.errors import ConfigError, InputError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "EpasLlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "epas_llama")
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
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "rope_scaling": (hf.get("rope_scaling"), None),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted and not (key == "rope_scaling" and _is_default_rope(value)):
            raise ConfigError(f"config.json has {key}={value!r}; the megatron-core model supports only {wanted!r}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConfigError(f"config.json has head_dim={head_dim} ≠ hidden_size / num_attention_heads")
    groups = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        seq_length=hf.get("max_position_embeddings", 2048),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rotary_base=float(_rope_theta(hf)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def _is_default_rope(rope_scaling) -> bool:
    """transformers 5 writes ``rope_parameters``/``rope_scaling`` with type "default" for plain RoPE."""
    return isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default"


def _rope_theta(hf: dict) -> float:
    parameters = hf.get("rope_parameters") or {}
    if parameters.get("rope_type", "default") != "default":
        raise ConfigError(f"config.json has rope_parameters={parameters}; only plain RoPE is supported")
    return parameters.get("rope_theta", hf.get("rope_theta", 10000.0))


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
        max_position_embeddings=model.seq_length,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rotary_base,
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
