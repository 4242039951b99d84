"""Which of megatron-core's fused kernels a run switches on: each only where its implementation is importable.

megatron-core takes the fusion flags of ``TransformerConfig`` at their word: RoPE fusion without
Transformer Engine raises at start-up, the masked-softmax fusion without apex's extension fails at
the first bf16 forward with 16 < seq <= 4096, and ``persist_layer_norm`` asserts in the local
spec's torch norm. So each flag follows what this process can import, and the choice is printed
and recorded with the run.
"""

from __future__ import annotations

import importlib
import os
import shutil

# The five TransformerConfig flags decided here, each with why it would be off on a GPU.
OFF_BECAUSE = {
    "bias_activation_fusion": "needs torch.compile with triton and a C compiler",
    "bias_dropout_fusion": "needs torch.compile with triton and a C compiler",
    "masked_softmax_fusion": "needs apex's scaled_masked_softmax_cuda and scaled_upper_triang_masked_softmax_cuda",
    "apply_rope_fusion": "needs Transformer Engine >= 1.4",
    "persist_layer_norm": "only apex's LayerNorm reads it; these models use RMSNorm",
}


def _importable(*modules: str) -> bool:
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def available_kernels() -> dict[str, bool]:
    """What this process can run, probed the way megatron-core and torch will look for it."""
    from megatron.core.models.common.embeddings import rope_utils

    # triton builds its launchers with $CC, gcc or clang at the first compiled kernel
    has_c_compiler = bool(os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"))
    return {
        "torch_compile": _importable("triton") and has_c_compiler,
        "apex_softmax": _importable("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
        "te_rope": rope_utils.fused_apply_rotary_pos_emb is not None,  # TransformerConfig's own test
    }


def choose_fusions(device: str, available: dict[str, bool] | None = None) -> dict[str, bool]:
    """The fusion flags of a ``TransformerConfig`` on ``device``, given :func:`available_kernels`.

    All are off on the CPU (the kernels are CUDA-only). ``persist_layer_norm`` is always off:
    only apex's ``FusedLayerNorm`` reads it, and that module is LayerNorm-only.
    """
    if device == "cpu":
        return dict.fromkeys(OFF_BECAUSE, False)
    available = available_kernels() if available is None else available
    return {
        "bias_activation_fusion": available["torch_compile"],
        "bias_dropout_fusion": available["torch_compile"],
        "masked_softmax_fusion": available["apex_softmax"],
        "apply_rope_fusion": available["te_rope"],
        "persist_layer_norm": False,
    }


def describe(fusions: dict[str, bool], device: str) -> str:
    """One line for the start-up log: each flag, and for one that is off, what it would need."""
    if device == "cpu":
        return "fused kernels: all off on the CPU"
    parts = [f"{name} on" if on else f"{name} off ({OFF_BECAUSE[name]})" for name, on in fusions.items()]
    return "fused kernels: " + "; ".join(parts)


def fusions_of(config) -> dict[str, bool]:
    """The fusion flags a built ``TransformerConfig`` carries (what the run really uses)."""
    return {name: getattr(config, name) for name in OFF_BECAUSE}
