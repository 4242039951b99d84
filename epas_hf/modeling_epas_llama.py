"""EPAS LLaMA for Hugging Face transformers: a LLaMA whose sharing layers reuse attention tensors of an earlier layer.

A compute-mode layer is an ordinary LLaMA layer. A sharing layer takes tensors from the nearest preceding compute
layer (its source) and computes only the rest: with ``sharing_mode="qk"`` it reuses the post-RoPE Q and K and computes
only V; with ``"kv"`` it reuses the post-RoPE K and V and computes only Q. Norms, output projection and MLP are always
the layer's own, and every layer keeps all its Q/K/V weights, so parameter names and shapes are those of
``LlamaForCausalLM`` and the sharing set can be chosen at load time or changed later.

This file is copied verbatim into exported checkpoints (``trust_remote_code``), so it imports only torch, transformers
and its configuration, and it avoids transformers' LLaMA internals, which change between versions (4.57 and 5.x are
both supported).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_epas_llama import EpasLlamaConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The keyword under which generate() hands the cache to forward() and reads it back from its output: "cache" from
# transformers 5.24 on, "past_key_values" before. A model output class declares the name its version uses.
CACHE_KEYWORD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SharedAttention(NamedTuple):
    """What a layer hands on to the sharing layers after it: post-RoPE queries of this step, and keys and values
    over everything attended to (cached past plus this step), all as [batch, heads, tokens, head_dim]; and, when it
    decodes one token for QK-sharing layers, its attention probabilities as [batch, kv_heads, groups, keys]."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    probabilities: torch.Tensor | None = None


def cache_layout(sharing_layers, sharing_mode: str) -> tuple:
    """What decides which tensors each layer caches: the sharing layers and, when there are any, the mode."""
    return tuple(sharing_layers), sharing_mode if sharing_layers else None


