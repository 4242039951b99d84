"""The reproduction's two figures: loss curves with the region's growth marked, held-out loss per sharing length."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from analysis.reproduction.results import increases, mean_curve, mean_std, select

PRETRAIN_LINES = (("none", "no sharing", "C0"), ("qk", "EPAS qk", "C1"), ("kv", "EPAS kv", "C2"))
CPT_LINES = (("epas", "continued with EPAS (qk)", "C1"), ("none", "continued without sharing", "C0"))


def loss_curves(collected: list[dict], path: Path) -> None:
    """Training loss against the step (mean over seeds, the band from the lowest to the highest seed), with a
    dotted line where the EPAS runs' region grows; validation loss as markers."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for axes, stage, lines, title in zip(figure.subplots(1, 2), ("pretrain", "cpt"), (PRETRAIN_LINES, CPT_LINES),
                                         ("pretraining (from random weights)",
                                          "continual pretraining (from the model pretrained without sharing)"),
                                         strict=True):
        growth = set()
        for variant, label, colour in lines:
            group = select(collected, stage, variant)
            steps, mean, low, high = mean_curve(group, "train_loss")
            axes.plot(steps, mean, color=colour, label=f"{label} (train)", linewidth=1.2)
            axes.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
            valid_steps, valid_mean, _, _ = mean_curve(group, "valid_loss")
            axes.plot(valid_steps, valid_mean, "o", color=colour, markersize=4, label=f"{label} (validation)")
            for run in group:
                growth.update(run["growth_steps"])
        for step in sorted(growth):
            axes.axvline(step, color="grey", linestyle=":", linewidth=1)
        if growth:
            axes.text(min(growth), axes.get_ylim()[1], " region grows", va="top", fontsize=8, color="grey")
        axes.set(title=title, xlabel="step", ylabel="loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def sharing_lengths(collected: list[dict], target: int, num_layers: int, path: Path) -> None:
    """How much each model's held-out loss rises when its deepest layers share (per seed against the same model
    sharing nothing, mean ± std over seeds): EPAS models against the same models trained without EPAS and switched
    to sharing only at evaluation. The rise is paired, so the seeds' different starting losses do not hide it."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    lengths = list(range(target + 1))
    panels = (
        ("pretrain", (("none", "qk", "no sharing, qk at inference", "C0", "--"),
                      ("none", "kv", "no sharing, kv at inference", "C0", ":"),
                      ("qk", "qk", "EPAS qk", "C1", "-"), ("kv", "kv", "EPAS kv", "C2", "-")), "pretrained models"),
        ("cpt", (("none", "qk", "continued without sharing, qk at inference", "C0", "--"),
                 ("epas", "qk", "continued with EPAS (qk)", "C1", "-")), "continually pretrained models"),
    )
    for axes, (stage, lines, title) in zip(figure.subplots(1, 2), panels, strict=True):
        for variant, mode, label, colour, style in lines:
            stats = [mean_std(increases(select(collected, stage, variant), mode, length)) for length in lengths]
            errors = [0.0 if math.isnan(std) else std for _, std in stats]
            axes.errorbar(lengths, [mean for mean, _ in stats], yerr=errors, color=colour, linestyle=style,
                          marker="o", capsize=3, label=label)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set(title=title, xlabel=f"sharing length (deepest layers of {num_layers} sharing)",
                 ylabel="rise in held-out loss over sharing nothing", xticks=lengths)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
