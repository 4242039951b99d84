"""benchmarks/generate.py (and its device script) on tiny CPU models.

The records are checked against their definitions (medians, gains, the cache layout, which
transformers' own DynamicCache confirms for the LLaMA row), the LLaMA anchor against EPAS at 0%
(same weights, same tokens), the path against megatron-core: it must run without it, and --model
against the folder's code: an export runs with the installed classes, other code only when trusted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import generate
from benchmarks import __main__ as benchmark
from benchmarks import plot as plot_benchmark
from epas_hf import foreign_code, write_model_files

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")  # 6 layers, 2 KV heads of 32 dims, trained region 3..5
LAYERS, BATCH, PROMPT, NEW = 6, 2, 8, 4
LABELS = ["llama", "epas 0%", "qk 25%", "qk 50%", "kv 25%", "kv 50%"]
SHARED = {"llama": 0, "epas 0%": 0, "qk 25%": 2, "qk 50%": 3, "kv 25%": 2, "kv 50%": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(json_path: Path, *extra: str) -> int:
    return generate.main([
        "--random-init", TINY, "--sharing", "0.25,0.5", "--batch", str(BATCH), "--prompt", str(PROMPT),
        "--new-tokens", str(NEW), "--warmup", "1", "--rounds", "2", "--device", "cpu",
        "--json", str(json_path), *extra,
    ])


@pytest.fixture(scope="module")
def generate_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "generate.json"
    assert _generate(path) == 0
    return path


def test_records_and_cache_bytes(generate_json):
    result = json.loads(generate_json.read_text())
    records = {r["label"]: r for r in result["records"]}
    assert list(records) == LABELS and result["complete"] and result["skipped"] == []
    llama_tensor = BATCH * 2 * 32 * (PROMPT + NEW - 1) * 4  # one layer's K (or V), float32
    for label, r in records.items():
        shared, mode = SHARED[label], r["mode"] or "qk"
        assert len(r["sharing_layers"]) == shared and r["model"] == ("llama" if label == "llama" else "epas")
        held = 2 * LAYERS - shared if mode == "qk" else 2 * (LAYERS - shared)  # qk keeps V, kv nothing
        assert r["cache_bytes"] == r["predicted_cache_bytes"] == held * llama_tensor
        assert r["cache_fraction"] == pytest.approx(held / (2 * LAYERS))
        assert r["decode_tokens_per_s"] == pytest.approx(BATCH * (NEW - 1) / r["decode_s"])
        assert r["decode_s"] == statistics.median(r["decode_times_s"]) and len(r["decode_times_s"]) == 2
        assert r["decode_gain"] == pytest.approx(records["epas 0%"]["decode_s"] / r["decode_s"] - 1)
        assert r["prefill_s"] > 0 and r["peak_memory_bytes"] is None  # no GPU here
    assert records["qk 50%"]["sharing_layers"] == records["kv 50%"]["sharing_layers"] == [3, 4, 5]
    model = generate.random_model(TINY, [], torch.float32, "meta")
    for r in records.values():
        assert r["step_bytes"] == counted_step_bytes(model, r, records["llama"]["cache_bytes"]), r["label"]
        assert r["memory_bound_gain"] == pytest.approx(records["epas 0%"]["step_bytes"] / r["step_bytes"] - 1)
    (anchor,) = result["summary"]["epas_at_0_vs_llama"]
    assert anchor["decode_vs_llama"] == pytest.approx(
        records["epas 0%"]["decode_tokens_per_s"] / records["llama"]["decode_tokens_per_s"] - 1
    )
    assert result["summary"]["cache_bytes_as_predicted"] is True
    assert result["settings"]["trained_sharing_layers"] == [3, 4, 5] and result["settings"]["modes"] == ["qk", "kv"]
    assert "random init" in result["metadata"]["model"]
    assert result["metadata"]["command"].startswith("python -m benchmarks.generate --random-init")


def counted_step_bytes(model, record: dict, llama_cache_bytes: int) -> int:
    """What a decode step reads, counted on the model's modules: every decoder weight but the projections the
    sharing layers skip, the final norm and the LM head (float32); the cache held in qk mode (a sharer reads its own
    V), a full LLaMA cache in kv mode (a sharer reads its source's K and V again)."""
    mode = record["mode"] or "qk"
    skipped = ("q_proj", "k_proj") if mode == "qk" else ("k_proj", "v_proj")
    weights = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    weights += model.lm_head.weight.numel()
    weights -= sum(getattr(model.model.layers[i].self_attn, name).weight.numel()
                   for i in record["sharing_layers"] for name in skipped)
    return 4 * weights + (record["cache_bytes"] if mode == "qk" else llama_cache_bytes)


def test_static_cache_rows_replay_their_steps_with_the_predicted_cache(tmp_path):
    """--cache static: the same rows and checks through GraphedGreedy (eager steps on the CPU); the preallocated
    caches hold exactly the prompt and the new tokens fed back, so the prediction is the dynamic one."""
    path = tmp_path / "static.json"
    assert _generate(path, "--cache", "static", "--rounds", "1") == 0
    result = json.loads(path.read_text())
    assert result["settings"]["cache"] == "static" and result["summary"]["cache_bytes_as_predicted"] is True
    records = {r["label"]: r for r in result["records"]}
    assert list(records) == LABELS
    for r in records.values():
        assert r["cache_bytes"] == r["predicted_cache_bytes"] and r["decode_s"] > 0 and r["prefill_s"] > 0
    assert records["qk 50%"]["memory_bound_gain"] > records["qk 25%"]["memory_bound_gain"] > 0


def test_llama_anchor_is_the_same_model_as_epas_at_zero():
    model = generate.random_model(TINY, [], torch.float32, "cpu").eval()
    llama = generate.llama_twin(model)
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config._attn_implementation == "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.allclose(llama(ids).logits, expected, rtol=1e-5, atol=1e-5)
        model.set_sharing_layers([4, 5])  # and not an accident of the inputs
        assert not torch.allclose(model(ids).logits, expected, rtol=1e-3, atol=1e-3)


def test_refuses_untrained_layers_unless_allowed(tmp_path, capsys):
    path = tmp_path / "untrained.json"
    assert _generate(path, "--sharing", "0.67", "--no-anchor") == 2
    assert "--allow-untrained" in capsys.readouterr().err and not path.exists()
    assert _generate(path, "--sharing", "0.67", "--allow-untrained", "--rounds", "1", "--mode", "kv",
                     "--no-anchor") == 0
    labels = [(r["label"], r["sharing_layers"]) for r in json.loads(path.read_text())["records"]]
    assert labels == [("epas 0%", []), ("kv 67%", [2, 3, 4, 5])]


def test_time_budget_keeps_the_first_case_and_skips_the_rest(tmp_path):
    path = tmp_path / "budget.json"
    assert _generate(path, "--prompt", "8,6", "--time-budget", "0", "--rounds", "1", "--no-anchor") == 0
    result = json.loads(path.read_text())
    assert {r["prompt"] for r in result["records"]} == {8} and result["skipped"] == [{"batch": 2, "prompt": 6}]


def test_tools_benchmark_generate_is_the_same_command(tmp_path):
    path = tmp_path / "via_tools.json"
    assert benchmark.main(["generate", "--random-init", TINY, "--sharing", "0.5", "--mode", "qk", "--batch", "1",
                           "--prompt", "4", "--new-tokens", "2", "--warmup", "0", "--rounds", "1",
                           "--device", "cpu", "--json", str(path)], prog="tools/benchmark.py") == 0
    result = json.loads(path.read_text())
    assert [r["label"] for r in result["records"]] == ["llama", "epas 0%", "qk 50%"]
    assert result["metadata"]["command"].startswith("python tools/benchmark.py generate")


@pytest.mark.slow
def test_device_script_dry_run_needs_no_megatron(tmp_path):
    """The device script at tiny CPU shapes, with every import of megatron made to fail."""
    poison = tmp_path / "poison" / "megatron"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('megatron-core must not be needed to decode')\n")
    env = {**os.environ, "EPAS_GENERATE_DRY_RUN": "1", "PYTHON": sys.executable,
           "PYTHONPATH": str(poison.parent), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "tools" / "gpu_check_generate.sh"), str(out)], env=env, check=True,
                   capture_output=True, text=True)
    for name in ("llama_125m", "tinyllama_1.1b", "llama_125m_static", "tinyllama_1.1b_static"):
        result = json.loads((out / f"generate_{name}.json").read_text())
        assert result["complete"] and result["summary"]["cache_bytes_as_predicted"] and result["records"]
        assert result["settings"]["cache"] == ("static" if name.endswith("static") else "dynamic")
        assert result["metadata"]["megatron_core"] is not None  # installed here, yet never imported
    log = (out / "generate.log").read_text()
    assert "cache bytes equal the prediction" in log
    # the measurements never made on a GPU come first; an outer time limit cuts the generate() rows
    steps = ["== tinyllama_1.1b, static cache", "== generate() compiling a static cache", "== llama_125m, dynamic cache"]
    positions = [log.index(step) for step in steps]
    assert positions == sorted(positions)
    for cache in ("static", "dynamic"):
        profile = (out / f"profile_generate_125m_{cache}.txt").read_text()
        assert f"{cache} cache" in profile and profile.count("median decode step") == 3
    tests = (out / "static_cache_tests.xml").read_text()  # generate() compiling a static cache, megatron-free
    assert 'tests="2"' in tests and 'failures="0"' in tests and 'errors="0"' in tests and 'skipped="0"' in tests


