"""Edges of the FLOP model that `make mutation` found untested: which attention a layer spec counts, the reuse of
attention probabilities carried through to training FLOPs and savings, and the MFU guard."""

from __future__ import annotations

import pytest

from epas.config import ModelConfig
from epas.flops import attention_counting, forward_flops_per_token, mfu, sharing_saving, training_flops_per_token

MODEL = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=512,
                    vocab_size=1000, seq_length=512)
SHARING = (5, 6, 7)


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
    reused = training_flops_per_token(MODEL, SHARING, "qk", reuses_probabilities=True)
    assert reused == 3 * forward_flops_per_token(MODEL, SHARING, "qk", reuses_probabilities=True)
    skipped = 3 * len(SHARING) * 512 * 8 * 32 * 2  # three passes of the sharing layers' s × heads × head_dim MACs
    assert training_flops_per_token(MODEL, SHARING, "qk") - reused == skipped
    assert sharing_saving(MODEL, SHARING, "qk", reuses_probabilities=True) == pytest.approx(
        sharing_saving(MODEL, SHARING, "qk") + skipped / training_flops_per_token(MODEL, (), "qk"))
