"""The sharing regions an ``epas:`` section can ask for, their measured cost, and the one to recommend.

A candidate is what the scheduler would train towards for ``num_sharing_layers`` N in ``num_blocks``
blocks (``block_gap`` 1) with or without the last layer: its layers come from
``epas.scheduler.resolve_target_layers`` itself, so the recommended snippet means exactly the layers
that were measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from epas.config import EPASConfig
from epas.errors import ConfigError
from epas.scheduler import resolve_target_layers

BLOCK_GAP = 1


@dataclass(frozen=True)
class Candidate:
    """One sharing region in the terms of an ``epas:`` section."""

    num_sharing_layers: int
    num_blocks: int
    include_last_layer: bool
    layers: tuple[int, ...]


def candidates(num_layers: int, max_blocks: int) -> list[Candidate]:
    """Every region of 1..max_blocks blocks, with and without the last layer, of each size that fits
    (layer 0 cannot share); a layer set reached by two settings is listed once, for the first."""
    found, seen = [], set()
    for blocks in range(1, max_blocks + 1):
        for include_last in (True, False):
            for count in range(blocks, num_layers, blocks):
                section = EPASConfig(num_sharing_layers=count, num_blocks=blocks, block_gap=BLOCK_GAP,
                                     include_last_layer=include_last)
                try:
                    layers = resolve_target_layers(num_layers, section)
                except ConfigError:
                    break  # does not fit: no longer region of this shape does either
                if layers not in seen:
                    seen.add(layers)
                    found.append(Candidate(count, blocks, include_last, layers))
    return found


def shape_label(num_blocks: int, include_last_layer: bool) -> str:
    """"1 block, with the last layer", "2 blocks, without the last layer"."""
    blocks = "1 block" if num_blocks == 1 else f"{num_blocks} blocks"
    return f"{blocks}, {'with' if include_last_layer else 'without'} the last layer"


def sources(layers) -> dict[int, int]:
    """Each sharing layer's source: the nearest preceding layer that computes its own tensors."""
    chosen, found = set(layers), {}
    for layer in sorted(chosen):
        source = layer - 1
        while source in chosen:
            source -= 1
        found[layer] = source
    return found


def describe(layers) -> str:
    """Layers as runs: "3-5", "1-2, 4-5", "none"."""
    runs = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def recommend(measured: list[dict], max_increase: float) -> dict | None:
    """The measured region with the most sharing layers (the most FLOPs saved) whose perplexity rises
    by at most ``max_increase`` (a fraction), the cheapest of those; None when no region fits."""
    fitting = [region for region in measured if region["increase"] <= max_increase]
    if not fitting:
        return None
    return min(fitting, key=lambda region: (-len(region["layers"]), region["increase"]))


def neighbours(chosen: dict, measured: list[dict]) -> list[dict]:
    """The regions to compare a recommendation with: its shape one block size shorter and longer, and
    the other shapes of the same size."""
    same_shape = [region for region in measured
                  if (region["num_blocks"], region["include_last_layer"]) ==
                  (chosen["num_blocks"], chosen["include_last_layer"])]
    step = chosen["num_blocks"]
    near = [region for region in same_shape
            if abs(region["num_sharing_layers"] - chosen["num_sharing_layers"]) == step]
    near += [region for region in measured if region["num_sharing_layers"] == chosen["num_sharing_layers"]
             and region is not chosen and region not in near]
    return sorted(near, key=lambda region: (region["num_sharing_layers"], region["increase"]))


def snippet(chosen: dict, mode: str, baseline_perplexity: float) -> str:
    """The ``epas:`` YAML for a recommended region, with what it measured as comments."""
    section = {"mode": mode, **{key: chosen[key] for key in ("num_sharing_layers", "num_blocks")}}
    if chosen["num_blocks"] > 1:
        section["block_gap"] = BLOCK_GAP
    section["include_last_layer"] = chosen["include_last_layer"]
    pairs = ", ".join(f"{layer}<-{source}" for layer, source in sources(chosen["layers"]).items())
    header = (f"# layers {describe(chosen['layers'])} share (layer<-source: {pairs}); perplexity "
              f"{baseline_perplexity:.4g} -> {chosen['perplexity']:.4g} ({100 * chosen['increase']:+.2f}%) "
              "with sharing switched on at inference\n")
    return header + yaml.safe_dump({"epas": section}, sort_keys=False)
