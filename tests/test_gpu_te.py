"""Transformer Engine spec on a GPU: EPAS with TE modules equals EPAS with the local spec.

Run on a machine with a GPU and Transformer Engine (``make test-gpu``); skipped without TE. Each
test runs in a fresh process because the CPU tests switch on the CPU bridge for the whole pytest
process.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_training import distributed
from megatron_patches.model import build_model, transformer_config
from tests.model_utils import load_weights, random_weights, relative_error, tiny_run
from tests.multiprocess import run_workers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None,
        reason="needs Transformer Engine for spec 'te' (the local-spec GPU tests are in test_gpu_local.py)",
    ),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

# TE fuses each pre-norm into the following column-parallel linear.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _to_te_name(name: str) -> str:
    for local, te in TE_NAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def _fp32_model(mode: str, spec: str):
    run = tiny_run(mode)
    run.device, run.spec = "cuda", spec
    config = transformer_config(run)
    config.bf16, config.params_dtype = False, torch.float32
    return build_model(run, config=config).cuda()


def _te_worker(rank, cases):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run = tiny_run()
    run.device = "cuda"
    distributed.initialize(run)
    results = []
    for mode, sharing in cases:
        local, te = _fp32_model(mode, "local"), _fp32_model(mode, "te")
        state = random_weights(local)
        load_weights(local, state)
        load_weights(te, {_to_te_name(name): t for name, t in state.items()})
        tokens = torch.randint(0, 256, (2, 16), device="cuda")
        positions = torch.arange(16, device="cuda").expand_as(tokens)
        outputs = {}
        for name, model in (("local", local), ("te", te)):
            model.set_sharing_layers(sharing)
            logits = model(tokens, positions, None)
            logits.float().square().mean().backward()
            grads = {_to_te_name(n): p.grad.float().cpu() for n, p in model.named_parameters()}
            outputs[name] = (logits.float().cpu(), grads)
        grad_error = max(
            relative_error(outputs["te"][1][n], g) for n, g in outputs["local"][1].items()
        )
        results.append((mode, relative_error(outputs["te"][0], outputs["local"][0]), grad_error))
    distributed.shutdown()
    return results


def test_te_spec_matches_local_spec_with_sharing():
    cases = [("qk", (3, 4, 5)), ("kv", (3, 4, 5)), ("qk", (2, 3, 5))]
    (results,) = run_workers(_te_worker, 1, cases)
    for mode, logits_error, grad_error in results:
        assert logits_error < 1e-4, (mode, logits_error)
        assert grad_error < 1e-3, (mode, grad_error)
