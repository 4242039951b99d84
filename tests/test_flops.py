"""The FLOP model: the paper's Table 1, closed forms, and an independent count by torch."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from epas.config import ModelConfig, load_config
from epas.flops import (
    attention_counting,
    flops_breakdown,
    forward_flops_per_token,
    mfu,
    sharing_saving,
    training_flops_per_token,
)
from epas.sharing import deepest_layers

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER_SEQ = 2048

# Table 1 of the paper: training FLOPs per sample (seq 2048), TF, without -> with QK sharing on 50%.
# The last field is the tolerance on the absolute totals, see test_table1_absolute.
TABLE1 = {
    "llama_125m": (1.81, 1.72, {"abs": 0.006}),
    "tinyllama_1.1b": (14.98, 14.34, {"abs": 0.006}),
    "llama_3b": (41.41, 38.39, {"rel": 0.10}),
    "llama2_7b": (85.62, 79.21, {"rel": 0.03}),
}


def _per_sample_tf(model, sharing_layers):
    per_token = training_flops_per_token(model, sharing_layers, "qk", seq_length=PAPER_SEQ)
    return per_token * PAPER_SEQ / 1e12


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_reduction(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    model = config.model
    sharing = deepest_layers(model.num_layers, 0.5)
    assert len(sharing) == config.epas.num_sharing_layers  # the preset targets the same half
    before, after, _ = TABLE1[name]
    paper = 1 - after / before
    ours = sharing_saving(model, sharing, "qk", seq_length=PAPER_SEQ)
    print(f"{name}: reduction ours {100 * ours:.2f}% paper {100 * paper:.2f}%")
    assert abs(ours - paper) < 0.01


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_absolute(name):
    """Absolute per-sample totals against Table 1.

    125M and 1.1B agree to the paper's two decimals (tolerance 0.006 TF = half a unit in the last
    place plus float slack), which fixes the convention: full s×s attention (causal=False),
    untied output layer counted, backward = 2× forward. The paper does not publish its 3B and 7B
    shapes; with the OpenLLaMA-3B and LLaMA-2-7B shapes our totals are 8.7% and 2.5% above the
    paper's (45.03 vs 41.41, 87.78 vs 85.62 TF), so for those two only a relative bound holds
    (10% and 3%: a regression guard around the documented gap, not a claim of agreement).
    (The paper's 3B saving, 3.02 TF, is exactly 12 layers' Q/K rows at hidden 3200, which
    suggests a 24-layer model; its 7B saving, 6.41 TF, fits no whole number of hidden-4096 layers.)
    """
    model = load_config(CONFIGS / f"{name}.yaml").model
    before, after, tolerance = TABLE1[name]
    ours_before = _per_sample_tf(model, ())
    ours_after = _per_sample_tf(model, deepest_layers(model.num_layers, 0.5))
    print(f"{name}: ours {ours_before:.2f} -> {ours_after:.2f} TF, paper {before} -> {after} TF")
    assert ours_before == pytest.approx(before, **tolerance)
    assert ours_after == pytest.approx(after, **tolerance)


def test_causal_halving_also_within_a_point_but_worse():
    """causal=True halves the attention matmuls; it still gives reductions within a point of the
    paper's, but misses the 125M and 1.1B absolute totals, so it is not the default."""
    for name, (before, after, _) in TABLE1.items():
        model = load_config(CONFIGS / f"{name}.yaml").model
        sharing = deepest_layers(model.num_layers, 0.5)
        full = sharing_saving(model, sharing, seq_length=PAPER_SEQ)
        causal = sharing_saving(model, sharing, seq_length=PAPER_SEQ, causal=True)
        paper = 1 - after / before
        assert abs(causal - paper) < 0.01
        assert abs(full - paper) < abs(causal - paper)
    tiny = load_config(CONFIGS / "tinyllama_1.1b.yaml").model
    total = training_flops_per_token(tiny, seq_length=PAPER_SEQ, causal=True) * PAPER_SEQ / 1e12
    assert abs(total - 14.98) > 1.0


# --- closed forms on a tiny model -------------------------------------------------------------

TINY = ModelConfig(
    num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2,
    ffn_hidden_size=96, vocab_size=100, make_vocab_size_divisible_by=4, seq_length=16,
)


