"""Configuration of an EPAS LLaMA: a LLaMA whose deep layers may reuse attention activations of an earlier layer.

This file is copied verbatim into exported checkpoints (``trust_remote_code``), so it imports only transformers.
"""

from __future__ import annotations

import warnings

from transformers import LlamaConfig

SHARING_MODES = ("qk", "kv")


class EpasLlamaConfig(LlamaConfig):
    """LLaMA configuration plus the EPAS sharing set.

    Args:
        sharing_layers: 0-based indices of the layers in sharing mode. Each one reuses tensors of the nearest
            preceding compute-mode layer, so layer 0 can never share.
        sharing_mode: ``"qk"`` (reuse post-RoPE Q and K, compute only V; what the paper trains) or ``"kv"``
            (reuse post-RoPE K and V, compute only Q; saves the layer's whole KV cache).
        trained_sharing_layers: the sharing region the checkpoint was trained with, if known. Choosing layers
            outside it still works (every layer keeps its Q/K/V weights) but is the paper's weaker
            inference-time-sharing baseline, so it warns.
    """

    model_type = "epas_llama"

    def __init__(self, sharing_layers=(), sharing_mode="qk", trained_sharing_layers=None, **kwargs):
        super().__init__(**kwargs)
        self.sharing_mode = sharing_mode
        self.trained_sharing_layers = (
            None if trained_sharing_layers is None else sorted({int(i) for i in trained_sharing_layers})
        )
        self.sharing_layers = self.checked_sharing_layers(sharing_layers)

    def checked_sharing_layers(self, layers) -> list[int]:
        """Return `layers` sorted and de-duplicated after checking them (and the mode) against this config.

        Raises ValueError for a bad mode, layer 0 or an index out of range; warns when the set leaves
        `trained_sharing_layers`.
        """
        if self.sharing_mode not in SHARING_MODES:
            raise ValueError(f"sharing_mode must be one of {SHARING_MODES}, got {self.sharing_mode!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"sharing_layers must be integer layer indices, got {list(layers)!r}")
        chosen = sorted(set(layers))
        out_of_range = [i for i in chosen if not 0 <= i < self.num_hidden_layers]
        if out_of_range:
            raise ValueError(
                f"sharing_layers {out_of_range} out of range: the model has layers 0..{self.num_hidden_layers - 1}"
            )
        if 0 in chosen:
            raise ValueError("layer 0 cannot be a sharing layer: no earlier compute layer exists to share from")
        if self.trained_sharing_layers is not None:
            untrained = sorted(set(chosen) - set(self.trained_sharing_layers))
            if untrained:
                warnings.warn(
                    f"sharing_layers {untrained} lie outside the region this checkpoint was trained to share "
                    f"({self.trained_sharing_layers}); quality will be that of inference-time sharing",
                    UserWarning,
                    stacklevel=2,
                )
        return chosen
