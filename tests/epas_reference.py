"""A plain-PyTorch LLaMA with EPAS sharing, written from the method description only.

It shares no code with ``megatron_patches``: every layer computes its own Q, K, V with separate
weight matrices; a sharing layer then replaces Q and K (``qk``) or K and V (``kv``) with the
post-RoPE tensors of the nearest preceding compute layer. Weights are read from a megatron-core
state dict so both implementations can be compared on identical parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceLlama(nn.Module):
    def __init__(self, num_layers, hidden, heads, groups, ffn, vocab, eps=1e-5, rope_base=10000.0):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.eps, self.rope_base = eps, rope_base
        self.embed = nn.Parameter(torch.empty(vocab, hidden))
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            layer = nn.ParameterDict(
                {
                    "attn_norm": nn.Parameter(torch.empty(hidden)),
                    "wq": nn.Parameter(torch.empty(heads * self.head_dim, hidden)),
                    "wk": nn.Parameter(torch.empty(groups * self.head_dim, hidden)),
                    "wv": nn.Parameter(torch.empty(groups * self.head_dim, hidden)),
                    "wo": nn.Parameter(torch.empty(hidden, heads * self.head_dim)),
                    "mlp_norm": nn.Parameter(torch.empty(hidden)),
                    "w_gate": nn.Parameter(torch.empty(ffn, hidden)),
                    "w_up": nn.Parameter(torch.empty(ffn, hidden)),
                    "w_down": nn.Parameter(torch.empty(hidden, ffn)),
                }
            )
            self.layers.append(layer)
        self.final_norm = nn.Parameter(torch.empty(hidden))
        self.lm_head = nn.Parameter(torch.empty(vocab, hidden))

    def rms_norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def rope(self, x):
        """Rotate-half RoPE on [batch, seq, heads, head_dim]."""
        seq, dim = x.shape[1], x.shape[-1]
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos() + rotated * angles.sin()

    def forward(self, tokens, sharing_layers=(), mode="qk"):
        batch, seq = tokens.shape
        x = self.embed[tokens]
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        source = None
        for index, p in enumerate(self.layers):
            h = self.rms_norm(x, p["attn_norm"])
            q = (h @ p["wq"].T).view(batch, seq, self.heads, self.head_dim)
            k = (h @ p["wk"].T).view(batch, seq, self.groups, self.head_dim)
            v = (h @ p["wv"].T).view(batch, seq, self.groups, self.head_dim)
            q, k = self.rope(q), self.rope(k)
            if index in sharing_layers:
                if mode == "qk":
                    q, k = source
                else:
                    k, v = source
            else:
                source = (q, k) if mode == "qk" else (k, v)
            repeat = self.heads // self.groups
            k_full = k.repeat_interleave(repeat, dim=2)
            v_full = v.repeat_interleave(repeat, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k_full) / math.sqrt(self.head_dim)
            probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
            attn = torch.einsum("bhqk,bkhd->bqhd", probs, v_full).reshape(batch, seq, -1)
            x = x + attn @ p["wo"].T
            h = self.rms_norm(x, p["mlp_norm"])
            x = x + (F.silu(h @ p["w_gate"].T) * (h @ p["w_up"].T)) @ p["w_down"].T
        return self.rms_norm(x, self.final_norm) @ self.lm_head.T

    # ---- megatron-core (TP=1, local spec) parameter layout -------------------------------------

    def _qkv_split(self):
        per_group = self.heads // self.groups
        return [per_group * self.head_dim, self.head_dim, self.head_dim]

    def load_megatron(self, state: dict) -> None:
        """Copy weights from a megatron-core GPTModel state dict (fused, group-interleaved QKV)."""
        with torch.no_grad():
            self.embed.copy_(state["embedding.word_embeddings.weight"])
            self.final_norm.copy_(state["decoder.final_layernorm.weight"])
            self.lm_head.copy_(state["output_layer.weight"])
            for i, p in enumerate(self.layers):
                prefix = f"decoder.layers.{i}."
                qkv = state[prefix + "self_attention.linear_qkv.weight"]
                hidden = qkv.shape[-1]
                q, k, v = qkv.view(self.groups, -1, hidden).split(self._qkv_split(), dim=1)
                p["wq"].copy_(q.reshape(-1, hidden))
                p["wk"].copy_(k.reshape(-1, hidden))
                p["wv"].copy_(v.reshape(-1, hidden))
                p["wo"].copy_(state[prefix + "self_attention.linear_proj.weight"])
                p["attn_norm"].copy_(state[prefix + "input_layernorm.weight"])
                p["mlp_norm"].copy_(state[prefix + "pre_mlp_layernorm.weight"])
                gate, up = state[prefix + "mlp.linear_fc1.weight"].chunk(2)
                p["w_gate"].copy_(gate)
                p["w_up"].copy_(up)
                p["w_down"].copy_(state[prefix + "mlp.linear_fc2.weight"])

    def megatron_grads(self) -> dict:
        """This model's gradients in megatron-core's parameter names and layout."""
        grads = {
            "embedding.word_embeddings.weight": self.embed.grad,
            "decoder.final_layernorm.weight": self.final_norm.grad,
            "output_layer.weight": self.lm_head.grad,
        }
        for i, p in enumerate(self.layers):
            prefix = f"decoder.layers.{i}."
            hidden = p["wq"].shape[-1]
            # a sharing layer never uses its own Q/K (or K/V) weights: their gradient is zero
            parts = [
                (w.grad if w.grad is not None else torch.zeros_like(w)).view(self.groups, -1, hidden)
                for w in (p["wq"], p["wk"], p["wv"])
            ]
            grads[prefix + "self_attention.linear_qkv.weight"] = torch.cat(parts, 1).view(-1, hidden)
            grads[prefix + "self_attention.linear_proj.weight"] = p["wo"].grad
            grads[prefix + "input_layernorm.weight"] = p["attn_norm"].grad
            grads[prefix + "pre_mlp_layernorm.weight"] = p["mlp_norm"].grad
            grads[prefix + "mlp.linear_fc1.weight"] = torch.cat([p["w_gate"].grad, p["w_up"].grad])
            grads[prefix + "mlp.linear_fc2.weight"] = p["w_down"].grad
        return grads
