"""Forward paths of the Hugging Face EPAS model that `make mutation` found untested: attention dropout only in
training, the default cache, the base model with a cache and with embeddings, and gradient checkpointing recomputing
each layer in the backward."""

from __future__ import annotations

import pytest
import torch

from tests.model_utils import frobenius_error
from tests.test_hf_model import cache_of, epas_model, tokens


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_attention_dropout_acts_in_training_only(mode):
    ids = tokens(2, 6)
    plain, dropping = epas_model(2, [2, 3], mode), epas_model(2, [2, 3], mode, attention_dropout=0.5)
    with torch.no_grad():
        assert torch.equal(dropping(ids).logits, plain(ids).logits)
        dropping.train()
        torch.manual_seed(0)
        assert frobenius_error(dropping(ids).logits, plain(ids).logits) > 1e-2


def test_the_cache_is_returned_by_default_outside_training_only():
    model = epas_model(2, [2, 3], "qk")
    ids = tokens(1, 4)
    with torch.no_grad():
        assert cache_of(model(ids)).get_seq_length() == 4
        model.train()
        assert cache_of(model(ids)) is None


def test_the_base_model_takes_a_cache_under_either_name_and_embeddings():
    model = epas_model(2, [2, 3], "kv").model
    ids = tokens(2, 7)
    with torch.no_grad():
        full = model(ids).last_hidden_state
        assert torch.equal(model(inputs_embeds=model.embed_tokens(ids)).last_hidden_state, full)
        for keyword in ("past_key_values", "cache"):
            cache = cache_of(model(ids[:, :4], use_cache=True))
            rest = model(ids[:, 4:], **{keyword: cache}).last_hidden_state
            assert frobenius_error(rest, full[:, 4:]) < 1e-5, keyword


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_each_layer_in_the_backward(checkpointing):
    model = epas_model(2, [2, 3], "qk")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop before the end
    ids = tokens(2, 6)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == len(model.model.layers) * (2 if checkpointing else 1)
