"""The rules of a sharing set, shared by the trainer, the scheduler, the FLOP model and the benchmarks.

``epas_hf`` keeps its own copy of these checks: it is copied into every export and must import nothing
from this recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args

SharingMode = Literal["qk", "kv"]  # "qk": reuse Q and K, compute V; "kv": reuse K and V, compute Q
MODES: tuple[str, ...] = get_args(SharingMode)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"sharing mode must be one of {MODES}, got {mode!r}")
    return mode


def check_sharing_layers(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Validate 0-based sharing-layer indices and return them sorted (layer 0 has no source)."""
    layers = tuple(sorted(set(layers)))
    if 0 in layers:
        raise ValueError("layer 0 cannot share: it has no preceding compute layer")
    outside = [i for i in layers if not 0 < i < num_layers]
    if outside:
        raise ValueError(f"sharing layers {outside} are outside the model's 0..{num_layers - 1}")
    return layers


def deepest_layers(num_layers: int, fraction: float) -> tuple[int, ...]:
    """The deepest ``round(fraction * num_layers)`` layers (halves round up), never layer 0."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sharing fraction must be in [0, 1], got {fraction}")
    count = min(math.floor(fraction * num_layers + 0.5), num_layers - 1)
    return tuple(range(num_layers - count, num_layers))
