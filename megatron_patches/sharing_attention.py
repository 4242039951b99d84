"""EPAS self-attention: a megatron-core ``SelfAttention`` that can run in sharing mode.

In compute mode the layer is stock ``SelfAttention``; when the next layer shares, the post-RoPE
tensors that reach core attention are published to the model's :class:`ActivationCache`.
In sharing mode the layer takes the source's Q and K (``qk``) or K and V (``kv``) from the
cache and multiplies only the V (or Q) rows of its fused ``linear_qkv`` weight, so the
skipped projections cost nothing and shared tensors are not rotated again. The weights are
kept whole, so a layer can switch modes between steps without touching the optimizer.

With megatron-core's unfused attention (the local spec) in ``qk`` mode, a sharing layer also
reuses the source's attention probabilities: the same Q and K give the same softmax(QK^T), so
only probabilities @ V is left to compute (and to keep for the backward). Flash attention
(Transformer Engine) never materialises the probabilities, so there every layer recomputes them.

The EPAS work is named in profiler traces: ``epas/publish_shared`` and ``epas/take_shared`` (the
hand-off), ``epas/project_v_only`` / ``epas/project_q_only`` and ``epas/context_from_shared_probabilities``
(:mod:`megatron_patches.ranges`).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from epas.sharing import check_mode
from megatron_patches.activation_cache import ActivationCache
from megatron_patches.ranges import epas_range


class EPASDotProductAttention(DotProductAttention):
    """megatron-core's unfused attention that can also start from given attention probabilities."""

    def context_from_probabilities(self, probabilities: Tensor, value: Tensor) -> Tensor:
        """The second half of ``DotProductAttention.forward``: dropout, probabilities @ V, [sq, b, hp]."""
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probabilities = self.attention_dropout(probabilities)
        else:
            probabilities = self.attention_dropout(probabilities)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            value = value.repeat_interleave(groups, dim=2)
        batch, heads, q_len, k_len = probabilities.shape
        context = torch.bmm(
            probabilities.reshape(batch * heads, q_len, k_len),
            value.reshape(k_len, batch * heads, -1).transpose(0, 1),
        )
        context = context.view(batch, heads, q_len, -1).permute(2, 0, 1, 3).contiguous()
        return context.view(q_len, batch, self.hidden_size_per_partition)


