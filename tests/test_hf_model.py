"""The Hugging Face EPAS model (epas_hf) against transformers' LLaMA, the plain-PyTorch reference, and itself.

CPU only, tiny random models. Runs under transformers 5.x and 4.57 (the latter without the megatron conftest:
``pytest tests/test_hf_model.py --noconftest``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from epas_hf import EpasCache, EpasLlamaConfig, EpasLlamaForCausalLM, write_model_files
from epas_hf.modeling_epas_llama import CACHE_KEYWORD, EpasLayerCache
from tests.epas_reference import ReferenceLlama
from tests.model_utils import frobenius_error

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 4, 64, 4, 128, 128
HEAD_DIM = HIDDEN // HEADS
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # so the tiny head_dim has low, medium and high frequencies
}


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_kwargs(groups: int = 2, tied: bool = False, rope_scaling: dict | None = None) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=groups,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1)-scale random weights, so attention is far from uniform and sharing visibly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def epas_model(groups: int = 2, sharing=(), mode: str = "qk", seed: int = 0, **config) -> EpasLlamaForCausalLM:
    kwargs = llama_kwargs(groups)
    kwargs.update(config)
    return randomize(EpasLlamaForCausalLM(EpasLlamaConfig(sharing_layers=sharing, sharing_mode=mode, **kwargs)), seed)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_of(output) -> EpasCache | None:
    """The cache an output carries, under the name of the installed transformers ("cache" or "past_key_values")."""
    return getattr(output, CACHE_KEYWORD)


def greedy(model, input_ids, attention_mask=None, use_cache=True, new_tokens=6, **kwargs):
    """generate() (greedy unless `kwargs` say otherwise) with the sequences and each step's logits."""
    settings = {"do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True, "output_logits": True, **kwargs}
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            max_new_tokens=new_tokens,
            use_cache=use_cache,
            **settings,
        )


# ---- 1. sharing off == transformers' LlamaForCausalLM ------------------------------------------------------


@pytest.mark.parametrize(
    "groups, tied, rope_scaling",
    [(2, False, None), (4, False, None), (2, True, None), (4, True, None), (2, False, LLAMA3_ROPE)],
    ids=["gqa", "mha", "gqa-tied", "mha-tied", "gqa-llama3-rope"],
)
def test_sharing_off_equals_transformers_llama(groups, tied, rope_scaling):
    kwargs = llama_kwargs(groups, tied, rope_scaling)
    llama = randomize(LlamaForCausalLM(LlamaConfig(**kwargs)))
    epas = EpasLlamaForCausalLM(EpasLlamaConfig(**kwargs)).eval()
    assert set(epas.state_dict()) == set(llama.state_dict())
    epas.load_state_dict(llama.state_dict())
    if tied:
        assert epas.lm_head.weight.data_ptr() == epas.model.embed_tokens.weight.data_ptr()

    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first row
    labels = ids.clone()
    labels[1, 5:] = -100
    with torch.no_grad():
        ours, theirs = epas(ids, labels=labels), llama(ids, labels=labels)
        assert frobenius_error(ours.logits, theirs.logits) < 1e-5
        assert frobenius_error(ours.loss, theirs.loss) < 1e-5
        padded_epas = epas(ids, attention_mask=mask).logits
        padded_llama = llama(ids, attention_mask=mask).logits
    real = mask.bool()
    assert frobenius_error(padded_epas[real], padded_llama[real]) < 1e-5
    assert torch.isfinite(padded_epas).all()  # padding rows too: nothing NaN to leak into later layers


# ---- 2. sharing on == the plain-PyTorch reference ------------------------------------------------------------


