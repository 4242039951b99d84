"""tools/analyze_sharing.py on tiny models built here: a planted redundant block, a model without one, the
pair statistics against a direct computation, and the perplexities against tools/evaluate.py.

The planted block: layers 3, 4 and 5 get layer 2's Q/K (qk) or K/V (kv) weights and input norm. For
copied weights to give the same activations the inputs must agree too, so every model here (with or
without the block) reads Q/K (or K/V) only from the half of the residual stream that the token
embedding writes and no layer writes: the depth at which they are read then changes only the
RMSNorm scale, as in deep layers of trained models, whose residual stream changes slowly. The layers
write into the other half, which the output head reads, so attention matters and sharing a layer that
is not redundant costs perplexity. The data is sampled from the model itself: the model without
sharing is then the best predictor of it, so any change that matters raises its perplexity.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from analysis import evaluate
from analysis.analyze_sharing import analyze, main
from analysis.evaluate import token_windows
from analysis.sharing_regions import candidates, sources
from analysis.sharing_statistics import pair_statistics
from epas.config import EPASConfig
from epas.data.demo_corpus import train_tokenizer
from epas.data.preprocess import preprocess
from epas.scheduler import resolve_target_layers
from tests.test_hf_model import HEAD_DIM, HEADS, HIDDEN, cache_of, epas_model, export

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, GROUPS, VOCAB = 6, 2, 320
BLOCK = (3, 4, 5)  # shares from layer 2
READ_FROM_EMBEDDING = {"qk": ("q_proj", "k_proj"), "kv": ("k_proj", "v_proj")}
EMBEDDING_SCALE, LAYER_OUTPUT_SCALE, HEAD_SCALE = 100.0, 0.3, 20.0
SEQUENCES, SEQ_LENGTH = 16, 64
DOCUMENTS = [
    "The cat sat on the mat while the horse ate hay in the barn.",
    "An elephant never forgets, people say, though nobody asked the ox.",
    "Tigers hunt alone; moles dig tunnels under the garden all night long.",
    "A kangaroo carries its young in a pouch and hops across the plain.",
]


def structured_model(mode: str, planted: bool, seed: int = 0):
    """The 6-layer model of the module docstring, with or without the redundant block 3-5."""
    model = epas_model(groups=GROUPS, mode=mode, seed=seed, num_hidden_layers=LAYERS, vocab_size=VOCAB)
    embedding_half = HIDDEN // 2
    with torch.no_grad():
        model.model.embed_tokens.weight[:, embedding_half:] = 0
        model.model.embed_tokens.weight.mul_(EMBEDDING_SCALE)
        model.lm_head.weight[:, :embedding_half] = 0
        model.lm_head.weight.mul_(HEAD_SCALE)
        for layer in model.model.layers:
            for output in (layer.self_attn.o_proj, layer.mlp.down_proj):
                output.weight[:embedding_half] = 0
                output.weight.mul_(LAYER_OUTPUT_SCALE)
            for name in READ_FROM_EMBEDDING[mode]:
                getattr(layer.self_attn, name).weight[:, embedding_half:] = 0
        if planted:
            for index in BLOCK:
                before, layer = model.model.layers[index - 1], model.model.layers[index]
                layer.input_layernorm.weight.copy_(before.input_layernorm.weight)
                for name in READ_FROM_EMBEDDING[mode]:
                    getattr(layer.self_attn, name).weight.copy_(getattr(before.self_attn, name).weight)
    return model


@torch.no_grad()
def sampled_tokens(model, seed: int = 1) -> np.ndarray:
    """SEQUENCES sequences of SEQ_LENGTH tokens sampled from the model (with its cache), concatenated."""
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.zeros(SEQUENCES, SEQ_LENGTH, dtype=torch.long)
    sequences[:, 0] = torch.randint(0, VOCAB, (SEQUENCES,), generator=generator)
    cache = None
    for length in range(1, SEQ_LENGTH):
        output = model(sequences[:, length - 1:length], past_key_values=cache, use_cache=True)
        cache = cache_of(output)
        sequences[:, length] = torch.multinomial(output.logits[:, -1].softmax(-1), 1, generator=generator)[:, 0]
    return sequences.flatten().numpy()


def write_indexed(tokens: np.ndarray, prefix: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in np.split(tokens, SEQUENCES):
        builder.add_document(torch.from_numpy(document.astype(np.int64)), [len(document)])
    builder.finalize(f"{prefix}.idx")


def pairs_above(matrix, threshold: float) -> set[tuple[int, int]]:
    return {(i, j) for i, row in enumerate(matrix) for j, value in enumerate(row)
            if value is not None and value > threshold}


BLOCK_PAIRS = {(i, j) for i in range(BLOCK[0] - 1, LAYERS) for j in range(i + 1, LAYERS)}  # 2..5 among themselves


# ---- the planted block is found and recommended ------------------------------------------------------------


def check_block_found(found: dict, mode: str) -> None:
    """The copies (layers 2-5 among themselves) are alike and no other pair is; the recommendation is
    exactly the block, as an epas: section that the scheduler resolves to it."""
    assert pairs_above(found["pairs"]["cosine"], 0.5) == BLOCK_PAIRS
    assert all(found["pairs"]["cosine"][i][j] > 0.999 for i, j in BLOCK_PAIRS)
    low_error = {(i, j) for i, row in enumerate(found["pairs"]["attention_error"]) for j, value in enumerate(row)
                 if value is not None and value < 0.05}
    assert low_error == BLOCK_PAIRS
    chosen = found["recommendation"]
    assert chosen["layers"] == list(BLOCK) and chosen["sources"] == {"3": 2, "4": 2, "5": 2}
    assert abs(chosen["increase"]) < 0.01
    section = yaml.safe_load(found["snippet"])["epas"]
    assert section == {"mode": mode, "num_sharing_layers": 3, "num_blocks": 1, "include_last_layer": True}
    assert resolve_target_layers(LAYERS, EPASConfig(**section)) == BLOCK
    # one layer more (2-5) costs far beyond the budget: the block is where the redundancy ends
    by_layers = {tuple(region["layers"]): region for region in found["regions"]}
    assert by_layers[(2, 3, 4, 5)]["increase"] > 1.0
    assert [region["layers"] for region in found["neighbours"]] == [[4, 5], [2, 3, 4], [2, 3, 4, 5]]


def test_planted_qk_block_is_found_and_recommended(tmp_path, capsys):
    """Through the command line, in both modes: the copied Q/K weights make a qk block, not a kv one
    (the values are not copied)."""
    model = structured_model("qk", planted=True)
    tokens = sampled_tokens(model)
    model.save_pretrained(tmp_path / "planted_qk_block")
    write_indexed(tokens, tmp_path / "data")
    output = tmp_path / "out"
    status = main([str(tmp_path / "planted_qk_block"), "--data", str(tmp_path / "data"), "--mode", "both", "--tokens",
                   str(len(tokens)), "--seq-length", str(SEQ_LENGTH), "--output", str(output)])
    assert status == 0
    found = json.loads((output / "results.json").read_text())["modes"]
    check_block_found(found["qk"], "qk")
    assert found["kv"]["recommendation"] is None

    report = (output / "report.md").read_text()
    assert "**Recommended**: layers 3-5 (3 of 6)" in report and "num_sharing_layers: 3" in report
    assert "**No region within the budget**" in report  # kv
    assert imread(output / "sharing_analysis.png").shape[0] > 800  # a row of panels per mode
    assert "num_sharing_layers: 3" in capsys.readouterr().out


def test_planted_kv_block_is_found_and_recommended():
    model = structured_model("kv", planted=True)
    windows = token_windows(sampled_tokens(model), SEQ_LENGTH)
    found = analyze(model, windows, ("kv", "qk"), progress=False)["modes"]
    check_block_found(found["kv"], "kv")
    assert found["qk"]["recommendation"] is None


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_model_without_structure_gets_no_recommendation(mode):
    model = structured_model(mode, planted=False)
    windows = token_windows(sampled_tokens(model), SEQ_LENGTH)
    found = analyze(model, windows, (mode,), progress=False)["modes"][mode]
    assert found["recommendation"] is None and found["snippet"] is None and found["neighbours"] == []
    assert min(region["increase"] for region in found["regions"]) > 0.2
    assert pairs_above(found["pairs"]["cosine"], 0.5) == set()
    assert min(value for row in found["pairs"]["attention_error"] for value in row if value is not None) > 0.5


# ---- the statistics against a direct computation -------------------------------------------------------------


def direct_attention(queries, keys, values) -> torch.Tensor:
    """Causal softmax attention [heads, tokens, head_dim]; query head h reads key-value head h // (heads / groups)."""
    repeat = queries.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
    scores = queries @ keys.transpose(-1, -2) / HEAD_DIM**0.5
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1) @ values


