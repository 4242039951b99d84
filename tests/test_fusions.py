"""Fused kernels follow what is importable: a GPU run without Transformer Engine or apex builds and runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_patches import fusions
from megatron_patches.fusions import OFF_BECAUSE, available_kernels, choose_fusions, describe, fusions_of
from megatron_patches.model import build_model, in_training_precision, transformer_config
from tests.model_utils import tiny_run

NOTHING = {"torch_compile": False, "apex_softmax": False, "te_rope": False}
EVERYTHING = dict.fromkeys(NOTHING, True)


def test_cpu_runs_no_fused_kernel_even_where_all_are_importable():
    assert choose_fusions("cpu", EVERYTHING) == dict.fromkeys(OFF_BECAUSE, False)


@pytest.mark.parametrize(
    "kernel, flags",
    [
        ("torch_compile", {"bias_activation_fusion", "bias_dropout_fusion"}),
        ("apex_softmax", {"masked_softmax_fusion"}),
        ("te_rope", {"apply_rope_fusion"}),
    ],
)
def test_each_gpu_fusion_follows_its_own_kernel(kernel, flags):
    only = choose_fusions("cuda", {**NOTHING, kernel: True})
    assert {name for name, on in only.items() if on} == flags
    all_but = choose_fusions("cuda", {**EVERYTHING, kernel: False})
    assert {name for name, on in all_but.items() if not on} == flags | {"persist_layer_norm"}


def test_persist_layer_norm_is_never_chosen():
    """Only apex's LayerNorm reads it, and torch's RMSNorm (the local spec) asserts on it."""
    assert not choose_fusions("cuda", EVERYTHING)["persist_layer_norm"]


def _fake_module(name: str) -> types.ModuleType:
    return types.ModuleType(name)


@pytest.mark.parametrize("present", [True, False])
def test_probe_sees_faked_imports(monkeypatch, present):
    from megatron.core.models.common.embeddings import rope_utils

    for name in ("triton", "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"):
        monkeypatch.setitem(sys.modules, name, _fake_module(name) if present else None)  # None: ImportError
    monkeypatch.setenv("CC", "gcc")
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", (lambda *a: None) if present else None)
    assert available_kernels() == dict.fromkeys(NOTHING, present)


def test_probe_needs_both_apex_softmax_kernels_and_a_c_compiler(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", _fake_module("triton"))
    monkeypatch.setitem(sys.modules, "scaled_masked_softmax_cuda", _fake_module("scaled_masked_softmax_cuda"))
    monkeypatch.setitem(sys.modules, "scaled_upper_triang_masked_softmax_cuda", None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(fusions.shutil, "which", lambda name: None)
    kernels = available_kernels()
    assert not kernels["apex_softmax"] and not kernels["torch_compile"]


def test_describe_names_what_a_missing_fusion_needs():
    line = describe(choose_fusions("cuda", {**EVERYTHING, "te_rope": False}), "cuda")
    assert "bias_activation_fusion on" in line
    assert "apply_rope_fusion off (needs Transformer Engine >= 1.4)" in line
    assert describe(choose_fusions("cpu"), "cpu") == "fused kernels: all off on the CPU"


@pytest.mark.usefixtures("megatron_cpu", "one_thread")
def test_gpu_config_without_te_or_apex_builds_and_runs_a_bf16_forward(monkeypatch):
    """The GPU configuration on a machine with neither: megatron-core would raise at start-up for
    RoPE fusion, assert in the torch norm for persist_layer_norm, and fail at the first bf16
    forward with 16 < seq <= 4096 for the masked-softmax fusion (run here on the CPU bridge)."""
    monkeypatch.setattr(fusions, "available_kernels", lambda: NOTHING)
    run = tiny_run()
    run.device = "cuda"
    config = transformer_config(run)
    model = in_training_precision(build_model(run, config), config)
    # every parameter in bf16, the local spec's torch norms included: the mixed-precision optimizer
    # maps (and checkpoints) only half-precision parameters
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 256, (2, 32))
    logits = model.module(tokens, torch.arange(32).expand_as(tokens), None)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    loss = model(tokens, torch.arange(32).expand_as(tokens), None, labels=tokens)
    assert loss.dtype == torch.float32
    assert fusions_of(config) == dict.fromkeys(OFF_BECAUSE, False)
