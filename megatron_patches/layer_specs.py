"""Layer specs: megatron-core's GPT layer specs with EPASSelfAttention injected."""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer import transformer_block
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patches.norms import SequenceParallelRMSNorm
from megatron_patches.sharing_attention import EPASDotProductAttention, EPASSelfAttention

BACKENDS = ("local", "te")


def epas_layer_spec(sharing_mode: str = "qk", backend: str = "local") -> ModuleSpec:
    """A LLaMA decoder-layer spec whose self-attention can run in EPAS sharing mode.

    ``local`` uses megatron-core's own modules (CPU and GPU), with unfused attention whose
    probabilities qk-mode sharing layers reuse, and norms that also work under sequence
    parallelism; ``te`` uses Transformer Engine (GPU: input norm fused into ``linear_qkv``,
    flash attention).
    """
    core_attention = None
    if backend == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        core_attention = EPASDotProductAttention
        spec = dataclasses.replace(
            spec,
            submodules=dataclasses.replace(
                spec.submodules,
                input_layernorm=SequenceParallelRMSNorm,
                pre_mlp_layernorm=SequenceParallelRMSNorm,
            ),
        )
    elif backend == "te":
        if not gpt_layer_specs.HAVE_TE:
            raise ImportError(
                "spec 'te' needs Transformer Engine, which is not installed; use the GPU image "
                "(see Dockerfile) or set `spec: local`"
            )
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        raise ValueError(f"spec must be one of {BACKENDS}, got {backend!r}")
    attention = spec.submodules.self_attention
    submodules = attention.submodules
    if core_attention is not None:
        submodules = dataclasses.replace(submodules, core_attention=core_attention)
    attention = dataclasses.replace(
        attention,
        module=EPASSelfAttention,
        params={**attention.params, "sharing_mode": sharing_mode},
        submodules=submodules,
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention)
    )


def epas_block_spec(
    config: TransformerConfig, sharing_mode: str = "qk", backend: str = "local", vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's (or virtual chunk's) layers from :func:`epas_layer_spec` and the final norm.

    Where Transformer Engine is installed, megatron-core's block takes TE's norm as the final one
    even for the local spec; so does this spec, which keeps EPAS at 0% identical to stock there.
    Elsewhere megatron-core would take torch's ``WrappedTorchNorm`` (which refuses sequence
    parallelism) or apex's (which refuses RMSNorm), and this spec takes :class:`SequenceParallelRMSNorm`.
    """
    final_norm = transformer_block.LayerNormImpl if transformer_block.HAVE_TE else SequenceParallelRMSNorm
    layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[epas_layer_spec(sharing_mode, backend)] * layers, layer_norm=final_norm
    )
