"""benchmarks.train (tools/benchmark.py train) and benchmarks.plot on tiny CPU models (generate: test_generate_benchmark.py).

The numbers are checked against their definitions (medians, gains, the FLOP model, the cache
layout), the stock model against EPAS at 0% (the basis of the overhead figure), and the
figures are written.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.attention import SelfAttention

from epas.config import load_config
from epas.flops import training_flops_per_token
from megatron_patches.model import build_model, transformer_config
from tests.model_utils import lm_loss, load_weights, random_weights, tiny_run
from tests.multiprocess import run_workers
from benchmarks import __main__ as benchmark
from benchmarks import plot as plot_benchmark
from benchmarks.train import build_stock_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
ROUNDS, MICRO_BATCH = 2, 2
LABELS = ["stock", "qk 0%", "qk 50%", "kv 0%", "kv 50%"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # multi-process or end-to-end


def _train_worker(rank, json_path):
    """A fresh process: the benchmark starts and ends megatron-core's parallel state itself."""
    torch.set_num_threads(1)
    return benchmark.main([
        "train", "--config", TINY, "--sharing", "0.5", "--mode", "qk,kv", "--warmup", "1",
        "--rounds", str(ROUNDS), "--micro-batch", str(MICRO_BATCH), "--peak-tflops", "0.5",
        "--json", str(json_path), "data.mock=true",
    ], prog="tools/benchmark.py")


@pytest.fixture(scope="module")
def train_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "train.json"
    assert run_workers(_train_worker, 1, path) == [0]
    return path


# ---- train ----------------------------------------------------------------------------------------


def test_train_records(train_json):
    result = json.loads(train_json.read_text())
    records = {r["label"]: r for r in result["records"]}
    assert list(records) == LABELS
    run = load_config(TINY)
    tokens = MICRO_BATCH * run.model.seq_length
    for label, r in records.items():
        assert len(r["step_times_s"]) == ROUNDS and r["step_time_s"] == statistics.median(r["step_times_s"])
        assert r["step_time_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_time_s"])
        expected_flops = training_flops_per_token(
            run.model, r["sharing_layers"], r["mode"] or "qk", causal=False, reuses_probabilities=True
        )
        assert r["flops_per_token"] == expected_flops
        assert r["tflops_per_s"] == pytest.approx(r["tokens_per_s"] * expected_flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 0.5)
    for mode in ("qk", "kv"):
        base, shared = records[f"{mode} 0%"], records[f"{mode} 50%"]
        assert base["sharing_layers"] == [] and shared["sharing_layers"] == [3, 4, 5]
        assert base["measured_gain"] == 0 and base["predicted_gain"] == 0 and base["ratio"] is None
        assert shared["predicted_gain"] == pytest.approx(base["flops_per_token"] / shared["flops_per_token"] - 1)
        assert shared["predicted_gain"] > 0.03  # 3 of 6 layers skip Q+K (qk) or K+V (kv) projections
        assert shared["measured_gain"] == pytest.approx(base["step_time_s"] / shared["step_time_s"] - 1)
        assert shared["ratio"] == pytest.approx(shared["measured_gain"] / shared["predicted_gain"])
        assert result["summary"]["epas_overhead_vs_stock"][mode] == pytest.approx(
            base["step_time_s"] / records["stock"]["step_time_s"] - 1
        )
    assert records["stock"]["model"] == "stock" and records["stock"]["predicted_gain"] is None
    metadata = result["metadata"]
    assert metadata["torch"] == torch.__version__ and metadata["megatron_core"] == "0.16.1"
    assert metadata["command"].startswith("python tools/benchmark.py train --config")
    assert metadata["device"] and "6 layers" in metadata["model"]
    assert result["settings"]["dtype"] == "float32" and result["settings"]["spec"] == "local"


def test_train_stock_loss_equals_epas_at_zero(train_json):
    result = json.loads(train_json.read_text())
    loss = {r["label"]: r["loss"] for r in result["records"]}
    assert loss["stock"] == loss["qk 0%"] == loss["kv 0%"]
    assert result["summary"]["loss_equal_to_stock"] == {"qk": True, "kv": True}
    # sharing changes the computation, so equality at 0% is not an accident of the inputs
    assert loss["qk 50%"] != loss["stock"] and loss["kv 50%"] != loss["stock"]


@pytest.mark.usefixtures("megatron_cpu")
def test_stock_model_is_plain_megatron_with_the_same_loss():
    run = tiny_run("kv")
    run.model.rotary_base, run.model.tie_embeddings = 500000.0, True  # not megatron-core's defaults
    epas, stock = build_model(run), build_stock_model(run, transformer_config(run))
    assert type(stock) is GPTModel
    assert all(type(layer.self_attention) is SelfAttention for layer in stock.decoder.layers)
    load_weights(epas, random_weights(epas))
    stock.load_state_dict(epas.state_dict())
    tokens = torch.randint(0, run.model.vocab_size, (2, run.model.seq_length), generator=torch.Generator().manual_seed(3))
    epas.set_sharing_layers([])
    assert torch.equal(lm_loss(stock, tokens, tokens), lm_loss(epas, tokens, tokens))
    epas.set_sharing_layers([4, 5])
    assert not torch.equal(lm_loss(stock, tokens, tokens), lm_loss(epas, tokens, tokens))


# ---- plots ----------------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert height > 300 and width > 500


def test_train_plot_is_written(train_json, tmp_path):
    assert plot_benchmark.main([str(train_json), "--output", str(tmp_path / "train.png")]) == 0
    _assert_png(tmp_path / "train.png")