def test_breakdown_closed_form():
    h, L, s, ffn, V = 64, 4, 16, 96, 100
    q_rows, kv_rows = 64, 16  # 8 heads and 2 groups of head_dim 8
    b = flops_breakdown(TINY)
    assert b == {
        "qkv": L * 2 * h * (q_rows + 2 * kv_rows),
        "attention": L * 2 * (2 * s * h),
        "output_proj": L * 2 * h * h,
        "mlp": L * (2 * h * 2 * ffn + 2 * ffn * h),
        "output_layer": 2 * h * V,
    }
    assert forward_flops_per_token(TINY) == sum(b.values())
    assert training_flops_per_token(TINY) == 3 * sum(b.values())
    # seq_length defaults to the model's; causal halves only the attention matmuls
    assert flops_breakdown(TINY, seq_length=32)["attention"] == 2 * b["attention"]
    causal = flops_breakdown(TINY, causal=True)
    assert causal["attention"] * 2 == b["attention"]
    assert {k: v for k, v in causal.items() if k != "attention"} == {
        k: v for k, v in b.items() if k != "attention"
    }


@pytest.mark.parametrize("mode, skipped_rows", [("qk", 64 + 16), ("kv", 16 + 16)])
def test_sharing_skips_exactly_the_shared_rows(mode, skipped_rows):
    base = forward_flops_per_token(TINY)
    for layers in [(1,), (3,), (2, 3), (1, 2, 3)]:
        shared = forward_flops_per_token(TINY, layers, mode)
        assert base - shared == len(layers) * 2 * 64 * skipped_rows
        attention = flops_breakdown(TINY, layers, mode)["attention"]
        assert attention == flops_breakdown(TINY)["attention"]
        saving = sharing_saving(TINY, layers, mode)
        assert saving == pytest.approx(3 * (base - shared) / (3 * base))


def test_tied_embeddings_still_count_the_output_matmul():
    tied = ModelConfig(**{**TINY.__dict__, "tie_embeddings": True})
    assert forward_flops_per_token(tied) == forward_flops_per_token(TINY)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        forward_flops_per_token(TINY, (1,), "qv")
    with pytest.raises(ValueError, match="layer 0"):
        forward_flops_per_token(TINY, (0,))
    with pytest.raises(ValueError, match=r"\[4\] are outside the model's 0\.\.3"):
        forward_flops_per_token(TINY, (4,))


# --- independent count: a plain PyTorch LLaMA-like forward under FlopCounterMode ---------------


