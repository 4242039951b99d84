"""The EPAS model against stock megatron-core and against an independent plain-PyTorch reference."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from torch.utils.flop_counter import FlopCounterMode

from epas.flops import forward_flops_per_token
from megatron_patches.model import build_model, transformer_config
from megatron_patches.sharing_attention import _fused_input_norm
from tests.model_utils import lm_loss, load_weights, random_weights, reference_llama, relative_error, tiny_run

pytestmark = pytest.mark.usefixtures("megatron_cpu")

BATCH, SEQ = 2, 16


def _inputs(vocab: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    return tokens, labels


def _logits(model, tokens):
    return model(tokens, torch.arange(SEQ).expand_as(tokens), None)


def test_sharing_off_is_identical_to_stock_megatron():
    run = tiny_run()
    epas = build_model(run)
    stock = GPTModel(
        config=transformer_config(run),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=run.model.padded_vocab_size(),
        max_sequence_length=run.model.seq_length,
        position_embedding_type="rope",
    )
    state = random_weights(epas)
    load_weights(epas, state)
    load_weights(stock, state)
    epas.set_sharing_layers([])
    tokens, labels = _inputs(run.model.vocab_size)

    assert torch.equal(_logits(epas, tokens), _logits(stock, tokens))
    lm_loss(epas, tokens, labels).backward()
    lm_loss(stock, tokens, labels).backward()
    stock_params = dict(stock.named_parameters())
    for name, param in epas.named_parameters():
        assert torch.equal(param.grad, stock_params[name].grad), name


CASES = [
    # mode, layers, heads, groups, sharing set
    ("qk", 6, 4, 2, (3, 4, 5)),  # GQA, one block at the deep end
    ("kv", 6, 4, 2, (3, 4, 5)),
    ("qk", 6, 4, 4, (2, 3, 5)),  # MHA, two blocks
    ("kv", 6, 4, 4, (2, 3, 5)),
    ("qk", 8, 4, 1, (2, 4, 6, 7)),  # MQA, three blocks
    ("kv", 8, 4, 1, (2, 4, 6, 7)),
]


@pytest.mark.parametrize("mode,layers,heads,groups,sharing", CASES)
def test_sharing_matches_reference_logits_and_gradients(mode, layers, heads, groups, sharing):
    run = tiny_run(mode, num_layers=layers, heads=heads, groups=groups)
    model = build_model(run)
    state = random_weights(model, seed=layers + groups)
    load_weights(model, state)
    reference = reference_llama(run, state)
    model.set_sharing_layers(sharing)
    tokens, labels = _inputs(run.model.vocab_size)

    logits = _logits(model, tokens)
    expected = reference(tokens, sharing_layers=sharing, mode=mode)
    assert relative_error(logits, expected) < 1e-5
    # The comparison has teeth: sharing changes the model's output.
    assert relative_error(reference(tokens), expected) > 1e-3

    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(expected.flatten(0, 1), labels.flatten()).backward()
    expected_grads = reference.megatron_grads()
    for name, param in model.named_parameters():
        assert relative_error(param.grad, expected_grads[name]) < 1e-4, name


def test_source_layer_receives_gradients_through_shared_tensors():
    """The source's Q/K rows get gradient from the sharing layers: dropping that path changes them."""
    run = tiny_run("qk")
    model = build_model(run)
    state = random_weights(model)
    load_weights(model, state)
    tokens, labels = _inputs(run.model.vocab_size)
    source_qkv = model.decoder.layers[2].self_attention.linear_qkv.weight

    grads = {}
    for sharing in [(3, 4, 5), ()]:
        model.zero_grad()
        model.set_sharing_layers(sharing)
        lm_loss(model, tokens, labels).backward()
        grads[sharing] = source_qkv.grad.clone()
    reference = reference_llama(run, state)
    F.cross_entropy(
        reference(tokens, (3, 4, 5)).flatten(0, 1), labels.flatten()
    ).backward()
    expected = reference.megatron_grads()["decoder.layers.2.self_attention.linear_qkv.weight"]
    assert relative_error(grads[(3, 4, 5)], expected) < 1e-4
    assert relative_error(grads[()], expected) > 1e-2