@torch.no_grad()
def direct_statistics(model, windows) -> dict:
    """Per pair (i, j) and group: mean cosines and relative attention-output errors, window by window
    without padding, from tensors captured here."""
    captured = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda module, args, output: captured.__setitem__(module.layer_idx, output[1])) for layer in model.model.layers]
    per_group = HEADS // GROUPS
    cos = {name: torch.zeros(LAYERS, LAYERS, GROUPS, dtype=torch.float64) for name in ("queries", "keys", "values")}
    error = {mode: torch.zeros(LAYERS, LAYERS, GROUPS, dtype=torch.float64) for mode in ("qk", "kv")}
    norm = torch.zeros(LAYERS, GROUPS, dtype=torch.float64)
    tokens = 0
    for window in windows:
        model(window[None, :-1], use_cache=False)
        layers = {index: {name: getattr(shared, name)[0] for name in cos} for index, shared in captured.items()}
        own = {j: direct_attention(t["queries"], t["keys"], t["values"]) for j, t in layers.items()}
        tokens += len(window) - 1
        for j in range(LAYERS):
            for head in range(HEADS):
                norm[j, head // per_group] += own[j][head].pow(2).sum()
            for i in range(j):
                a, b = layers[i], layers[j]
                borrowed = {"qk": direct_attention(a["queries"], a["keys"], b["values"]),
                            "kv": direct_attention(b["queries"], a["keys"], a["values"])}
                for head in range(HEADS):
                    group = head // per_group
                    cosines = torch.cosine_similarity(a["queries"][head], b["queries"][head], -1)
                    cos["queries"][i, j, group] += cosines.sum()
                    for mode in error:
                        error[mode][i, j, group] += (borrowed[mode][head] - own[j][head]).pow(2).sum()
                for group in range(GROUPS):
                    for name in ("keys", "values"):
                        cos[name][i, j, group] += torch.cosine_similarity(a[name][group], b[name][group], -1).sum()
    for hook in hooks:
        hook.remove()
    cos["queries"] /= tokens * per_group
    cos["keys"] /= tokens
    cos["values"] /= tokens
    return {"cosine": cos, "error": {mode: (value / norm[None]).sqrt() for mode, value in error.items()},
            "total_error": {mode: (value.sum(-1) / norm.sum(-1)[None]).sqrt() for mode, value in error.items()}}


@torch.no_grad()
def shared_attention_error(model, layer: int, mode: str, windows) -> float:
    """The relative change of a layer's attention output (the input of o_proj) when the model itself runs
    it as a sharing layer (its source: the layer before), over the windows."""
    outputs = {}
    hook = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: outputs.__setitem__("attended", args[0]))
    model.config.sharing_mode = mode
    squared_error = squared_norm = 0.0
    for window in windows:
        model.set_sharing_layers([])
        model(window[None, :-1], use_cache=False)
        own = outputs["attended"]
        model.set_sharing_layers([layer])
        model(window[None, :-1], use_cache=False)
        squared_error += (outputs["attended"] - own).pow(2).sum().item()
        squared_norm += own.pow(2).sum().item()
    hook.remove()
    model.set_sharing_layers([])
    return (squared_error / squared_norm) ** 0.5