class EpasLayerCache:
    """One layer's part of an `EpasCache`: keys and/or values as [batch, kv_heads, tokens, head_dim], or nothing.

    It holds whatever its layer appends, so a QK-sharing layer (appending values only) holds no keys and a
    KV-sharing layer (appending nothing) holds no tensor at all. Tokens are written into buffers that grow by
    `chunk` tokens when full, so a decoding step writes one token instead of copying the whole past (torch.cat);
    `keys` and `values` are views of the written part.
    """

    is_croppable = True  # read by transformers 5's Cache.is_croppable: crop() below can undo any step
    chunk = 256  # tokens a full buffer grows by: at most chunk - 1 tokens of unused room per tensor

    def __init__(self):
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.length = 0

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[..., : self.length, :]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[..., : self.length, :]

    def _written(self, buffer: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
        """`buffer` with `update` written after the cached tokens, first grown by whole chunks if it is full."""
        end = self.length + update.shape[-2]
        if buffer is None or end > buffer.shape[-2]:
            capacity = -(-end // self.chunk) * self.chunk
            grown = update.new_empty(*update.shape[:-2], capacity, update.shape[-1])
            if buffer is not None:
                grown[..., : self.length, :] = buffer[..., : self.length, :]
            buffer = grown
        buffer[..., self.length : end, :] = update
        return buffer

    def append(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        """Add this step's keys/values (None for one the layer does not hold); return the full ones."""
        if keys is not None:
            self.key_buffer = self._written(self.key_buffer, keys)
        if values is not None:
            self.value_buffer = self._written(self.value_buffer, values)
        held = keys if keys is not None else values
        if held is not None:
            self.length += held.shape[-2]
        return self.keys, self.values

    def _map(self, function) -> None:
        self.key_buffer = None if self.key_buffer is None else function(self.key_buffer)
        self.value_buffer = None if self.value_buffer is None else function(self.value_buffer)

    def seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        """Bytes of the cached tokens (the buffers' unused room at the end is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def crop(self, length: int) -> None:
        """Drop trailing tokens: ``-n`` removes n (transformers 5 convention), ``n >= 0`` keeps the first n (4.x)."""
        self.length = self.length + length if length < 0 else min(length, self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class EpasCache(Cache):
    """Dynamic KV cache laid out for one sharing set.

    A compute layer caches K and V; a QK-sharing layer caches only V, since its keys are its source's cached keys;
    a KV-sharing layer caches nothing. The layer-wise methods generate() calls on a cache (reorder_cache, crop,
    batch_repeat_interleave, batch_select_indices, reset) are the base class's loops over `layers`.
    """

    def __init__(self, num_layers: int, sharing_layers, sharing_mode: str):
        super().__init__(layers=[EpasLayerCache() for _ in range(num_layers)])
        self.layout = cache_layout(sharing_layers, sharing_mode)

    def append(self, layer_idx: int, keys: torch.Tensor | None, values: torch.Tensor | None):
        return self.layers[layer_idx].append(keys, values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached so far; layer 0 always computes, so it always holds keys."""
        return self.layers[0].seq_length()

    @property
    def is_compileable(self) -> bool:
        """False: buffers grow while decoding; it also keeps generate() from building 4D masks or compiling."""
        return False

    def nbytes(self) -> int:
        """Bytes held by all cached tensors."""
        return sum(layer.nbytes() for layer in self.layers)


class EpasStaticCache(EpasCache):
    """Preallocated cache, laid out like `EpasCache`, for decoding under CUDA graphs or torch.compile.

    Every tensor a layer holds is one [batch, kv_heads, max_length, head_dim] buffer allocated up front (zeros, so
    that the masked slots weigh nothing) and written in place; the count of written tokens is a tensor. A decoding
    step therefore allocates no cache memory, keeps every address fixed and never reads a number back to the host,
    which is what a captured CUDA graph needs. Attention runs over all `max_length` slots with the unwritten ones
    masked. The model calls `reserve` once per forward; writing past `max_length` is an indexing error.
    """

    def __init__(self, num_layers: int, sharing_layers, sharing_mode: str, *, batch_size: int, max_length: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__(num_layers, sharing_layers, sharing_mode)
        shape = (batch_size, kv_heads, max_length, head_dim)
        sharing = set(sharing_layers)
        for index, layer in enumerate(self.layers):
            holds_keys = index not in sharing
            holds_values = holds_keys or sharing_mode == "qk"
            layer.key_buffer = torch.zeros(shape, dtype=dtype, device=device) if holds_keys else None
            layer.value_buffer = torch.zeros(shape, dtype=dtype, device=device) if holds_values else None
            layer.length = max_length  # `keys`/`values` (and nbytes) are the whole buffers
        self.max_length = max_length
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        self.slots: torch.Tensor | None = None  # set by reserve()
        if not torch.compiler.is_compiling():  # torch.compile's CUDA graphs keep these addresses
            for tensor in (self.filled, *(b for layer in self.layers for b in (layer.key_buffer, layer.value_buffer))):
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor)

    def reserve(self, length: int) -> torch.Tensor:
        """The slots of this forward's `length` tokens, after those written so far; they count as written now."""
        self.slots = self.filled + torch.arange(length, device=self.filled.device)
        self.filled.add_(length)
        return self.slots

    def append(self, layer_idx: int, keys: torch.Tensor | None, values: torch.Tensor | None):
        """Write this forward's keys/values at the reserved slots; return the whole buffers."""
        layer = self.layers[layer_idx]
        for buffer, update in ((layer.key_buffer, keys), (layer.value_buffer, values)):
            if update is not None:
                buffer.index_copy_(2, self.slots, update)
        return layer.key_buffer, layer.value_buffer

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        """Tokens written so far, as a 0-d tensor (like transformers' StaticCache: no read back to the host)."""
        return self.filled

    @property
    def is_compileable(self) -> bool:
        """True: generate() compiles the decode steps (on a GPU, or wherever its compile_config says), with the
        padding mask from `EpasLlamaForCausalLM.create_masks_for_generate`."""
        return True

    def crop(self, length: int) -> None:
        """Drop trailing tokens (same conventions as `EpasLayerCache.crop`); the buffers keep their size."""
        if length < 0:
            self.filled.add_(length).clamp_(min=0)
        else:
            self.filled.clamp_(max=length)

    def reset(self) -> None:
        self.filled.zero_()


class EpasRMSNorm(nn.Module):
    """LLaMA's RMSNorm (statistics in fp32, weight applied in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)


def _rope_parameters(config) -> dict:
    """RoPE settings as one dict: transformers 5 keeps them in `rope_parameters`, 4.x in `rope_theta`/`rope_scaling`."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters is None:
        parameters = {"rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    parameters = dict(parameters)
    parameters["rope_type"] = parameters.get("rope_type", parameters.get("type", "default"))
    return parameters


class EpasRotaryEmbedding(nn.Module):
    """LLaMA's rotary position embedding (default, "linear" or "llama3" frequencies).

    The inverse frequencies are recomputed per call instead of living in a buffer: a non-persistent buffer is left
    uninitialised when transformers builds the model on the meta device, and the cost is a few hundred flops.
    """

    def __init__(self, config):
        super().__init__()
        self.settings = _rope_parameters(config)
        self.head_dim = config.head_dim
        if self.settings["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.settings['rope_type']!r} is not supported by EpasLlama "
                f"(supported: {SUPPORTED_ROPE_TYPES})"
            )

    def inverse_frequencies(self, device) -> torch.Tensor:
        p, dim = self.settings, self.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        inv_freq = 1.0 / (p["rope_theta"] ** exponents)
        if p["rope_type"] == "linear":
            return inv_freq / p["factor"]
        if p["rope_type"] == "llama3":
            factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old_context = p["original_max_position_embeddings"]
            wavelength = 2 * math.pi / inv_freq
            scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
            smooth = (old_context / wavelength - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
            return torch.where(is_medium, smoothed, scaled)
        return inv_freq

    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype):
        """cos and sin as [batch, 1, tokens, head_dim], ready to broadcast over heads."""
        freqs = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _one_cache(cache, past_key_values):
    """The cache passed under either of transformers' names for it."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return past_key_values if cache is None else cache


def _attention_mask(attention_mask, query_length: int, past_length: int, device):
    """SDPA mask arguments for causal attention over past + new tokens with an optional 2D padding mask.

    Returns (mask, is_causal): mask is boolean [batch, 1, query, key] (True = attend) or None when plain causal
    attention (or none, for a single new token) is exact, which keeps SDPA's fastest kernels available.
    """
    key_length = past_length + query_length
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask must be [batch, {key_length}] (past + new tokens), got {tuple(attention_mask.shape)}"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and (past_length == 0 or query_length == 1):
        return None, query_length > 1
    return _allowed_keys(torch.arange(past_length, key_length, device=device), key_length, attention_mask), False


def _static_attention_mask(attention_mask, slots: torch.Tensor, max_length: int) -> torch.Tensor:
    """The mask over a static cache's `max_length` slots for queries written at `slots`, with an optional 2D
    padding mask [batch, tokens so far]."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[-1] > max_length):
        raise ValueError(
            f"attention_mask must be [batch, tokens so far] with at most the static cache's {max_length} tokens, "
            f"got {tuple(attention_mask.shape)}"
        )
    return _allowed_keys(slots, max_length, attention_mask)


def _allowed_keys(query_positions: torch.Tensor, key_length: int, attention_mask) -> torch.Tensor:
    """Boolean [batch, 1, query, key_length] (True = attend): each query attends to the keys up to its own
    position and, with a 2D padding mask (0 = padding), to no padding. A mask shorter than `key_length` (a static
    cache's slots not written yet) is extended with ones: causality masks those keys already. A padding query's row
    is all-masked: SDPA (torch >= 2.5) returns zeros there, no NaN."""
    allowed = (torch.arange(key_length, device=query_positions.device) <= query_positions[:, None])[None, None]
    if attention_mask is not None:
        padding = F.pad(attention_mask.bool(), (0, key_length - attention_mask.shape[-1]), value=True)
        allowed = allowed & padding[:, None, None, :]
    return allowed


class EpasAttention(nn.Module):
    """LLaMA self-attention that, in a sharing layer, takes Q and K (qk) or K and V (kv) from its source layer."""

    def __init__(self, config: EpasLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def _heads(self, projection: torch.Tensor) -> torch.Tensor:
        batch, length, _ = projection.shape
        return projection.view(batch, length, -1, self.head_dim).transpose(1, 2)

    def _decode_probabilities(self, queries, keys, mask) -> torch.Tensor:
        """Softmax attention of one query token as [batch, kv_heads, groups, keys] (fp32 softmax, as transformers'
        eager attention); query head h belongs to kv head h // groups, as in SDPA's enable_gqa."""
        batch, _, _, head_dim = queries.shape
        grouped = queries.reshape(batch, self.num_key_value_heads, -1, head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)

    def _weighted_values(self, probabilities, values) -> torch.Tensor:
        """probabilities @ values, back as [batch, heads, 1, head_dim]."""
        batch = probabilities.shape[0]
        return torch.matmul(probabilities, values).reshape(batch, self.num_heads, 1, self.head_dim)

    def _attend(self, queries, keys, values, mask, is_causal) -> torch.Tensor:
        """SDPA; where a mask meets grouped heads, K and V are first repeated per query head, since no fused SDPA
        kernel takes both (flash attention takes no mask, memory-efficient attention no groups) and the math
        kernel it would fall back to materialises every score."""
        grouped = self.num_heads != self.num_key_value_heads
        if grouped and mask is not None:
            groups = self.num_heads // self.num_key_value_heads
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            grouped = False
        return F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=grouped,
        )

    def forward(self, hidden_states, rope, mask, is_causal, cache, shared, sharing_mode, hands_on_probabilities):
        """`shared` is the source layer's SharedAttention in a sharing layer, None in a compute layer.

        In QK sharing a sharing layer's attention probabilities are its source's (same Q and K). When one token is
        decoded they are small ([batch, heads, keys]), so a source whose next layer shares computes them once
        (`hands_on_probabilities`) and each sharing layer reads only its own V instead of its source's K again."""
        cos, sin = rope
        if shared is None:
            queries = _apply_rope(self._heads(self.q_proj(hidden_states)), cos, sin)
            keys = _apply_rope(self._heads(self.k_proj(hidden_states)), cos, sin)
            values = self._heads(self.v_proj(hidden_states))
            if cache is not None:
                keys, values = cache.append(self.layer_idx, keys, values)
        elif sharing_mode == "qk":
            queries, keys = shared.queries, shared.keys
            values = self._heads(self.v_proj(hidden_states))
            if cache is not None:
                _, values = cache.append(self.layer_idx, None, values)
        else:
            queries = _apply_rope(self._heads(self.q_proj(hidden_states)), cos, sin)
            keys, values = shared.keys, shared.values
        probabilities = shared.probabilities if shared is not None and sharing_mode == "qk" else None
        one_token = queries.shape[-2] == 1 and not self.training
        # a masked one-token step (a static cache, a padded batch) also computes them: it reads K and V once, where
        # SDPA would fall back to its math kernel for grouped heads (see _attend)
        if probabilities is None and one_token and (hands_on_probabilities or mask is not None):
            probabilities = self._decode_probabilities(queries, keys, mask)
        if probabilities is not None:
            attended = self._weighted_values(probabilities, values)
        else:
            attended = self._attend(queries, keys, values, mask, is_causal)
        batch, _, length, _ = attended.shape
        output = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        return output, SharedAttention(queries, keys, values, probabilities)


class EpasMLP(nn.Module):
    def __init__(self, config: EpasLlamaConfig):
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, ffn, bias=bias)
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EpasLlamaDecoderLayer(nn.Module):
    def __init__(self, config: EpasLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = EpasAttention(config, layer_idx)
        self.mlp = EpasMLP(config)
        self.input_layernorm = EpasRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = EpasRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, rope, mask, is_causal, cache, shared, sharing_mode, hands_on_probabilities):
        attended, produced = self.self_attn(
            self.input_layernorm(hidden_states), rope, mask, is_causal, cache, shared, sharing_mode,
            hands_on_probabilities,
        )
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, produced


class EpasLlamaPreTrainedModel(PreTrainedModel):
    config_class = EpasLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["EpasLlamaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    # checkpoints from old transformers versions saved RoPE's inverse frequencies; they are recomputed here
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def set_sharing_layers(self, layers) -> None:
        """Switch the given layers (0-based) to sharing mode and all others to compute mode (validated)."""
        self.config.sharing_layers = self.config.checked_sharing_layers(layers)

    def new_cache(self) -> EpasCache:
        """An empty cache laid out for the current sharing set."""
        return EpasCache(self.config.num_hidden_layers, self.config.sharing_layers, self.config.sharing_mode)

    def new_static_cache(self, batch_size: int, max_length: int) -> EpasStaticCache:
        """A preallocated cache for `batch_size` sequences of up to `max_length` tokens (prompt and new tokens) for
        the current sharing set, in the model's dtype and on its device: for decoding under CUDA graphs."""
        parameter = next(self.parameters())
        return EpasStaticCache(
            self.config.num_hidden_layers, self.config.sharing_layers, self.config.sharing_mode,
            batch_size=batch_size, max_length=max_length, kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim, dtype=parameter.dtype, device=parameter.device,
        )


class EpasLlamaModel(EpasLlamaPreTrainedModel):
    """The decoder stack; returns final hidden states and the EpasCache."""

    def __init__(self, config: EpasLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(EpasLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = EpasRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = EpasRotaryEmbedding(config)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable(): recompute layers in backward
        # from_pretrained applies keyword overrides (e.g. sharing_layers=...) after the config is built: check them
        self.set_sharing_layers(config.sharing_layers)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _cache_for(self, cache, use_cache: bool) -> EpasCache | None:
        """The cache to read and extend: the caller's EpasCache, or a new one in place of none or of an empty
        foreign cache, which is what generate() builds by default (a DynamicCache) and holds nothing to lose."""
        if cache is None:
            return self.new_cache() if use_cache else None
        if not isinstance(cache, EpasCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                return self.new_cache()
            raise TypeError(
                f"EpasLlama needs an EpasCache (or None, to build one), got a filled {type(cache).__name__}: "
                "other caches do not know which layers hold keys and values"
            )
        layout = cache_layout(self.config.sharing_layers, self.config.sharing_mode)
        if cache.layout != layout:
            raise ValueError(f"the cache was built for sharing layers/mode {cache.layout}, the model now uses {layout}")
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EpasCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: EpasCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """LLaMA's forward. `attention_mask` is 2D [batch, past + new tokens] (0 = padding); the cache comes as
        `cache` or `past_key_values` (transformers' new and old names); `use_cache` defaults to config.use_cache
        outside training; other keyword arguments that generate() passes (return_dict, ...) are accepted and
        unused."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = self._cache_for(_one_cache(cache, past_key_values), use_cache)
        length = hidden_states.shape[1]
        if isinstance(cache, EpasStaticCache):
            slots = cache.reserve(length)
            if position_ids is None:
                position_ids = slots[None]
            mask, is_causal = _static_attention_mask(attention_mask, slots, cache.max_length), False
        else:
            past_length = cache.get_seq_length() if cache is not None else 0
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + length, device=hidden_states.device)[None]
            mask, is_causal = _attention_mask(attention_mask, length, past_length, hidden_states.device)
        rope = self.rotary_emb(position_ids, hidden_states.dtype)

        sharing, mode = set(self.config.sharing_layers), self.config.sharing_mode
        recompute = self.gradient_checkpointing and self.training
        source = None
        for index, layer in enumerate(self.layers):
            is_sharing = index in sharing
            hands_on_probabilities = mode == "qk" and not is_sharing and index + 1 in sharing
            shared = source if is_sharing else None
            inputs = (hidden_states, rope, mask, is_causal, cache, shared, mode, hands_on_probabilities)
            if recompute:
                # non-reentrant whatever the caller asked: only it carries gradients through the shared
                # tensors, which travel between layers inside a NamedTuple
                hidden_states, produced = checkpoint(layer, *inputs, use_reentrant=False)
            else:
                hidden_states, produced = layer(*inputs)
            if not is_sharing:
                source = produced
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_KEYWORD: cache})


class EpasLlamaForCausalLM(EpasLlamaPreTrainedModel, GenerationMixin):
    """EPAS LLaMA with its language-model head; a drop-in for LlamaForCausalLM checkpoints."""

    # the dict form is what transformers 5 reads; 4.x iterates it and gets the tied parameter's name
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EpasLlamaConfig):
        super().__init__(config)
        self.model = EpasLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """generate()'s hook for the cache it builds: `cache_implementation="static"` gets an EpasStaticCache sized
        for the call, or for `max_cache_len` tokens where it is set (transformers 5.17 on: calls of different
        lengths then reuse one compiled graph); the default and "dynamic" get the caches generate() makes, which
        forward() replaces with an EpasCache; other implementations (offloaded, quantized, sliding) and a static
        cache of transformers' own are refused rather than silently replaced."""
        implementation = generation_config.cache_implementation
        given = model_kwargs.get(CACHE_KEYWORD)
        if isinstance(given, Cache) and given.is_compileable and not isinstance(given, EpasStaticCache):
            raise TypeError(
                f"EpasLlama cannot decode with a {type(given).__name__}: it does not know which layers hold keys and "
                "values; for a static cache pass model.new_static_cache(batch, max_length) or "
                "cache_implementation='static'"
            )
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"EpasLlama supports cache_implementation None, 'dynamic' or 'static', got {implementation!r}: "
                "the other caches do not know which layers hold keys and values"
            )
        if implementation == "static" and generation_config.use_cache and given is None:
            copies = max(generation_config.num_beams, generation_config.num_return_sequences)
            length = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            model_kwargs[CACHE_KEYWORD] = self.new_static_cache(copies * batch_size, length)
        else:  # generate()'s own checks, such as a cache passed together with cache_implementation
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **inputs):
        """generate()'s hook for the mask of a step with a compileable cache (EpasStaticCache): the 2D padding mask
        extended with ones to the cache's length, so that every decode step has the same shapes and one compiled
        graph serves them all; forward() builds the causal mask from it."""
        if attention_mask is None:
            return None
        cache = inputs[CACHE_KEYWORD]
        return F.pad(attention_mask, (0, cache.max_length - attention_mask.shape[-1]), value=1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EpasCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: EpasCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (for the last `logits_to_keep` positions, 0 = all), and the next-token loss if `labels` are given
        (-100 = ignored; with the Trainer's `num_items_in_batch` the loss is normalized over the whole accumulated
        batch, as for LlamaForCausalLM)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=_one_cache(cache, past_key_values),
        )
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEYWORD: getattr(outputs, CACHE_KEYWORD)})