def test_selective_recompute_keeps_shared_gradients_exact():
    run = tiny_run("kv")
    config = transformer_config(run)
    config.recompute_granularity = "selective"
    config.recompute_modules = ["core_attn"]
    model = build_model(run, config=config)
    assert model.decoder.layers[0].self_attention.checkpoint_core_attention
    state = random_weights(model)
    load_weights(model, state)
    reference = reference_llama(run, state)
    model.set_sharing_layers((4, 5))
    tokens, labels = _inputs(run.model.vocab_size)
    F.cross_entropy(_logits(model, tokens).flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(reference(tokens, (4, 5), "kv").flatten(0, 1), labels.flatten()).backward()
    expected = reference.megatron_grads()
    for name, param in model.named_parameters():
        assert relative_error(param.grad, expected[name]) < 1e-4, name


def test_full_recompute_is_refused_with_sharing():
    run = tiny_run()
    config = transformer_config(run)
    config.recompute_granularity = "full"
    config.recompute_method = "uniform"
    config.recompute_num_layers = 1
    model = build_model(run, config=config)
    model.set_sharing_layers([])  # plain training with full recompute stays allowed
    with pytest.raises(ValueError, match="full activation recompute"):
        model.set_sharing_layers([5])


def test_sharing_set_errors():
    model = build_model(tiny_run())
    with pytest.raises(ValueError, match="layer 0 cannot share"):
        model.set_sharing_layers([0, 1])
    with pytest.raises(ValueError, match=r"outside the model's 0\.\.5"):
        model.set_sharing_layers([4, 6])


def test_switching_modes_between_steps_keeps_parameters_and_optimizer():
    model = build_model(tiny_run())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params_before = [id(p) for p in model.parameters()]
    tokens, labels = _inputs(256)
    losses = []
    for sharing in [(), (5,), (4, 5), (3, 4, 5), ()]:
        model.set_sharing_layers(sharing)
        optimizer.zero_grad()
        loss = lm_loss(model, tokens, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert [id(p) for p in model.parameters()] == params_before
    assert all(torch.isfinite(torch.tensor(losses)))
    assert [a.self_attention.shares for a in model.decoder.layers] == [False] * 6


def test_activation_cache_keeps_nothing_alive_after_backward():
    model = build_model(tiny_run("qk"))
    model.set_sharing_layers((2, 3, 5))
    cache = model.activation_cache
    published = []
    put = cache.put
    cache.put = lambda tensors: (published.extend(map(weakref.ref, tensors)), put(tensors))
    tokens, labels = _inputs(256)
    loss = lm_loss(model, tokens, labels)
    assert len(published) == 4  # sources: layers 1 and 4, Q and K each
    assert cache._tensors is None  # emptied when the forward ends
    loss.backward()
    del loss
    gc.collect()
    assert all(ref() is None for ref in published)


@pytest.mark.parametrize("mode", ["qk", "kv"])
@pytest.mark.parametrize("sharing", [(), (5,), (3, 4, 5), (1, 2, 4, 5)])
def test_skipped_projections_are_not_computed(mode, sharing):
    """Counted matmul FLOPs of the real forward equal the FLOP model's, which drops Q/K (or K/V)."""
    run = tiny_run(mode)
    model = build_model(run)
    model.set_sharing_layers(sharing)
    tokens, _ = _inputs(run.model.vocab_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _logits(model, tokens)
    expected = forward_flops_per_token(run.model, sharing, mode, seq_length=SEQ, reuses_probabilities=True)
    assert counter.get_total_flops() == expected * BATCH * SEQ


@pytest.mark.parametrize("sharing", [(3, 4, 5), (1, 2, 4, 5)])
def test_qk_sharing_layers_reuse_the_source_attention_probabilities(sharing):
    """Unfused attention runs its softmax once per QK block, and gradients still match recomputing it."""
    run = tiny_run("qk")
    model = build_model(run)
    load_weights(model, random_weights(model))
    softmax_runs = []
    for layer in model.decoder.layers:
        layer.self_attention.core_attention.scale_mask_softmax.register_forward_hook(
            lambda module, args, output, number=layer.layer_number: softmax_runs.append(number - 1)
        )
    model.set_sharing_layers(sharing)
    tokens, labels = _inputs(run.model.vocab_size)
    reused = _loss_and_grads(model, tokens, labels)
    assert softmax_runs == [i for i in range(run.model.num_layers) if i not in sharing]

    for layer in model.decoder.layers:  # recompute: every layer runs its own softmax again
        layer.self_attention.shares_probabilities = False
    softmax_runs.clear()
    recomputed = _loss_and_grads(model, tokens, labels)
    assert softmax_runs == list(range(run.model.num_layers))
    for name, grad in recomputed.items():
        torch.testing.assert_close(reused[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _loss_and_grads(model, tokens, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, tokens, labels)
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_te_fused_input_norm_equals_the_torch_norm(normalization, zero_centered):
    """With the TE spec a sharing layer applies the norm that TE fuses into linear_qkv itself."""
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(SEQ, BATCH, 64, generator=generator)
    weight, bias = 1 + 0.1 * torch.randn(2, 64, generator=generator)
    linear = SimpleNamespace(  # the attributes of TE's LayerNormColumnParallelLinear that are read
        layer_norm_weight=weight - 1 if zero_centered else weight, layer_norm_bias=bias,
        zero_centered_gamma=zero_centered, normalization=normalization, eps=1e-5,
    )
    norm = torch.nn.RMSNorm(64, eps=1e-5) if normalization == "RMSNorm" else torch.nn.LayerNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        if normalization == "LayerNorm":
            norm.bias.copy_(bias)
    torch.testing.assert_close(_fused_input_norm(linear, x), norm(x))
    assert _fused_input_norm(linear, x.bfloat16()).dtype == torch.bfloat16
