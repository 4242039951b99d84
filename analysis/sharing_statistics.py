"""How well each layer's own attention tensors are replaced by an earlier layer's, from forward hooks.

For every pair of layers i < j, over the tokens of held-out text run with sharing off:

- the cosine similarity of layer j's post-RoPE queries, keys and values with layer i's at the same
  token and head (RoPE rotates both by the same angle, so this is also the pre-RoPE cosine);
- the relative error of layer j's attention output (before ``o_proj``) when it takes layer i's
  tensors as a sharing layer would: Q and K (``qk``: softmax(q_i k_i) v_j) or K and V (``kv``:
  softmax(q_j k_i) v_i), against its own softmax(q_j k_j) v_j.

Both are kept per key-value head group (query head h belongs to group h // (heads / groups), as in
SDPA's ``enable_gqa`` and the EPAS models). While a batch runs, the hooks hold each layer's Q, K, V
and attention output of that batch for the layers after it, and fold every comparison into running
sums; what outlives a batch is a few [layers, layers, groups] sums, so memory grows with the batch
(--batch-size) but not with the number of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from analysis.evaluate import batches

TENSORS = ("queries", "keys", "values")
SHARED_TENSORS = {"qk": ("queries", "keys"), "kv": ("keys", "values")}


class LayerTensors(NamedTuple):
    """One layer's post-RoPE tensors of the batch in flight ([batch, heads, tokens, head_dim]), their
    float32 norms per token and head, and its own attention output."""

    raw: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    attended: torch.Tensor


class PairStatistics:
    """Running sums over tokens, per (source i, sharing layer j, key-value group), in float64.

    ``cosine_sums[name][i, j, g]`` adds up the cosines of a tensor over tokens (and over the query
    heads of group g for the queries); ``error_sums[mode][i, j, g]`` the squared difference between
    layer j's attention output with layer i's tensors and its own; ``output_sums[j, g]`` the squared
    norm of layer j's own output. Entries with i >= j stay zero.
    """

    def __init__(self, num_layers: int, heads: int, groups: int, modes: tuple[str, ...], device):
        shape = (num_layers, num_layers, groups)
        self.heads, self.groups, self.modes = heads, groups, modes
        self.tokens = 0
        self.cosine_sums = {name: torch.zeros(shape, dtype=torch.float64, device=device) for name in TENSORS}
        self.error_sums = {mode: torch.zeros(shape, dtype=torch.float64, device=device) for mode in modes}
        self.output_sums = torch.zeros(num_layers, groups, dtype=torch.float64, device=device)

    def group_sums(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-token values [batch, heads, tokens] summed over the valid tokens and the heads of each
        key-value group: [groups]. Query head h is in group h // (heads / groups)."""
        kept = values.float().masked_fill(~valid[:, None, :], 0.0).sum(dim=(0, 2))
        return kept.view(self.groups, -1).sum(-1).double()

    def cosine(self, name: str) -> torch.Tensor:
        """Mean cosine of a tensor per pair and group: [layers, layers, groups]."""
        per_group = self.tokens * (self.heads // self.groups if name == "queries" else 1)
        return (self.cosine_sums[name] / max(per_group, 1)).cpu()

    def relative_error(self, mode: str) -> torch.Tensor:
        """Relative error of the attention output per pair and group, ‖shared - own‖ / ‖own‖."""
        return (self.error_sums[mode] / self.output_sums[None].clamp_min(1e-300)).sqrt().cpu()

    def total_relative_error(self, mode: str) -> torch.Tensor:
        """The same over all groups together: [layers, layers]."""
        error = self.error_sums[mode].sum(-1) / self.output_sums.sum(-1)[None].clamp_min(1e-300)
        return error.sqrt().cpu()


class PairHooks:
    """Forward hooks on every layer's attention that fill a :class:`PairStatistics`.

    Each EPAS attention module returns its post-RoPE queries, keys and values (what it would hand to
    the sharing layers after it); the hook of layer j compares them with those of every earlier layer
    of the same batch, then keeps them for the layers after it until the batch ends.
    """

    def __init__(self, model, modes: tuple[str, ...]):
        config = model.config
        self.model, self.modes = model, modes
        self.gqa = config.num_attention_heads != config.num_key_value_heads
        self.statistics = PairStatistics(config.num_hidden_layers, config.num_attention_heads,
                                         config.num_key_value_heads, modes, next(model.parameters()).device)
        self.earlier: list[LayerTensors] = []
        self.valid: torch.Tensor | None = None
        self.handles = [layer.self_attn.register_forward_hook(self._compare) for layer in model.model.layers]

    def _attend(self, queries, keys, values) -> torch.Tensor:
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=self.gqa)

    def _layer_tensors(self, produced) -> LayerTensors:
        raw = {name: getattr(produced, name) for name in TENSORS}
        norms = {name: torch.linalg.vector_norm(tensor.float(), dim=-1).clamp_min(1e-12)
                 for name, tensor in raw.items()}
        return LayerTensors(raw, norms, self._attend(raw["queries"], raw["keys"], raw["values"]))

    def _borrowed(self, mode: str, source: LayerTensors, own: LayerTensors) -> torch.Tensor:
        """Layer j's attention output with the source's Q and K (qk) or K and V (kv)."""
        if mode == "qk":
            return self._attend(source.raw["queries"], source.raw["keys"], own.raw["values"])
        return self._attend(own.raw["queries"], source.raw["keys"], source.raw["values"])

    def _compare(self, module, args, output) -> None:
        statistics, valid = self.statistics, self.valid
        own, j = self._layer_tensors(output[1]), module.layer_idx
        statistics.output_sums[j] += statistics.group_sums(own.attended.float().pow(2).sum(-1), valid)
        for i, source in enumerate(self.earlier):
            for name in TENSORS:
                dot = (source.raw[name].float() * own.raw[name].float()).sum(-1)
                cosines = dot / (source.norms[name] * own.norms[name])
                statistics.cosine_sums[name][i, j] += statistics.group_sums(cosines, valid)
            for mode in self.modes:
                difference = (self._borrowed(mode, source, own) - own.attended).float().pow(2).sum(-1)
                statistics.error_sums[mode][i, j] += statistics.group_sums(difference, valid)
        self.earlier.append(own)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, valid: torch.Tensor) -> None:
        """One batch: ``valid`` [batch, tokens] marks the real (not padding) positions."""
        self.valid, self.earlier = valid, []
        self.model(inputs, use_cache=False)
        self.statistics.tokens += int(valid.sum())
        self.earlier, self.valid = [], None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def pair_statistics(model, windows: list[torch.Tensor], batch_size: int, modes: tuple[str, ...],
                    progress: bool = True) -> PairStatistics:
    """The statistics of every layer pair over ``windows`` (evaluate.token_windows), with sharing off."""
    device = next(model.parameters()).device
    model.set_sharing_layers([])
    hooks = PairHooks(model, modes)
    try:
        total = -(-len(windows) // batch_size)
        for inputs, labels in tqdm(batches(windows, batch_size), total=total, desc="layer pairs", unit=" batch",
                                   disable=not progress):
            hooks.run(inputs.to(device), (labels != -100).to(device))
    finally:
        hooks.remove()
    return hooks.statistics