def test_pair_statistics_equal_a_direct_computation():
    model = epas_model(groups=GROUPS, seed=3, num_hidden_layers=LAYERS, vocab_size=VOCAB)
    tokens = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(2)).numpy()
    windows = token_windows(tokens, 16)  # 16, 16 and 8 inputs: the batch of 3 pads the last one
    statistics = pair_statistics(model, windows, batch_size=3, modes=("qk", "kv"), progress=False)
    direct = direct_statistics(model, windows)

    assert statistics.tokens == len(tokens) - 1
    upper = torch.ones(LAYERS, LAYERS, dtype=torch.bool).triu(1)
    for name, expected in direct["cosine"].items():
        assert torch.allclose(statistics.cosine(name)[upper], expected[upper], atol=1e-5), name
    for mode in ("qk", "kv"):
        assert torch.allclose(statistics.relative_error(mode)[upper], direct["error"][mode][upper], rtol=1e-4), mode
        assert torch.allclose(statistics.total_relative_error(mode)[upper], direct["total_error"][mode][upper],
                              rtol=1e-4)
        # the groups differ, so a head given to the wrong group would show
        per_group = statistics.relative_error(mode)[upper]
        assert (per_group[:, 0] - per_group[:, 1]).abs().min() > 1e-3
        # what the model itself does when a layer shares from the layer before it
        for layer in (1, 4):
            assert statistics.total_relative_error(mode)[layer - 1, layer].item() == pytest.approx(
                shared_attention_error(model, layer, mode, windows), rel=1e-4)
    # nothing is left hooked, and nothing but the sums is kept
    assert all(not layer.self_attn._forward_hooks for layer in model.model.layers)
    assert statistics.error_sums["qk"].shape == (LAYERS, LAYERS, GROUPS)