REFERENCE_NAMES = {  # ReferenceLlama parameter -> EpasLlamaForCausalLM parameter (per layer)
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def reference_from(model: EpasLlamaForCausalLM) -> ReferenceLlama:
    config = model.config
    reference = ReferenceLlama(
        LAYERS, HIDDEN, HEADS, config.num_key_value_heads, FFN, VOCAB, eps=config.rms_norm_eps, rope_base=10000.0
    )
    state = model.state_dict()
    with torch.no_grad():
        reference.embed.copy_(state["model.embed_tokens.weight"])
        reference.final_norm.copy_(state["model.norm.weight"])
        reference.lm_head.copy_(state["lm_head.weight"])
        for i, layer in enumerate(reference.layers):
            for ours, theirs in REFERENCE_NAMES.items():
                layer[ours].copy_(state[f"model.layers.{i}.{theirs}.weight"])
    return reference


def projection_calls(model: EpasLlamaForCausalLM) -> dict:
    """Count, per (layer, projection), the calls during a forward: shows which projections really run."""
    calls = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            calls[i, name] = 0
            getattr(layer.self_attn, name).register_forward_hook(
                lambda *_, key=(i, name): calls.__setitem__(key, calls[key] + 1)
            )
    return calls


@pytest.mark.parametrize(
    "mode, groups, sharing",
    [("qk", 2, [2, 3]), ("kv", 2, [2, 3]), ("qk", 4, [1, 3]), ("kv", 4, [1, 3]), ("qk", 2, [1, 3]), ("kv", 4, [2, 3])],
)
def test_sharing_equals_reference(mode, groups, sharing):
    model = epas_model(groups, sharing, mode)
    reference = reference_from(model)
    ids = tokens(2, 12)
    calls = projection_calls(model)
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids, sharing_layers=sharing, mode=mode)
        unshared = reference(ids)
    assert frobenius_error(logits, expected) < 1e-5
    assert frobenius_error(logits, unshared) > 1e-2  # sharing does change the function

    computed = {"qk": {"v_proj"}, "kv": {"q_proj"}}[mode]
    for (layer, name), count in calls.items():
        assert count == (1 if layer not in sharing or name in computed else 0), (layer, name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("mode, sharing", [("qk", [2, 3]), ("kv", [2, 3]), ("qk", [1, 3]), ("kv", [1, 3])])
def test_gradients_equal_the_reference(mode, sharing, checkpointing):
    """Every parameter's gradient equals the reference's: the sharing layers' gradients reach the source
    layer's Q/K (or K/V) projections, also when layers are recomputed (the Trainer's gradient checkpointing)."""
    model = epas_model(2, sharing, mode).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # overridden
        assert model.model.gradient_checkpointing
    reference = reference_from(model)
    ids = tokens(2, 12)
    model(ids, labels=ids).loss.backward()
    logits = reference(ids, sharing_layers=sharing, mode=mode)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()

    grads = dict(model.named_parameters())
    expected = {"model.embed_tokens.weight": reference.embed, "model.norm.weight": reference.final_norm,
                "lm_head.weight": reference.lm_head}
    for i, layer in enumerate(reference.layers):
        expected.update({f"model.layers.{i}.{hf}.weight": layer[ours] for ours, hf in REFERENCE_NAMES.items()})
    assert expected.keys() == grads.keys()
    unused = {name for name, theirs in expected.items() if theirs.grad is None}  # a sharer's skipped projections
    assert unused == {name for name, ours in grads.items() if ours.grad is None} and len(unused) == 2 * len(sharing)
    errors = {name: frobenius_error(grads[name].grad, theirs.grad) for name, theirs in expected.items()
              if name not in unused}
    assert max(errors.values()) < 1e-5, {name: e for name, e in errors.items() if e >= 1e-5}
    source = sharing[0] - 1
    for projection in ("k_proj", "q_proj" if mode == "qk" else "v_proj"):  # the shared ones get the sharers' share
        assert grads[f"model.layers.{source}.self_attn.{projection}.weight"].grad.abs().sum() > 0


# ---- 3. generate() with the cache == without it --------------------------------------------------------------

SHARING_CASES = [([], "qk"), ([2, 3], "qk"), ([2, 3], "kv"), ([1, 3], "qk"), ([1, 3], "kv")]
SHARING_IDS = ["none", "qk-23", "kv-23", "qk-13", "kv-13"]


@pytest.fixture(params=[256, 3], ids=["one-chunk", "growing"])
def cache_chunk(request, monkeypatch):
    """The cache's growth step: 256 holds every test sequence in its first buffer, 3 regrows it while decoding."""
    monkeypatch.setattr(EpasLayerCache, "chunk", request.param)
    return request.param


@pytest.mark.parametrize("sharing, mode", SHARING_CASES, ids=SHARING_IDS)
def test_generate_with_cache_equals_without(sharing, mode, cache_chunk):
    model = epas_model(2, sharing, mode)
    prompt = tokens(2, 7)
    cached = greedy(model, prompt)
    uncached = greedy(model, prompt, use_cache=False)
    assert isinstance(cache_of(cached), EpasCache)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == len(uncached.logits) == 6
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):
        assert frobenius_error(step_cached, step_uncached) < 1e-5


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_sampling_with_cache_equals_without(mode):
    model = epas_model(2, [2, 3], mode)
    prompt = tokens(2, 7)
    sequences = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        sequences.append(greedy(model, prompt, use_cache=use_cache, do_sample=True, top_k=0, new_tokens=8).sequences)
    assert torch.equal(*sequences)


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_generate_fills_a_cache_the_caller_passes(mode):
    """The caller's EpasCache is the one generate() extends and returns (under transformers' name for it)."""
    model = epas_model(2, [2, 3], mode)
    prompt = tokens(2, 7)
    mine = model.new_cache()
    cached = greedy(model, prompt, **{CACHE_KEYWORD: mine})
    assert cache_of(cached) is mine and mine.get_seq_length() == 7 + 5
    assert torch.equal(cached.sequences, greedy(model, prompt, use_cache=False).sequences)


