"""RMSNorm for megatron-core's local spec that also works under sequence parallelism.

The local spec builds its norms with ``WrappedTorchNorm``, which refuses sequence parallelism.
Under sequence parallelism each tensor-parallel rank normalises its own slice of the sequence,
so the forward pass is unchanged and each rank's weight gradient covers only its slice; the
weight carries ``sequence_parallel`` so that megatron-core's ``finalize_model_grads`` sums it
over the tensor-parallel group, as Transformer Engine's norms do. Without sequence parallelism
this is exactly the ``torch.nn.RMSNorm`` that ``WrappedTorchNorm`` builds.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

# TransformerConfig flags that only apex's or Transformer Engine's norms implement
_FUSED_NORM_FLAGS = ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm")


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from megatron-core's norm arguments, with a sequence-parallel weight."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if config.normalization != "RMSNorm":
            raise ValueError(f"the local spec's norm is RMSNorm, got normalization={config.normalization!r}")
        flags = [flag for flag in _FUSED_NORM_FLAGS if getattr(config, flag)]
        if flags:
            raise ValueError(
                f"{', '.join(flags)}: only apex's or Transformer Engine's norms implement this; set it "
                "to False or use the Transformer Engine spec"
            )
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
