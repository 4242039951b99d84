"""megatron-core model paths that `make mutation` found untested: what a sharing layer refuses (inference contexts in
either keyword form, packed sequences), its row projection with a bias, the epsilon of the norm it applies for TE,
an attention mask given to the model, the sharing set it reports, an fp32 model left unwrapped for training, the
names of the EPAS work in profiler traces, and the forward pre-hooks of the weights a sharing layer reads."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from torch.profiler import ProfilerActivity, profile

from megatron_patches.model import build_model, in_training_precision, transformer_config
from megatron_patches.sharing_attention import _fused_input_norm
from tests.model_utils import lm_loss, load_weights, random_weights, tiny_run

pytestmark = pytest.mark.usefixtures("megatron_cpu")


@pytest.mark.parametrize("keyword, message", [
    ("inference_context", "inference contexts are not supported in sharing mode"),
    ("inference_params", "inference contexts are not supported in sharing mode"),
    ("packed_seq_params", "packed sequences are not supported in sharing mode"),
])
def test_a_sharing_layer_refuses_what_it_cannot_share(keyword, message):
    model = build_model(tiny_run(num_layers=2))
    model.set_sharing_layers([1])
    with pytest.raises(NotImplementedError, match=message):
        model.decoder.layers[1].self_attention(torch.zeros(4, 1, 64), None, **{keyword: object()})


@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_projected_rows_equal_stock_megatron_projections_with_a_bias(heads, groups):
    """A sharing layer multiplies only the V (qk) or Q (kv) rows of linear_qkv, bias included: they must equal
    what stock megatron-core's split of the whole fused projection gives (LLaMA has no bias; other models do)."""
    run = tiny_run(num_layers=2, heads=heads, groups=groups)
    model = build_model(run, dataclasses.replace(transformer_config(run), add_bias_linear=True))
    attention = model.decoder.layers[1].self_attention
    assert attention.linear_qkv.bias.numel() == (heads + 2 * groups) * 16
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in attention.linear_qkv.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    hidden = torch.randn(5, 2, 64, generator=generator)
    with torch.no_grad():
        query, _, value = attention.get_query_key_value_tensors(hidden)
        torch.testing.assert_close(attention._project_rows(hidden, "v"), value)
        torch.testing.assert_close(attention._project_rows(hidden, "q"), query)


def test_an_attention_mask_reaches_the_layers_as_in_stock_megatron():
    """The EPAS model hands its mask to GPTModel.forward: with one, sharing off stays identical to stock."""
    run = tiny_run(num_layers=2)
    epas = build_model(run)
    stock = GPTModel(
        config=transformer_config(run), transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=run.model.padded_vocab_size(), max_sequence_length=run.model.seq_length,
        position_embedding_type="rope",
    )
    state = random_weights(epas)
    load_weights(epas, state)
    load_weights(stock, state)
    tokens = torch.randint(0, run.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8).expand_as(tokens)
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1)  # True = hidden: causal ...
    mask[2:, 1] = True  # ... and token 1 hidden from the later ones
    mask = mask.expand(2, 1, 8, 8)
    with torch.no_grad():
        masked = epas(tokens, positions, mask)
        assert torch.equal(masked, stock(tokens, positions, mask))
        assert not torch.allclose(masked, epas(tokens, positions, None))  # the mask matters


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_the_te_fused_input_norm_uses_the_layer_epsilon(normalization):
    """tests/test_sharing_model.py checks the norm at eps=1e-5, where leaving eps out goes unseen: here it matters."""
    generator = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(4, 2, 64, generator=generator)
    weight, bias = 1 + 0.1 * torch.randn(2, 64, generator=generator)
    linear = SimpleNamespace(  # the attributes of TE's LayerNormColumnParallelLinear that are read
        layer_norm_weight=weight, layer_norm_bias=bias, zero_centered_gamma=False, normalization=normalization, eps=0.5,
    )
    norm = torch.nn.RMSNorm(64, eps=0.5) if normalization == "RMSNorm" else torch.nn.LayerNorm(64, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        if normalization == "LayerNorm":
            norm.bias.copy_(bias)
        torch.testing.assert_close(_fused_input_norm(linear, x), norm(x))


def test_the_model_reports_its_sharing_set():
    model = build_model(tiny_run(num_layers=4))
    model.set_sharing_layers([3, 2])
    assert model.sharing_layers == (2, 3)


def test_an_fp32_model_is_trained_as_it_is():
    run = tiny_run(num_layers=2)
    model = build_model(run)
    assert in_training_precision(model, transformer_config(run)) is model


@pytest.mark.parametrize("mode, work", [
    ("qk", {"epas/project_v_only": 2, "epas/context_from_shared_probabilities": 2}),
    ("kv", {"epas/project_q_only": 2}),
])
def test_the_epas_work_is_named_in_profiler_traces(mode, work):
    """Layer 1 hands its tensors to sharing layers 2 and 3: one publish, two takes, two partial projections."""
    model = build_model(tiny_run(mode, num_layers=4))
    model.set_sharing_layers([2, 3])
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        lm_loss(model, tokens, tokens).backward()
    ranges = Counter(event.name for event in profiler.events() if event.name.startswith("epas/"))
    assert ranges == {"epas/publish_shared": 1, "epas/take_shared": 2, **work}


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_a_sharing_layer_runs_the_pre_hooks_of_the_weights_it_reads(mode):
    """megatron-core's DDP waits in linear_qkv's forward pre-hook for the all-gather of its updated weights
    (parallel.overlap_param_gather); a sharing layer reads them without calling linear_qkv, so it runs them."""
    model = build_model(tiny_run(mode, num_layers=2))
    model.set_sharing_layers([1])
    linear_qkv = model.decoder.layers[1].self_attention.linear_qkv
    called = []
    linear_qkv.register_forward_pre_hook(lambda module, args: called.append(module))
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm_loss(model, tokens, tokens)
    assert called == [linear_qkv]