# ---- perplexities: the same numbers as tools/evaluate.py --------------------------------------------------------


def test_perplexities_equal_evaluate(tmp_path):
    """jsonl text for the analyzer, the same text preprocessed into .bin/.idx for tools/evaluate.py."""
    model = epas_model(groups=GROUPS, seed=0, num_hidden_layers=4, vocab_size=VOCAB)
    folder = tmp_path / "model"
    export(model, folder)
    train_tokenizer(DOCUMENTS, 300, folder)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    preprocess([tmp_path / "docs.jsonl"], tmp_path / "valid", folder, progress=False)
    kv_folder = tmp_path / "model_kv"
    shutil.copytree(folder, kv_folder)
    config = json.loads((kv_folder / "config.json").read_text())
    (kv_folder / "config.json").write_text(json.dumps({**config, "sharing_mode": "kv"}))

    common = ["--seq-length", "16", "--batch-size", "3", "--device", "cpu"]
    assert main([str(folder), "--data", str(tmp_path / "docs.jsonl"), "--mode", "both", "--tokens", "70",
                 "--output", str(tmp_path / "analysis"), *common]) == 0
    analysis = json.loads((tmp_path / "analysis" / "results.json").read_text())
    for mode, source in (("qk", folder), ("kv", kv_folder)):
        assert evaluate.main([str(source), "--valid-data", str(tmp_path / "valid"), "--valid-tokens", "70",
                              "--allow-untrained", "--sharing-lengths", "0,1,2,3", "--output",
                              str(tmp_path / f"evaluation_{mode}"), *common]) == 0
        runs = json.loads((tmp_path / f"evaluation_{mode}" / "results.json").read_text())["runs"]
        expected = {tuple(run["sharing_layers"]): run["validation"] for run in runs}
        measured = {tuple(region["layers"]): region for region in analysis["modes"][mode]["regions"]}
        assert analysis["baseline"] == expected[()]
        for layers in ((3,), (2, 3), (1, 2, 3)):
            assert measured[layers]["perplexity"] == expected[layers]["perplexity"], (mode, layers)
            assert measured[layers]["loss"] == expected[layers]["loss"]
        assert len({region["perplexity"] for region in measured.values()}) == len(measured)  # each set applied
    assert analysis["tokens"] == 69  # 70 tokens: every one but the first is predicted


# ---- regions and inputs ----------------------------------------------------------------------------------------


