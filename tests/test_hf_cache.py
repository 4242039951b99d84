"""Cache paths that `make mutation` found untested: cropping to nothing and resetting leave an empty cache that
fills again from the next token, in the compute layers (K and V) and the QK-sharing layers (V only); buffers
grow by whole chunks only when full; a decoding step of a QK block computes its probabilities once, also in bf16;
prefill chunks of every small size."""

from __future__ import annotations

import pytest
import torch

from epas_hf import EpasCache
from epas_hf import modeling_epas_llama as modeling
from epas_hf.modeling_epas_llama import EpasLayerCache
from tests.model_utils import frobenius_error
from tests.test_hf_model import cache_of, epas_model, tokens


def _filled(length: int) -> tuple[EpasCache, torch.Tensor, torch.Tensor]:
    cache = EpasCache(num_layers=2, sharing_layers=[1], sharing_mode="qk")
    keys, values = torch.randn(2, 2, length, 4), torch.randn(2, 2, length, 4)
    cache.append(0, keys, values)
    cache.append(1, None, values + 1)
    return cache, keys, values


@pytest.mark.parametrize("edit", ["crop(0)", "reset()"])
def test_an_emptied_cache_fills_again_from_the_next_token(edit):
    cache, _, _ = _filled(5)
    cache.crop(0) if edit == "crop(0)" else cache.reset()  # crop(0) keeps the first 0 tokens
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    keys, values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(cache.append(0, keys, values), (keys, values)))
    assert cache.append(1, None, values)[1].shape[-2] == 1
    assert cache.get_seq_length() == 1


def test_crop_keeps_the_first_tokens_in_both_conventions():
    for crop, kept in ((-2, 3), (3, 3), (0, 0), (9, 5), (-5, 0)):
        cache, keys, values = _filled(5)
        cache.crop(crop)
        assert cache.get_seq_length() == kept, crop
        assert torch.equal(cache.layers[0].keys, keys[..., :kept, :]) and torch.equal(
            cache.layers[1].values, values[..., :kept, :] + 1), crop


def test_decoding_in_bf16_hands_on_probabilities_in_the_model_dtype():
    """A one-token step of a QK block computes its probabilities once in fp32 and must hand them on in bf16."""
    model = epas_model(2, [2, 3], "qk")
    ids = tokens(2, 6)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        model.to(torch.bfloat16)
        rounded = model(ids).logits[:, -1]  # bf16 without the cache: the rounding to expect
        cache = cache_of(model(ids[:, :5], use_cache=True))
        step = model(ids[:, 5:], past_key_values=cache).logits[:, -1]
    assert step.dtype == torch.bfloat16
    # within twice a plain bf16 forward's rounding (about 3% here; a wrong sharing set is off by 40%)
    assert frobenius_error(step.float(), expected) < 2 * frobenius_error(rounded.float(), expected)


def test_buffers_grow_by_whole_chunks_only_when_full(monkeypatch):
    """A step that fits writes into the existing buffer (no copy of the past); a full buffer grows by one chunk."""
    monkeypatch.setattr(EpasLayerCache, "chunk", 4)
    layer = EpasLayerCache()
    tokens_written = []
    for step in (3, 1, 1, 4):
        before = None if layer.key_buffer is None else layer.key_buffer.data_ptr()
        update = torch.randn(2, 2, step, 4)
        tokens_written.append(update)
        keys, _ = layer.append(update, None)
        assert torch.equal(keys, torch.cat(tokens_written, dim=-2))
        if step == 1 and len(tokens_written) == 2:  # 4 of 4 places used: written in place
            assert layer.key_buffer.data_ptr() == before and layer.key_buffer.shape[-2] == 4
    assert layer.key_buffer.shape[-2] == 12  # 9 tokens: three chunks


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_chunks_of_every_small_size_and_all_ones_masks_equal_the_full_forward(mode):
    """Prefill in chunks of 2, 1, 3 and of 1, 2, 3 tokens (pasts of 0 to 3): SDPA's plain is_causal aligns the query
    with the first keys, so any chunk after a past needs the offset mask; an all-ones 2D mask is the same as none."""
    model = epas_model(2, [2, 3], mode)
    ids = tokens(2, 6)
    with torch.no_grad():
        full = model(ids).logits
        for sizes in ((2, 1, 3), (1, 2, 3)):
            cache, start = None, 0
            for size in sizes:
                ones = torch.ones(2, start + size, dtype=torch.long)
                output = model(ids[:, start:start + size], attention_mask=ones, past_key_values=cache, use_cache=True)
                assert frobenius_error(output.logits, full[:, start:start + size]) < 1e-5, (sizes, start)
                cache, start = cache_of(output), start + size
        with pytest.raises(ValueError, match=r"attention_mask must be \[batch, 7\]"):
            model(ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=cache)


def test_a_decoding_step_of_a_qk_block_runs_attention_once_per_block(monkeypatch):
    """In a one-token step the block's source computes the probabilities and its QK sharers only weight their own V:
    SDPA runs in layer 0 alone (layer 1 is the source of sharers 2 and 3); a prefill runs it in every layer."""
    model = epas_model(2, [2, 3], "qk")
    ids = tokens(2, 6)
    calls = []
    sdpa = modeling.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", counted)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :5], use_cache=True))
        assert calls == [5, 5, 5, 5]
        step = model(ids[:, 5:], past_key_values=cache).logits
        assert calls[4:] == [1]
        monkeypatch.undo()
        assert frobenius_error(step, model(ids).logits[:, 5:]) < 1e-5
