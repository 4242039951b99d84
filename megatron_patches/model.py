"""The EPAS GPT model: megatron-core's GPTModel whose layers switch between compute and sharing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from epas.config import RunConfig
from epas.sharing import check_sharing_layers
from megatron_patches import pipeline
from megatron_patches.activation_cache import ActivationCache
from megatron_patches.fusions import choose_fusions
from megatron_patches.layer_specs import epas_block_spec
from megatron_patches.sharing_attention import EPASSelfAttention


class EPASGPTModel(GPTModel):
    """GPTModel with a runtime set of sharing layers (0-based, global across pipeline stages).

    The set is changed with :meth:`set_sharing_layers` between steps; parameters never change,
    so optimizers, DDP buffers and checkpoints are unaffected. Under pipeline parallelism a
    sharing block may span stages: see :mod:`megatron_patches.pipeline`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_cache = ActivationCache()
        self.sharing_layers: tuple[int, ...] = ()
        self.sharing_mode = self._attentions()[0].sharing_mode
        self._chunk_starts = pipeline.chunk_start_layers(self.config)
        self._p2p_carries_shared = False  # some sharing block crosses a stage/chunk boundary
        self._receives_shared = False  # this chunk's first layer shares a source upstream
        self._sends_shared = False  # the next chunk's first layer shares
        self._received_shared = None
        for attention in self._attentions():
            attention.activation_cache = self.activation_cache

    def _attentions(self) -> list[EPASSelfAttention]:
        attentions = [layer.self_attention for layer in self.decoder.layers]
        if not all(isinstance(a, EPASSelfAttention) for a in attentions):
            raise TypeError("EPASGPTModel needs a layer spec from megatron_patches.layer_specs")
        return attentions

    def set_sharing_layers(self, layers: Iterable[int]) -> None:
        layers = check_sharing_layers(layers, self.config.num_layers)
        if layers and self.config.recompute_granularity == "full":
            raise ValueError(
                "full activation recompute re-runs layers under no_grad and would drop the "
                "gradients of activations shared across layers; use "
                "recompute_granularity='selective' (recompute_modules=['core_attn']) with EPAS"
            )
        attentions = self._attentions()
        for attention in attentions:
            index = attention.layer_number - 1
            attention.shares = index in layers
            attention.publishes = index not in layers and index + 1 in layers
        self._p2p_carries_shared = bool(self._chunk_starts & set(layers))
        self._receives_shared = attentions[0].layer_number - 1 in layers
        self._sends_shared = attentions[-1].layer_number in layers
        self.sharing_layers = layers

    def p2p_seq_length(self, seq_length: int) -> int:
        """The ``seq_length`` to give megatron-core's pipeline schedule for this sharing set."""
        if not self._p2p_carries_shared:
            return seq_length
        return pipeline.p2p_seq_length(self.config, self.sharing_mode, seq_length)

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is not None and self._p2p_carries_shared:
            tensor, shared_rows, seq_length = pipeline.split(self.config, self.sharing_mode, tensor)
            if self._receives_shared:
                self._received_shared = pipeline.unpack(
                    self.config, self.sharing_mode, shared_rows, seq_length
                )
        super().set_input_tensor(tensor)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        with self.activation_cache.forward_scope():
            if self._received_shared is not None:
                self.activation_cache.put(self._received_shared)
                self._received_shared = None
            output = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            if self.post_process or not self._p2p_carries_shared:
                return output
            seq_length = output.size(0) * (
                self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
            )
            shared = None
            if self._sends_shared:
                shared = self.activation_cache.get(self._attentions()[-1].layer_number + 1)
            rows = pipeline.extra_rows(self.config, self.sharing_mode, seq_length)
            return pipeline.pack(output, shared, rows)


def transformer_config(run: RunConfig) -> TransformerConfig:
    """The megatron-core TransformerConfig of a LLaMA-style model for this run."""
    model, parallel = run.model, run.parallel
    on_cpu = run.device == "cpu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        sequence_parallel=parallel.sequence_parallel,
        bf16=not on_cpu,
        params_dtype=torch.float32 if on_cpu else torch.bfloat16,
        pipeline_dtype=torch.float32 if on_cpu else torch.bfloat16,
        batch_p2p_comm=not on_cpu,  # batched p2p mixes up messages on gloo
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        **choose_fusions(run.device),  # each only where its kernel is importable
    )


def build_model(
    run: RunConfig,
    config: TransformerConfig | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> EPASGPTModel:
    """Build this rank's EPAS model chunk (call after :func:`megatron_training.distributed.initialize`)."""
    config = config or transformer_config(run)
    scaling = run.model.rope_scaling_factor  # megatron-core's llama3 RoPE scaling (Llama 3.1/3.2)
    return EPASGPTModel(
        config=config,
        transformer_layer_spec=epas_block_spec(config, run.epas.mode, run.spec, vp_stage),
        vocab_size=run.model.padded_vocab_size(),
        max_sequence_length=run.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=run.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=run.model.rotary_base,
        rope_scaling=scaling is not None,
        **({"rope_scaling_factor": scaling} if scaling is not None else {}),
        vp_stage=vp_stage,
    )


def in_training_precision(model: torch.nn.Module, config: TransformerConfig) -> torch.nn.Module:
    """``model`` as megatron-core trains it in bf16/fp16: inside ``Float16Module``.

    The wrapper casts every parameter, including the norms the local spec builds in fp32, so the
    mixed-precision optimizer holds them all as half-precision parameters with fp32 main copies
    (and a checkpoint maps each of them), and returns the loss in fp32. fp32 models are unchanged.
    """
    return Float16Module(config, model) if config.bf16 or config.fp16 else model