class ToyLlama(nn.Module):
    """Just the matmul structure of the model: fused QKV laid out [q; k; v], full s×s attention
    via matmul, GQA by repeating K/V heads, SwiGLU MLP, untied head. Norms/RoPE are omitted
    (they are not matmuls, so they do not change the count)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_rows, self.kv_rows = cfg.num_attention_heads * d, cfg.query_groups * d
        self.embed = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_layers):
            self.layers.append(nn.ModuleDict({
                "qkv": nn.Linear(h, self.q_rows + 2 * self.kv_rows, bias=False),
                "out": nn.Linear(self.q_rows, h, bias=False),
                "fc1": nn.Linear(h, 2 * cfg.ffn_hidden_size, bias=False),
                "fc2": nn.Linear(cfg.ffn_hidden_size, h, bias=False),
            }))
        self.head = nn.Linear(h, cfg.vocab_size, bias=False)

    def _heads(self, x, n):
        b, s, _ = x.shape
        return x.view(b, s, n, self.cfg.head_dim).transpose(1, 2)

    def forward(self, tokens, sharing_layers=(), mode="qk"):
        cfg, qr, kvr = self.cfg, self.q_rows, self.kv_rows
        x = self.embed(tokens)
        q = k = v = None
        for i, layer in enumerate(self.layers):
            w = layer["qkv"].weight
            if i not in sharing_layers:
                q, k, v = layer["qkv"](x).split([qr, kvr, kvr], dim=-1)
            elif mode == "qk":  # reuse q, k of the preceding compute layer; only the V rows
                v = F.linear(x, w[qr + kvr:])
            else:  # "kv": reuse k, v; only the Q rows
                q = F.linear(x, w[:qr])
            rep = cfg.num_attention_heads // cfg.query_groups
            qh = self._heads(q, cfg.num_attention_heads)
            kh = self._heads(k, cfg.query_groups).repeat_interleave(rep, dim=1)
            vh = self._heads(v, cfg.query_groups).repeat_interleave(rep, dim=1)
            scores = torch.matmul(qh, kh.transpose(-1, -2)) / cfg.head_dim**0.5
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
            ctx = torch.matmul(probs, vh).transpose(1, 2).reshape(x.shape[0], x.shape[1], qr)
            x = x + layer["out"](ctx)
            gate, up = layer["fc1"](x).chunk(2, dim=-1)
            x = x + layer["fc2"](F.silu(gate) * up)
        return self.head(x)


@pytest.mark.parametrize(
    "groups, sharing_layers, mode",
    [(None, (), "qk"), (2, (), "qk"), (2, (2, 3), "qk"), (None, (1, 3), "qk"),
     (2, (2, 3), "kv"), (None, (1,), "kv")],
)
def test_matches_torch_flop_counter(groups, sharing_layers, mode):
    cfg = ModelConfig(**{**TINY.__dict__, "num_query_groups": groups})
    torch.manual_seed(0)
    toy = ToyLlama(cfg)
    batch, seq = 2, 12  # seq differs from cfg.seq_length on purpose
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        toy(tokens, sharing_layers, mode)
    expected = forward_flops_per_token(cfg, sharing_layers, mode, seq_length=seq) * batch * seq
    assert counter.get_total_flops() == expected


def test_torch_training_step_is_three_forwards():
    torch.manual_seed(0)
    toy = ToyLlama(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    with FlopCounterMode(display=False) as counter:
        toy(tokens, (2, 3), "qk").sum().backward()
    # every matmul's backward is two matmuls of its size (dX and dW; the embedding lookup's
    # backward is a scatter-add, not a matmul), so the count is exactly 3× forward.
    assert counter.get_total_flops() == training_flops_per_token(TINY, (2, 3), seq_length=12) * 24


# --- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_layers, fraction, expected",
    [
        (22, 0.5, tuple(range(11, 22))),
        (12, 0.5, tuple(range(6, 12))),
        (26, 0.5, tuple(range(13, 26))),
        (22, 5 / 22, (17, 18, 19, 20, 21)),
        (13, 0.5, tuple(range(6, 13))),  # 6.5 rounds up to 7
        (4, 0.0, ()),
        (4, 1.0, (1, 2, 3)),  # never layer 0
        (1, 1.0, ()),
        (10, 0.04, ()),
        (10, 0.05, (9,)),
    ],
)
def test_deepest_layers(num_layers, fraction, expected):
    assert deepest_layers(num_layers, fraction) == expected


def test_deepest_layers_rejects_bad_input():
    with pytest.raises(ValueError):
        deepest_layers(0, 0.5)
    with pytest.raises(ValueError):
        deepest_layers(8, 1.5)
    with pytest.raises(ValueError):
        deepest_layers(8, -0.1)


def test_mfu():
    assert mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    assert mfu(0.0, 6e9, 1e12) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


# Edges: which attention a layer spec counts, reused attention probabilities carried through to training FLOPs
# and savings, the MFU guard.
EDGE_MODEL = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                         ffn_hidden_size=512, vocab_size=1000, seq_length=512)
EDGE_SHARING = (5, 6, 7)


@pytest.mark.parametrize("spec, counting", [
    ("te", {"causal": True, "reuses_probabilities": False}),  # flash attention: masked half skipped, no probabilities
    ("local", {"causal": False, "reuses_probabilities": True}),  # unfused: full score matrix, QK sharers reuse it
])
def test_each_spec_counts_its_own_attention(spec, counting):
    assert attention_counting(spec) == counting


def test_mfu_accepts_any_positive_peak():
    assert mfu(3.0, 2.0, peak_flops=0.5) == 12.0
    with pytest.raises(ValueError, match="positive"):
        mfu(3.0, 2.0, peak_flops=0.0)


def test_reused_probabilities_reach_training_flops_and_savings():
    """A QK-sharing layer of the local spec skips Q·K^T: every derived figure must see that, not only the forward."""
    reused = training_flops_per_token(EDGE_MODEL, EDGE_SHARING, "qk", reuses_probabilities=True)
    assert reused == 3 * forward_flops_per_token(EDGE_MODEL, EDGE_SHARING, "qk", reuses_probabilities=True)
    skipped = 3 * len(EDGE_SHARING) * 512 * 8 * 32 * 2  # three passes of the sharing layers' s × heads × head_dim MACs
    assert training_flops_per_token(EDGE_MODEL, EDGE_SHARING, "qk") - reused == skipped
    assert sharing_saving(EDGE_MODEL, EDGE_SHARING, "qk", reuses_probabilities=True) == pytest.approx(
        sharing_saving(EDGE_MODEL, EDGE_SHARING, "qk") + skipped / training_flops_per_token(EDGE_MODEL, (), "qk"))