@pytest.mark.parametrize("sharing, mode", SHARING_CASES, ids=SHARING_IDS)
def test_chunked_forward_with_cache_equals_full_forward(sharing, mode):
    """Several new tokens on top of a cache (chunked prefill): causal masking must be offset by the past."""
    model = epas_model(2, sharing, mode)
    ids = tokens(2, 11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            first = None if attention_mask is None else attention_mask[:, :6]
            full = model(ids, attention_mask=attention_mask).logits
            cache = cache_of(model(ids[:, :6], attention_mask=first, use_cache=True))
            rest = model(ids[:, 6:], attention_mask=attention_mask, past_key_values=cache).logits
            assert frobenius_error(rest, full[:, 6:]) < 1e-5


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_beam_search_with_cache_equals_without(mode, cache_chunk):
    model = epas_model(2, [2, 3], mode)
    prompt = tokens(2, 5)
    beams = dict(num_beams=3, num_return_sequences=2)
    cached = greedy(model, prompt, **beams)
    uncached = greedy(model, prompt, use_cache=False, **beams)
    assert torch.equal(cached.sequences, uncached.sequences)


# ---- 4. the cache holds exactly the predicted bytes ----------------------------------------------------------


@pytest.mark.parametrize("sharing, mode", SHARING_CASES, ids=SHARING_IDS)
def test_cache_bytes(sharing, mode):
    groups, batch, length = 2, 2, 7
    model = epas_model(groups, sharing, mode)
    kv_bytes = 2 * batch * groups * length * HEAD_DIM * 4  # fp32 K + V of one compute layer
    held_by_sharing_layer = {"qk": kv_bytes // 2, "kv": 0}[mode]  # qk: V only; kv: nothing
    predicted = (LAYERS - len(sharing)) * kv_bytes + len(sharing) * held_by_sharing_layer
    with torch.no_grad():
        cache = cache_of(model(tokens(batch, length), use_cache=True))
    assert cache.nbytes() == predicted
    for index, layer in enumerate(cache.layers):
        assert (layer.keys is None) == (index in sharing)
        assert (layer.values is None) == (index in sharing and mode == "kv")

    # after generate(): the prompt plus every generated token but the last one is cached
    generated = cache_of(greedy(model, tokens(batch, length), new_tokens=4))
    assert generated.get_seq_length() == length + 3
    assert generated.nbytes() == predicted * (length + 3) // length


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_cache_edits_continue_like_fresh_caches(mode, cache_chunk):
    """Every edit generate() makes to a cache (crop for assisted decoding, in both transformers conventions;
    batch_select_indices; batch_repeat_interleave and reorder_cache for beam search) keeps each row's keys and
    values with its sequence: decoding on from the edited cache gives the logits of a fresh forward."""
    model = epas_model(2, [2, 3], mode)
    ids = tokens(2, 9)

    def continued(cache, rows) -> float:
        return frobenius_error(model(ids[rows, 5:], past_key_values=cache).logits, full[rows, 5:])

    with torch.no_grad():
        full = model(ids).logits
        for crop in (-2, 5):
            cache = cache_of(model(ids[:, :7], use_cache=True))
            cache.crop(crop)
            assert cache.get_seq_length() == 5
            assert continued(cache, [0, 1]) < 1e-5
        edits = {
            "select": (lambda cache: cache.batch_select_indices(torch.tensor([1])), [1]),
            "repeat": (lambda cache: cache.batch_repeat_interleave(3), [0, 0, 0, 1, 1, 1]),
            "reorder": (lambda cache: cache.reorder_cache(torch.tensor([1, 0, 1])), [1, 0, 1]),
        }
        for name, (edit, rows) in edits.items():
            cache = cache_of(model(ids[:, :5], use_cache=True))
            edit(cache)
            assert continued(cache, rows) < 1e-5, name


# ---- 5. save, export with the model files, load with trust_remote_code ---------------------------------------

# Run in a fresh interpreter outside the repository: epas_hf cannot be imported there (and, once imported, its
# registration would take precedence over the folder's code), so this exercises the exported files alone.
REMOTE_LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
folder = sys.argv[1]
ids = torch.load(folder + "/ids.pt")
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, sharing_layers=[2, 3]).eval()
with torch.no_grad():
    result = {"module": type(model).__module__, "sharing": model.config.sharing_layers, "logits_23": model(ids).logits}
    model.set_sharing_layers([3])
    result["logits_3"] = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=0, return_dict_in_generate=True)