def test_plot_is_written(generate_json, tmp_path):
    assert plot_benchmark.main([str(generate_json), "--output", str(tmp_path / "generate.png")]) == 0
    assert (tmp_path / "generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_like = tmp_path / "train.json"
    train_like.write_text(json.dumps({"benchmark": "train", "records": []}))
    assert plot_benchmark.main([str(train_like), str(generate_json), "--output", str(tmp_path / "mixed.png")]) == 2
    assert not (tmp_path / "mixed.png").exists()


# ---- --model: the folder's code runs only when trusted ---------------------------------------------


def _export(folder: Path, model_type: str | None = None, appended: str = "") -> Path:
    """A tiny export as megatron-to-hf writes it (weights, the model files, their auto_map), optionally with
    another model_type in its config.json or code appended to its modeling file, as an altered folder holds."""
    generate.random_model(TINY, [], torch.float32, "cpu").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = write_model_files(folder)
    config["model_type"] = model_type or config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with (folder / "modeling_epas_llama.py").open("a") as stream:
        stream.write(appended)
    return folder


def _generate_model(folder: Path, json_path: Path, *extra: str) -> list[str]:
    return ["--model", str(folder), "--sharing", "0.5", "--mode", "kv", "--batch", "1", "--prompt", "6",
            "--new-tokens", "3", "--warmup", "0", "--rounds", "1", "--device", "cpu", "--json", str(json_path), *extra]


def test_an_export_runs_on_the_installed_code_with_the_cache_predicted(tmp_path):
    folder = _export(tmp_path / "own_export")
    assert foreign_code(folder) == []
    assert generate.main(_generate_model(folder, tmp_path / "own.json")) == 0
    result = json.loads((tmp_path / "own.json").read_text())
    assert result["settings"]["model_code"] == "epas_hf.modeling_epas_llama"
    assert result["summary"]["cache_bytes_as_predicted"] and len(result["records"]) == 3
    assert not [name for name in sys.modules if name.startswith("transformers_modules") and folder.name in name]


def test_a_plain_llama_folder_runs_on_the_installed_code(tmp_path):
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    assert generate.main(_generate_model(folder, tmp_path / "llama.json", "--allow-untrained")) == 0
    assert json.loads((tmp_path / "llama.json").read_text())["settings"]["model_code"] == "epas_hf.modeling_epas_llama"


@pytest.mark.parametrize("model_type", ["epas_llama", "altered_llama"])
def test_a_folder_with_other_code_runs_none_of_it_unless_trusted(tmp_path, capsys, model_type):
    """Code appended to an export's model file: transformers runs it under trust_remote_code (with any
    version for a model type it does not know, with 4.x for this one too), so the benchmark refuses the
    folder unless told to trust it."""
    marker = tmp_path / "ran"
    folder = _export(tmp_path / f"altered_{model_type}", model_type, f"\nopen({str(marker)!r}, 'w').close()\n")
    assert foreign_code(folder) == ["modeling_epas_llama.py"]
    assert generate.main(_generate_model(folder, tmp_path / "refused.json")) == 2
    error = capsys.readouterr().err
    assert "modeling_epas_llama.py" in error and "--trust-remote-code" in error
    assert not marker.exists() and not (tmp_path / "refused.json").exists()


def test_trust_remote_code_runs_the_folders_code(tmp_path):
    """In a process of its own: transformers registers the folder's classes as it loads them."""
    marker = tmp_path / "ran"
    folder = _export(tmp_path / "trusted_export", "altered_llama", f"\nopen({str(marker)!r}, 'w').close()\n")
    command = [sys.executable, "-m", "benchmarks.generate", *_generate_model(folder, tmp_path / "t.json"),
               "--trust-remote-code"]
    subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    assert marker.exists()
    assert json.loads((tmp_path / "t.json").read_text())["settings"]["model_code"].startswith("transformers_modules")


def test_foreign_code_names_other_files_and_auto_map_entries(tmp_path):
    folder = _export(tmp_path / "export")
    (folder / "helpers.py").write_text("")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "someone/repo--modeling.Model"
    (folder / "config.json").write_text(json.dumps(config))
    assert foreign_code(folder) == ["helpers.py", "auto_map AutoModelForCausalLM=someone/repo--modeling.Model"]
