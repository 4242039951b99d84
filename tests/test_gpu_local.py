"""One GPU, bf16, the local spec, with torch and megatron-core alone (no Transformer Engine, no apex).

Run on a machine with a GPU: ``pytest -m gpu tests/test_gpu_local.py``. Each test runs in a fresh
process, because the CPU tests switch on the CPU bridge for the whole pytest process.
``EPAS_GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU bridge (bf16 models, an fp32
training run) as a dry run of their logic on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_training import checkpointing, distributed
from megatron_patches.model import build_model, in_training_precision, transformer_config
from tests.model_utils import frobenius_error, lm_loss, load_weights, random_weights, reference_llama, tiny_run
from tests.multiprocess import run_workers
from tests.test_training import TINY, _scalars
from benchmarks.train import build_stock_model

DEVICE = os.environ.get("EPAS_GPU_TESTS_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (EPAS_GPU_TESTS_DEVICE=cpu dry-runs these tests on the CPU)",
    ),
]

BATCH, SEQ = 2, 64  # 16 < seq <= 4096: where megatron-core would pick apex's fused softmax in bf16
# bf16 against the fp32 reference on the bf16-rounded weights, as relative errors in the Frobenius
# norm. Measured on the CPU bridge: logits ~0.02, gradients up to 0.05 (norm weights). A shared
# query rotated twice (qk) or not at all (kv) gives logits 0.25 and gradients 0.6 or more; sharing
# itself moves the logits by 0.34 or more.
LOGITS_TOLERANCE = 0.06
GRAD_TOLERANCE = 0.12


def _start(device: str) -> None:
    """A world of one on ``device``, with cuBLAS and torch kept to deterministic kernels."""
    if device == "cuda":
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)
    run = tiny_run()
    run.device = device
    distributed.initialize(run)


def _gpu_model(mode: str, device: str, stock: bool = False):
    """A tiny model with the GPU configuration (bf16, the fused kernels this machine has), local spec,
    cast as the trainer casts it (the wrapper itself only converts inputs and outputs)."""
    run = tiny_run(mode)
    run.device, run.model.seq_length = "cuda", SEQ
    config = transformer_config(run)
    model = build_stock_model(run, config) if stock else build_model(run, config)
    return in_training_precision(model.to(device), config).module, run


def _batch(vocab: int, device: str):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    return tokens.to(device), labels.to(device)


# ---- EPAS at 0% against stock megatron-core -------------------------------------------------------


def _stock_worker(rank, device):
    _start(device)
    (epas, run), (stock, _) = _gpu_model("qk", device), _gpu_model("qk", device, stock=True)
    state = random_weights(epas)
    load_weights(epas, state)
    load_weights(stock, state)
    epas.set_sharing_layers([])
    tokens, labels = _batch(run.model.vocab_size, device)
    differences = {}
    for name, model in (("epas", epas), ("stock", stock)):
        positions = torch.arange(SEQ, device=device).expand_as(tokens)
        differences[name] = {"logits": model(tokens, positions, None).float()}
        lm_loss(model, tokens, labels).backward()
        differences[name].update((n, p.grad.float()) for n, p in model.named_parameters())
    dtypes = sorted({str(p.dtype) for p in [*epas.parameters(), *stock.parameters()]})
    distributed.shutdown()
    return dtypes, {n: (t - differences["stock"][n]).abs().max().item() for n, t in differences["epas"].items()}


def test_sharing_off_equals_stock_megatron_bitwise_in_bf16():
    """Same weights, same batch: logits and every gradient bit for bit (not only to bf16 rounding)."""
    ((dtypes, differences),) = run_workers(_stock_worker, 1, DEVICE)
    assert dtypes == ["torch.bfloat16"]
    assert {name: d for name, d in differences.items() if d != 0} == {}
    assert len(differences) > 20


# ---- sharing on against the fp32 reference --------------------------------------------------------

CASES = [("qk", (3, 4, 5)), ("kv", (3, 4, 5)), ("qk", (2, 3, 5)), ("kv", (2, 3, 5))]


def _sharing_worker(rank, device, cases):
    _start(device)
    results = []
    for mode, sharing in cases:
        model, run = _gpu_model(mode, device)
        load_weights(model, random_weights(model))
        rounded = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
        reference = reference_llama(run, rounded)  # fp32, on the weights the bf16 model holds
        tokens, labels = _batch(run.model.vocab_size, device)
        source_qkv = model.decoder.layers[sharing[0] - 1].self_attention.linear_qkv.weight

        model.set_sharing_layers(())
        lm_loss(model, tokens, labels).backward()
        source_grad_without_sharing = source_qkv.grad.float().cpu()
        model.zero_grad()
        model.set_sharing_layers(sharing)
        logits = model(tokens, torch.arange(SEQ, device=device).expand_as(tokens), None).float().cpu()
        F.cross_entropy(logits.flatten(0, 1), labels.cpu().flatten()).backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}

        expected = reference(tokens.cpu(), sharing_layers=sharing, mode=mode)
        F.cross_entropy(expected.flatten(0, 1), labels.cpu().flatten()).backward()
        expected_grads = reference.megatron_grads()
        source_name = f"decoder.layers.{sharing[0] - 1}.self_attention.linear_qkv.weight"
        grad_errors = {n: frobenius_error(g, expected_grads[n]) for n, g in grads.items()}
        worst = max(grad_errors, key=grad_errors.get)
        with torch.no_grad():
            no_sharing = reference(tokens.cpu())
        results.append({
            "case": (mode, sharing),
            "logits_error": frobenius_error(logits.detach(), expected.detach()),
            "sharing_effect": frobenius_error(no_sharing, expected.detach()),
            "grad_error": (worst, grad_errors[worst]),
            "source_grad_error": grad_errors[source_name],
            "source_grad_without_sharing": frobenius_error(source_grad_without_sharing, expected_grads[source_name]),
        })
    distributed.shutdown()
    return results


def test_sharing_matches_fp32_reference_within_bf16_tolerance():
    (results,) = run_workers(_sharing_worker, 1, DEVICE, CASES)
    for result in results:
        print(result)  # the measured errors, for the tolerance's record
        assert result["logits_error"] < LOGITS_TOLERANCE, result
        assert result["grad_error"][1] < GRAD_TOLERANCE, result
        # teeth: sharing moves the logits far more than bf16 does
        assert result["sharing_effect"] > 4 * LOGITS_TOLERANCE, result
        # the source layer's Q/K (or K/V) rows get the sharing layers' gradient: without it the
        # source gradient is far from the reference's
        assert result["source_grad_error"] < GRAD_TOLERANCE, result
        assert result["source_grad_without_sharing"] > 3 * GRAD_TOLERANCE, result


# ---- pretrain_epas.py: 20 steps with the region growing, save, resume -----------------------------


def _pretrain(tmp: Path, name: str, *overrides: str) -> str:
    args = [
        f"device={DEVICE}", "spec=local", "data.mock=true", "data.micro_batch_size=2",
        "data.global_batch_size=8", f"data.cache_dir={tmp / 'cache'}", "training.train_steps=20",
        "training.log_interval=1", "training.eval_interval=0", "optimizer.warmup_steps=2",
        "epas.interval=5", f"checkpoint.dir={tmp / name / 'ckpt'}",
        f"logging.tensorboard_dir={tmp / name / 'tb'}", *overrides,
    ]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_epas.py"), "--config", TINY, *args],
        capture_output=True, text=True, cwd=tmp, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fused kernels: " in result.stdout
    return result.stdout


def test_pretrain_resumes_with_the_same_losses_across_a_region_change(tmp_path):
    _pretrain(tmp_path, "straight", "profiling.start_step=8", "profiling.num_steps=2", "profiling.memory_snapshot=true")
    # on the GPU the first half also opens Nsight Systems' capture range (no nsys attached: the calls and the
    # NVTX ranges run, nothing records them) over iterations 4 and 5, which must not change a loss
    nsys = ["profiling.tool=nsys", "profiling.start_step=4", "profiling.num_steps=2"] if DEVICE == "cuda" else []
    first_half = _pretrain(tmp_path, "halves", "training.exit_interval=10", *nsys)
    assert ("Nsight Systems captured iterations 4-5" in first_half) == bool(nsys), first_half[-3000:]
    assert checkpointing.latest_iteration(tmp_path / "halves" / "ckpt") == 10
    _pretrain(tmp_path, "halves")

    expected = _scalars(tmp_path / "straight" / "tb", "train/loss")
    resumed = _scalars(tmp_path / "halves" / "tb", "train/loss")
    assert sorted(expected) == list(range(1, 21))
    assert resumed == expected  # bit for bit, steps 1-10 before and 11-20 after the resume
    sharing = _scalars(tmp_path / "halves" / "tb", "epas/num_sharing_layers")
    assert [sharing[s] for s in (5, 6, 10, 11, 16, 20)] == [0, 1, 1, 2, 3, 3]  # grows after 5, 10, 15
    assert expected[20] < expected[1]

    # the profiled iterations 8 and 9 (one sharing layer, four micro-batches each): EPAS ranges, the GPU kernels
    # they launch, and every allocation of the window
    profile = tmp_path / "straight" / "tb" / "profile"
    trace = json.loads((profile / "rank0.8.pt.trace.json").read_text())["traceEvents"]
    work = ("epas/publish_shared", "epas/take_shared", "epas/project_v_only", "epas/context_from_shared_probabilities")
    ranges = [event["name"] for event in trace if event.get("cat") == "user_annotation"]  # CPU side
    assert {name: ranges.count(name) for name in work} == {name: 8 for name in work}
    if DEVICE == "cuda":
        assert any(event.get("cat") == "kernel" for event in trace)
        snapshot = pickle.loads((profile / "rank0.8.memory_snapshot.pickle").read_bytes())
        assert snapshot["segments"] and any(snapshot["device_traces"])