class EPASSelfAttention(SelfAttention):
    """Self-attention whose layer can reuse the nearest preceding compute layer's activations."""

    def __init__(
        self,
        config,
        submodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: str | None = None,
        pg_collection=None,
        sharing_mode: str = "qk",
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        check_mode(sharing_mode)
        if config.num_query_groups % self.world_size:
            raise ValueError(
                f"EPAS needs num_query_groups ({config.num_query_groups}) divisible by the "
                f"tensor-parallel size ({self.world_size}) so each rank owns whole Q/K/V groups; "
                "lower tensor parallelism"
            )
        if config.attention_output_gate:
            raise ValueError("EPAS sharing layers do not support attention_output_gate")
        self.sharing_mode = sharing_mode
        self.shares = False  # this layer reuses its source's activations
        self.publishes = False  # the next layer shares, so this one hands its activations over
        self.activation_cache: ActivationCache | None = None
        self.core_attention.register_forward_pre_hook(self._publish, with_kwargs=True)
        # same Q and K give the same probabilities, unless a per-layer softmax offset changes them
        self.shares_probabilities = (
            sharing_mode == "qk"
            and isinstance(self.core_attention, EPASDotProductAttention)
            and config.softmax_type == "vanilla"
        )
        if self.shares_probabilities:
            self.core_attention.scale_mask_softmax.register_forward_hook(self._keep_probabilities)

    def _publish(self, module, args, kwargs):
        """Hand the post-RoPE tensors that reach core attention to the following sharing layers."""
        if self.publishes:
            query, key, value = args[:3]
            shared = (query, key) if self.sharing_mode == "qk" else (key, value)
            with epas_range("epas/publish_shared"):
                self.activation_cache.put(shared)

    def _keep_probabilities(self, module, args, probabilities):
        """Hand this block's attention probabilities (before dropout) to its sharing layers."""
        if self.publishes or self.shares:
            self.activation_cache.put_probabilities(probabilities)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, **kwargs):
        if not self.shares:
            return super().forward(hidden_states, attention_mask, **kwargs)
        return self._sharing_forward(hidden_states, attention_mask, **kwargs)

    def _sharing_forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor,
        inference_context=None,
        rotary_pos_emb=None,
        attention_bias=None,
        packed_seq_params=None,
        inference_params=None,
        **unused,
    ):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "megatron-core inference contexts are not supported in sharing mode; export the "
                "model with tools/convert_checkpoint.py and generate with Hugging Face"
            )
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported in sharing mode")

        with epas_range("epas/take_shared"):
            shared = self.activation_cache.get(self.layer_number)
        if self.sharing_mode == "qk":
            query, key = shared
            value = self._project_rows(hidden_states, "v")
        else:
            key, value = shared
            query = self._project_rows(hidden_states, "q")
            if self.q_layernorm is not None:
                query = self.q_layernorm(query)
            if rotary_pos_emb is not None:
                q_pos_emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
                query = apply_rotary_pos_emb(
                    query,
                    q_pos_emb,
                    config=self.config,
                    mscale=_yarn_get_concentration_factor_from_config(self.config),
                    cp_group=self.pg_collection.cp,
                )

        probabilities = self.activation_cache.probabilities if self.shares_probabilities else None
        checkpointed = self.checkpoint_core_attention and self.training
        if probabilities is not None and not checkpointed:
            with epas_range("epas/context_from_shared_probabilities"):
                core_attn_out = self.core_attention.context_from_probabilities(probabilities, value)
        elif checkpointed:
            core_attn_out = self._checkpointed_attention_forward(
                query, key, value, attention_mask, attention_bias=attention_bias
            )
        else:
            core_attn_out = self.core_attention(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=self.attn_mask_type,
                attention_bias=attention_bias,
            )
        return self.linear_proj(core_attn_out)

    def _project_rows(self, hidden_states: Tensor, part: str) -> Tensor:
        """Multiply only the V (``part="v"``) or Q (``part="q"``) rows of the fused QKV weight.

        The local weight is laid out per query group as ``[q_1..q_p, k, v]`` (``hn`` rows
        each); the selected rows go through the same tensor-parallel linear function as
        ``ColumnParallelLinear`` so communication and gradients match the fused layer.
        """
        linear = self.linear_qkv
        _run_forward_pre_hooks(linear, hidden_states)  # its weights are read without calling it
        groups = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups
        head_dim = self.hidden_size_per_attention_head
        rows = slice(per_group + 1, per_group + 2) if part == "v" else slice(0, per_group)
        weight = linear.weight.view(groups, per_group + 2, head_dim, -1)[:, rows]
        weight = weight.reshape(-1, weight.size(-1))
        bias = getattr(linear, "bias", None)
        if bias is not None and bias.numel():
            bias = bias.view(groups, per_group + 2, head_dim)[:, rows].reshape(-1)
        else:
            bias = None

        sequence_parallel = self.config.sequence_parallel
        with epas_range(f"epas/project_{part}_only"):
            output = tensor_parallel.linear_with_grad_accumulation_and_async_allreduce(
                input=_fused_input_norm(linear, hidden_states),
                weight=weight,
                bias=bias,
                gradient_accumulation_fusion=False,  # a slice of the weight has no main_grad
                allreduce_dgrad=self.world_size > 1 and not sequence_parallel,
                sequence_parallel=sequence_parallel,
                tp_group=self.pg_collection.tp,
            )
        return output.view(*output.shape[:2], -1, head_dim)


def _run_forward_pre_hooks(module: torch.nn.Module, *args) -> None:
    """Run ``module``'s forward pre-hooks as calling it would. With ``parallel.overlap_param_gather``
    megatron-core's DDP waits there for the all-gather of the module's updated weights; reading them
    without it would use a half-updated weight (or, on a GPU, one still being written)."""
    for hook in module._forward_pre_hooks.values():
        hook(module, args)


def _fused_input_norm(linear, hidden_states: Tensor) -> Tensor:
    """Apply the input norm that Transformer Engine fuses into ``linear_qkv``, if it does (in fp32, as TE)."""
    norm_weight = getattr(linear, "layer_norm_weight", None)
    if norm_weight is None:
        return hidden_states  # local spec: the layer's input_layernorm already ran
    if getattr(linear, "zero_centered_gamma", False):
        norm_weight = norm_weight + 1
    x, shape = hidden_states.float(), hidden_states.shape[-1:]
    if linear.normalization == "RMSNorm":
        x = torch.nn.functional.rms_norm(x, shape, norm_weight.float(), linear.eps)
    else:
        x = torch.nn.functional.layer_norm(x, shape, norm_weight.float(), linear.layer_norm_bias.float(), linear.eps)
    return x.to(hidden_states.dtype)
