"""The reproduction's numbers: read back from every run's TensorBoard log and evaluation, then summed up over seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from analysis.plot_runs import LOSS, SHARING, VALID, read_scalars, sharing_changes
from analysis.reproduction.plan import Layout, Settings, runs


def collect(settings: Settings) -> list[dict]:
    """Every run with its curves and held-out losses: ``held_out[mode][length]`` is the mean next-token loss."""
    layout, collected = Layout(settings.output), []
    for run in runs(settings):
        scalars = read_scalars(layout.tensorboard(run))
        held_out = {}
        for mode in run.evaluation_modes:
            evaluation = json.loads((layout.evaluation(run, mode) / "results.json").read_text())
            held_out[mode] = [length["validation"]["loss"] for length in evaluation["runs"]]
        collected.append({
            "name": run.name, "stage": run.stage, "variant": run.variant, "seed": run.seed, "mode": run.mode,
            "uses_epas": run.uses_epas, "held_out_loss": held_out,
            "held_out_tokens": evaluation["runs"][0]["validation"]["tokens"],
            "train_loss": scalars[LOSS], "valid_loss": scalars.get(VALID, ([], [])),
            "growth_steps": [step for step, _ in sharing_changes(*scalars[SHARING])] if SHARING in scalars else [],
            "final_train_loss": statistics.mean(scalars[LOSS][1][-5:]),
        })
    return collected


def select(collected: list[dict], stage: str, variant: str) -> list[dict]:
    return sorted((run for run in collected if run["stage"] == stage and run["variant"] == variant),
                  key=lambda run: run["seed"])


def held_out(run: dict, mode: str, length: int) -> float:
    return run["held_out_loss"][mode][length]


def increases(group: list[dict], mode: str, length: int) -> list[float]:
    """Per seed, how much the held-out loss rises from sharing nothing to sharing ``length`` layers."""
    return [held_out(run, mode, length) - held_out(run, mode, 0) for run in group]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (NaN with a single seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_differences(runs_a: list[dict], runs_b: list[dict], value_a, value_b=None) -> list[float]:
    """value_b(b) - value_a(a) seed by seed (the same data order and initial weights on both sides)."""
    assert [run["seed"] for run in runs_a] == [run["seed"] for run in runs_b]
    value_b = value_b or value_a
    return [value_b(b) - value_a(a) for a, b in zip(runs_a, runs_b, strict=True)]


def pretraining_costs(collected: list[dict], variant: str, sharing: int) -> list[float]:
    """Per seed, the held-out loss of the EPAS ``variant`` model at its full region minus that of the model
    pretrained without sharing, used without sharing (Table 4)."""
    return paired_differences(select(collected, "pretrain", "none"), select(collected, "pretrain", variant),
                              lambda run: held_out(run, "qk", 0), lambda run: held_out(run, variant, sharing))


def mean_curve(group: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps logged by every run of the group, with the mean, min and max over seeds."""
    steps = sorted(set.intersection(*(set(run[key][0]) for run in group)))
    by_run = [dict(zip(*run[key], strict=True)) for run in group]
    values = [[run[step] for run in by_run] for step in steps]
    return steps, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def write_json(path: Path, data) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
