"""The preallocated EpasStaticCache and the graph-replayed greedy decoder built on it: the same logits and tokens as
the dynamic cache and generate(), fixed buffers, and decode steps that a CUDA graph can capture: they read nothing
back to the host (on the CPU a read-back shows as aten::_local_scalar_dense) and make no tensor there (on the meta
device such a tensor fails the step)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig, GenerationConfig, StaticCache

from benchmarks.generate import llama_twin
from benchmarks.static_decoding import GraphedGreedy
from epas_hf import EpasStaticCache
from epas_hf import modeling_epas_llama as modeling
from epas_hf.modeling_epas_llama import CACHE_KEYWORD
from tests.model_utils import frobenius_error
from tests.test_hf_model import cache_of, epas_model, greedy, tokens

GPU_DEVICE = os.environ.get("EPAS_GPU_TESTS_DEVICE", "cuda")
HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


def graph_counter():
    """A torch.compile backend that runs each graph as traced, and the list of the graphs it was given."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend, graphs


def compiling_anywhere(**options) -> CompileConfig:
    """A compile_config that generate() applies on any device (by default it compiles on accelerators only)."""
    config = CompileConfig(mode=None, **options)
    config._compile_all_devices = True
    return config


def left_padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and their padding mask, the first sequence left-padded by two tokens."""
    ids = tokens(batch, length)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


class HostReads(TorchDispatchMode):
    """Counts the operators that copy a tensor's value to the host (int(), bool(), .item(), data-dependent shapes)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_prefill_and_steps_equal_the_dynamic_cache_with_left_padding(mode):
    model = epas_model(2, [2, 3], mode).eval()
    ids, mask = left_padded(2, 8)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        static = model.new_static_cache(2, 10)
        logits = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=static).logits
        assert frobenius_error(logits, full[:, :5]) < 1e-5
        for step in range(5, 8):
            logits = model(ids[:, step:step + 1], attention_mask=mask[:, :step + 1], past_key_values=static).logits
            assert frobenius_error(logits, full[:, step:step + 1]) < 1e-5, step
    assert int(static.get_seq_length()) == 8


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_generate_with_a_static_cache_equals_the_dynamic_cache(mode):
    model = epas_model(2, [2, 3], mode).eval()
    ids = tokens(2, 5)
    dynamic = greedy(model, ids, new_tokens=4)
    static = model.new_static_cache(2, 5 + 4 - 1)
    output = greedy(model, ids, new_tokens=4, **{CACHE_KEYWORD: static})
    assert torch.equal(output.sequences, dynamic.sequences)
    assert all(frobenius_error(a, b) < 1e-5 for a, b in zip(output.logits, dynamic.logits))
    assert cache_of(output) is static and int(static.get_seq_length()) == 8