result["sequences_3"] = generated.sequences
result["cache_class"] = type(getattr(generated, sys.modules[type(model).__module__].CACHE_KEYWORD)).__name__
result["imported_epas_hf"] = "epas_hf" in sys.modules
torch.save(result, folder + "/result.pt")
"""


def export(model, folder):
    """save_pretrained plus the model files and their auto_map: a folder loadable with trust_remote_code."""
    model.save_pretrained(folder)
    auto_map = write_model_files(folder)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "auto_map": auto_map}))


def test_export_round_trip_chooses_sharing_at_load_time(tmp_path):
    model = epas_model(2, [], "qk", trained_sharing_layers=[2, 3])
    export(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, sharing_layers=[2, 3]).eval()
    assert loaded.config.sharing_layers == [2, 3] and loaded.config.trained_sharing_layers == [2, 3]
    ids = tokens(2, 10)
    with torch.no_grad():
        assert frobenius_error(loaded(ids).logits, reference_from(model)(ids, [2, 3])) < 1e-5
        for sharing in ([3], []):
            loaded.set_sharing_layers(sharing)
            model.set_sharing_layers(sharing)
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_exported_folder_loads_as_remote_code_alone(tmp_path):
    folder = tmp_path / "epas_tiny_export"  # a fixed name reuses one transformers_modules entry across runs
    model = epas_model(2, [], "qk")
    export(model, folder)
    ids = tokens(2, 10)
    torch.save(ids, folder / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(folder)], cwd=tmp_path, env=env, check=True)
    result = torch.load(folder / "result.pt")

    assert result["module"].startswith("transformers_modules") and not result["imported_epas_hf"]
    assert result["sharing"] == [2, 3] and result["cache_class"] == "EpasCache"
    with torch.no_grad():
        model.set_sharing_layers([2, 3])
        assert torch.equal(result["logits_23"], model(ids).logits)
        model.set_sharing_layers([3])
        assert torch.equal(result["logits_3"], model(ids).logits)
    assert torch.equal(result["sequences_3"], greedy(model, ids).sequences)


def test_plain_llama_checkpoint_loads(tmp_path):
    kwargs = llama_kwargs(2, tied=True)
    llama = randomize(LlamaForCausalLM(LlamaConfig(**kwargs)))
    llama.save_pretrained(tmp_path)
    ids = tokens(2, 10)
    with torch.no_grad():
        expected = llama(ids).logits
        epas = EpasLlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert frobenius_error(epas(ids).logits, expected) < 1e-5
        shared = EpasLlamaForCausalLM.from_pretrained(tmp_path, sharing_layers=[3], sharing_mode="kv").eval()
        assert frobenius_error(shared(ids).logits, reference_from(shared)(ids, [3], "kv")) < 1e-5


# ---- 6. errors and warnings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sharing, mode, message",
    [([0, 2], "qk", "layer 0"), ([2, 4], "qk", "out of range"), ([-1], "kv", "out of range"), ([2], "vq", "sharing_mode")],
)
def test_invalid_sharing_is_rejected(sharing, mode, message):
    with pytest.raises(ValueError, match=message):
        EpasLlamaConfig(sharing_layers=sharing, sharing_mode=mode, **llama_kwargs())
    model = epas_model(2, [3], "qk")
    with pytest.raises(ValueError, match=message):
        model.config.sharing_mode = mode
        model.set_sharing_layers(sharing)


def test_invalid_sharing_is_rejected_at_load_time(tmp_path):
    epas_model(2, [3]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer 0"):
        EpasLlamaForCausalLM.from_pretrained(tmp_path, sharing_layers=[0, 1])


def test_sharing_outside_the_trained_region_warns():
    model = epas_model(2, [3], "qk", trained_sharing_layers=[2, 3])
    with pytest.warns(UserWarning, match=r"\[1\] lie outside"):
        model.set_sharing_layers([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_sharing_layers([2, 3])
        model.set_sharing_layers([])


def test_unsupported_rope_and_foreign_caches_are_rejected():
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        EpasLlamaForCausalLM(EpasLlamaConfig(**llama_kwargs(rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    model = epas_model(2, [3], "qk")
    ids = tokens(1, 4)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 4, HEAD_DIM), torch.zeros(1, 2, 4, HEAD_DIM), 0)
    with torch.no_grad(), pytest.raises(TypeError, match="EpasCache"):
        model(ids, past_key_values=filled)
    with torch.no_grad():  # an empty one, as generate() builds by default, is replaced: it holds nothing
        assert isinstance(cache_of(model(ids, past_key_values=DynamicCache())), EpasCache)
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        model.set_sharing_layers([2, 3])
        with pytest.raises(ValueError, match="cache was built for"):
            model(ids, past_key_values=cache)


# ---- 7. batched left-padded generation == one sequence at a time ---------------------------------------------


@pytest.mark.parametrize("sharing, mode", SHARING_CASES[:3], ids=SHARING_IDS[:3])
def test_left_padded_batch_generation_equals_single(sharing, mode):
    model = epas_model(2, sharing, mode)
    prompts = [tokens(1, length, seed=length)[0] for length in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    batched = greedy(model, batch, mask)
    for row, prompt in enumerate(prompts):
        single = greedy(model, prompt[None])
        assert torch.equal(batched.sequences[row, width:], single.sequences[0, len(prompt) :]), row
        for step_batched, step_single in zip(batched.logits, single.logits):
            assert frobenius_error(step_batched[row], step_single[0]) < 1e-5