def test_candidates_are_the_regions_an_epas_section_asks_for():
    found = {(c.num_sharing_layers, c.num_blocks, c.include_last_layer): c.layers for c in candidates(6, 2)}
    assert found == {
        (1, 1, True): (5,), (2, 1, True): (4, 5), (3, 1, True): (3, 4, 5), (4, 1, True): (2, 3, 4, 5),
        (5, 1, True): (1, 2, 3, 4, 5),
        (1, 1, False): (4,), (2, 1, False): (3, 4), (3, 1, False): (2, 3, 4), (4, 1, False): (1, 2, 3, 4),
        (2, 2, True): (3, 5), (4, 2, True): (1, 2, 4, 5), (2, 2, False): (2, 4),
    }
    assert sources((1, 2, 4, 5)) == {1: 0, 2: 0, 4: 3, 5: 3}


@pytest.mark.parametrize("data, message", [
    ("missing.jsonl", "--data missing.jsonl not found"),
    ("missing", "--data missing: missing.bin and missing.idx not found"),
])
def test_bad_data_is_named(data, message, tmp_path, capsys, monkeypatch):
    epas_model(groups=GROUPS, num_hidden_layers=2).save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main([str(tmp_path / "model"), "--data", data]) != 0
    assert message in capsys.readouterr().err


def test_text_data_needs_a_tokenizer(tmp_path, capsys):
    epas_model(groups=GROUPS, num_hidden_layers=2).save_pretrained(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert main([str(tmp_path / "model"), "--data", str(tmp_path / "docs.jsonl")]) != 0
    assert "--tokenizer DIR" in capsys.readouterr().err


# ---- on a GPU (make test-gpu; EPAS_GPU_TESTS_DEVICE=cpu dry-runs them on the CPU at tiny shapes) ---------------

GPU_DEVICE = os.environ.get("EPAS_GPU_TESTS_DEVICE", "cuda")
needs_gpu = pytest.mark.skipif(GPU_DEVICE == "cuda" and not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (EPAS_GPU_TESTS_DEVICE=cpu dry-runs it)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_planted_block_is_found_in_bfloat16(mode):
    model = structured_model(mode, planted=True)
    windows = token_windows(sampled_tokens(model), SEQ_LENGTH)
    model = model.to(GPU_DEVICE, torch.bfloat16)
    found = analyze(model, windows, (mode,), progress=False)["modes"][mode]
    check_block_found(found, mode)


@pytest.mark.gpu
@needs_gpu
def test_tinyllama_shape_in_minutes_with_memory_bounded_by_the_batch():
    """A random TinyLlama-shaped model (22 layers, GQA 32/4) in bf16: both modes over 32k tokens, and the
    peak memory of 8k tokens and of 32k tokens the same (the hooks keep sums, not activations)."""
    from benchmarks.generate import random_model

    tiny = [] if GPU_DEVICE == "cuda" else ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
                                             "model.num_query_groups=2", "model.ffn_hidden_size=128",
                                             "model.vocab_size=512", "model.seq_length=64", "epas.num_sharing_layers=2"]
    torch.manual_seed(0)
    model = random_model(str(Path(__file__).parent.parent / "configs/tinyllama_1.1b.yaml"), tiny, torch.bfloat16,
                         GPU_DEVICE)
    seq_length = model.config.max_position_embeddings
    generator = np.random.default_rng(0)
    peaks, seconds = {}, {}
    many = 32 if GPU_DEVICE == "cuda" else 16
    for tokens, modes in ((8 * seq_length, ("qk",)), (many * seq_length, ("qk", "kv"))):
        windows = token_windows(generator.integers(0, model.config.vocab_size, tokens + 1), seq_length)
        if GPU_DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = analyze(model, windows, modes, batch_size=8, progress=False)
        seconds[tokens] = time.perf_counter() - started
        peaks[tokens] = torch.cuda.max_memory_allocated() if GPU_DEVICE == "cuda" else 0
        assert result["tokens"] == tokens and set(result["modes"]) == set(modes)
    print(f"\nanalyze_sharing {model.config.num_hidden_layers} layers: "
          + ", ".join(f"{tokens} tokens {seconds[tokens]:.1f} s peak {peaks[tokens] / 2**30:.2f} GiB"
                      for tokens in seconds))
    small, large = sorted(peaks)
    assert peaks[large] <= 1.05 * peaks[small] + 2**26
    assert seconds[large] < 600