@pytest.mark.parametrize("search", [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_builds_a_static_cache_when_asked(search):
    """cache_implementation="static" gets an EpasStaticCache for every copy of the left-padded batch (beams,
    returned sequences), as long as the prompt and the tokens fed back; it decodes what the dynamic cache does."""
    model = epas_model(2, [2, 3], "qk").eval()
    ids, mask = left_padded(2, 5)
    dynamic = greedy(model, ids, mask, new_tokens=4, **search)
    output = greedy(model, ids, mask, new_tokens=4, cache_implementation="static", **search)
    assert torch.equal(output.sequences, dynamic.sequences)
    assert all(frobenius_error(a, b) < 1e-5 for a, b in zip(output.logits, dynamic.logits))
    cache = cache_of(output)
    copies = max(search.get("num_beams", 1), search.get("num_return_sequences", 1))
    assert isinstance(cache, EpasStaticCache) and cache.layout == ((2, 3), "qk")
    assert cache.layers[0].key_buffer.shape[0] == 2 * copies and cache.max_length == int(cache.filled) == 5 + 4 - 1


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_generate_compiles_the_decode_steps_into_one_graph(mode):
    """With a static cache generate() compiles the decode steps (on a GPU by default; its compile_config says so
    here): the padding mask it passes has the cache's length, so one graph serves every step, and the tokens and
    logits are those of the dynamic cache."""
    backend, graphs = graph_counter()
    compile_config = compiling_anywhere(fullgraph=True, backend=backend)
    model = epas_model(2, [2, 3], mode).eval()
    ids, mask = left_padded(2, 5)
    dynamic = greedy(model, ids, mask, new_tokens=6)
    output = greedy(model, ids, mask, new_tokens=6, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(output.sequences, dynamic.sequences)
    assert all(frobenius_error(a, b) < 1e-5 for a, b in zip(output.logits, dynamic.logits))
    assert len(graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(GPU_DEVICE == "cuda" and not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (EPAS_GPU_TESTS_DEVICE=cpu dry-runs it on the CPU, without CUDA graphs)")
@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_generate_compiles_a_static_cache_with_its_own_compile_config_on_a_gpu(mode):
    """What a user gets from generate(cache_implementation="static") on a GPU: its default compile_config
    (inductor, CUDA graphs), a graph compiled for the decode steps, and the tokens of the dynamic cache."""
    if GPU_DEVICE == "cuda":
        compile_config = CompileConfig()  # generate()'s default
    else:
        # the dry run checks the test's logic: dynamo's graph, without inductor's C++ builds
        compile_config = compiling_anywhere(backend="eager")
    model = epas_model(2, [2, 3], mode).to(GPU_DEVICE).eval()
    ids, mask = (t.to(GPU_DEVICE) for t in left_padded(2, 5))
    dynamic = greedy(model, ids, mask, new_tokens=8)
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):  # the second call replays what the first compiled
        output = greedy(model, ids, mask, new_tokens=8, cache_implementation="static", compile_config=compile_config)
        assert torch.equal(output.sequences, dynamic.sequences)
        assert all(frobenius_error(a, b) < 1e-4 for a, b in zip(output.logits, dynamic.logits))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before + 1


@pytest.mark.skipif(not hasattr(GenerationConfig(), "max_cache_len"), reason="max_cache_len: transformers >= 5.17")
def test_calls_of_different_lengths_share_one_graph_with_max_cache_len():
    backend, graphs = graph_counter()
    compile_config = compiling_anywhere(fullgraph=True, backend=backend)
    model = epas_model(2, [3], "kv").eval()
    for prompt, new_tokens in ((5, 6), (7, 3)):
        ids = tokens(2, prompt)
        dynamic = greedy(model, ids, new_tokens=new_tokens)
        output = greedy(model, ids, new_tokens=new_tokens, cache_implementation="static", max_cache_len=16,
                        compile_config=compile_config)
        assert torch.equal(output.sequences, dynamic.sequences) and cache_of(output).max_length == 16
    assert len(graphs) == 1


@pytest.mark.parametrize("implementation", ["offloaded", "quantized", "offloaded_static", "sliding_window"])
def test_generate_refuses_caches_that_do_not_know_the_sharing_layout(implementation):
    model = epas_model(2, [3], "kv").eval()
    with pytest.raises(ValueError, match=f"None, 'dynamic' or 'static', got '{implementation}'"):
        greedy(model, tokens(1, 4), new_tokens=2, cache_implementation=implementation)


def test_generate_refuses_transformers_static_cache():
    model = epas_model(2, [3], "qk").eval()
    for mask in (None, torch.ones(1, 4, dtype=torch.long)):
        with pytest.raises(TypeError, match="cannot decode with a StaticCache.*new_static_cache"):
            model.generate(tokens(1, 4), attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                           **{CACHE_KEYWORD: StaticCache(config=model.config, max_cache_len=8)})


def test_generate_still_refuses_a_cache_together_with_cache_implementation():
    model = epas_model(2, [3], "qk").eval()
    with pytest.raises(ValueError, match="cache_implementation"):
        greedy(model, tokens(1, 4), new_tokens=2, cache_implementation="static",
               **{CACHE_KEYWORD: model.new_static_cache(1, 5)})


def test_buffers_keep_their_size_and_addresses_and_hold_the_layout():
    """qk sharing layers hold V only, every buffer is max_length long from the start and is written in place;
    crop and reset move only the count, and a reset cache decodes a new prompt as a fresh one."""
    model = epas_model(2, [2, 3], "qk").eval()
    cache = model.new_static_cache(2, 9)
    slot = 2 * model.config.num_key_value_heads * 9 * model.config.head_dim * 4  # batch x kv heads x 9 x head_dim, fp32
    held = [(layer.key_buffer is not None, layer.value_buffer is not None) for layer in cache.layers]
    assert held == [(True, True), (True, True), (False, True), (False, True)] and cache.nbytes() == 6 * slot
    addresses = [layer.value_buffer.data_ptr() for layer in cache.layers]
    ids = tokens(2, 6)
    with torch.no_grad():
        model(ids[:, :4], past_key_values=cache)
        model(ids[:, 4:5], past_key_values=cache)
        assert [layer.value_buffer.data_ptr() for layer in cache.layers] == addresses and cache.nbytes() == 6 * slot
        for edit, count in ((lambda: cache.crop(-2), 3), (lambda: cache.crop(5), 3), (lambda: cache.crop(1), 1),
                            (lambda: cache.crop(-4), 0)):
            edit()
            assert int(cache.get_seq_length()) == count
        model(ids[:, :3], past_key_values=cache)
        cache.reset()
        again = model(ids[:, 1:], past_key_values=cache).logits
        assert frobenius_error(again, model(ids[:, 1:]).logits) < 1e-5
        model.set_sharing_layers([3])
        with pytest.raises(ValueError, match="cache was built for sharing layers"):
            model(ids[:, :1], past_key_values=cache)


def test_a_decode_step_reads_nothing_back_to_the_host():
    """EPAS in both modes (qk hands its probabilities on) and transformers' LLaMA with its StaticCache; the counter
    itself catches an int() of a tensor."""
    with HostReads() as probe:
        int(torch.tensor(3))
    assert probe.count == 1
    ids = tokens(2, 5)
    for net in (epas_model(2, [2, 3], "qk"), epas_model(2, [2, 3], "kv"), llama_twin(epas_model(2))):
        decoder = GraphedGreedy(net.eval(), 2, 8, 4)
        decoder.reset()
        decoder.prefill(ids)
        with HostReads() as probe:
            decoder.decode(2)
        assert probe.count == 0, type(net).__name__


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_graphed_greedy_makes_the_tokens_of_generate_for_epas_and_llama(mode):
    """Two rounds each (the second after reset), the same tokens as generate(); a prefill must follow a reset."""
    ids = tokens(3, 6)
    for net in (epas_model(2, [2, 3], mode).eval(), llama_twin(epas_model(2, mode=mode))):
        expected = greedy(net, ids, new_tokens=5).sequences[:, 6:]
        decoder = GraphedGreedy(net, 3, 6 + 5 - 1, 5)
        for _ in range(2):
            decoder.reset()
            decoder.prefill(ids)
            decoder.decode(4)
            assert torch.equal(decoder.tokens(), expected), type(net).__name__
        with pytest.raises(RuntimeError, match="reset"):
            decoder.prefill(ids)


def test_a_static_cache_is_an_epas_cache_for_the_model():
    cache = epas_model(2, [3], "kv").new_static_cache(1, 4)
    assert isinstance(cache, EpasStaticCache) and cache.layout == ((3,), "kv")
    assert cache.layers[3].key_buffer is None and cache.layers[3].value_buffer is None


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_decode_steps_compile_into_one_whole_graph(mode):
    """torch.compile(fullgraph=True) of a step: no graph break, and one graph serves every step (the count of
    tokens is a tensor, so no step recompiles); the compiled steps equal the full forward."""
    backend, graphs = graph_counter()
    model = epas_model(2, [2, 3], mode).eval()
    ids = tokens(2, 8)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_static_cache(2, 8)
        model(ids[:, :5], past_key_values=cache)
        step = torch.compile(lambda token: model(token, past_key_values=cache).logits, backend=backend,
                             fullgraph=True)
        for position in range(5, 8):
            assert frobenius_error(step(ids[:, position:position + 1]), full[:, position:position + 1]) < 1e-5
    assert len(graphs) == 1


def test_a_decode_step_makes_no_tensor_on_the_host():
    """On the meta device, where a tensor made on the host (which a CUDA graph cannot capture) fails the step."""
    for mode in ("qk", "kv"):
        with torch.device("meta"):
            model = epas_model(2, [2, 3], mode).eval()
        decoder = GraphedGreedy(model, 2, 8, 4)
        decoder.reset()
        decoder.prefill(torch.zeros(2, 5, dtype=torch.long, device="meta"))
        decoder.decode(2)
        assert decoder.token.device.type == "meta"


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_masked_attention_reads_grouped_keys_and_values_once(mode, monkeypatch):
    """SDPA has no fused kernel for a mask with grouped heads: a masked prefill repeats K and V per query head
    before SDPA, and a masked one-token step (static cache, padded batch) weighs V with probabilities it computes
    from the grouped heads, without SDPA; unmasked steps keep SDPA's grouped heads. All equal the full forward."""
    calls = []
    sdpa = modeling.F.scaled_dot_product_attention

    def recorded(query, key, value, attn_mask=None, enable_gqa=False, **kwargs):
        calls.append((query.shape[-2], query.shape[1] == key.shape[1], attn_mask is not None, enable_gqa))
        return sdpa(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", recorded)
    model = epas_model(2, [3], mode).eval()  # 4 query heads in 2 groups
    ids = tokens(2, 6)
    with torch.no_grad():
        full = model(ids).logits
        assert calls and all(query_heads_equal is False and gqa for _, query_heads_equal, _, gqa in calls)
        calls.clear()
        cache = model.new_static_cache(2, 6)
        prefill = model(ids[:, :5], past_key_values=cache).logits
        assert calls and all(length == 5 and equal_heads and masked and not gqa for length, equal_heads, masked, gqa
                             in calls)
        calls.clear()
        step = model(ids[:, 5:], past_key_values=cache).logits
        assert calls == []
    assert frobenius_error(prefill, full[:, :5]) < 1e-5 and frobenius_error(step, full[:, 5:]) < 1e-5
