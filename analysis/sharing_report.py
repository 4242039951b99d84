"""report.md and sharing_analysis.png of tools/analyze_sharing.py, from its results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.sharing_regions import describe, shape_label

PLOT = "sharing_analysis.png"
TOP_PAIRS = 8


def _percent(increase: float) -> str:
    return f"{100 * increase:+.2f}%"


def _links(region: dict) -> str:
    """"5<-2 (cos 0.97, err 0.08)" for each sharing layer of a region."""
    cosine, error = region["cosine"], region["attention_error"]
    return ", ".join(f"{layer}<-{source} (cos {cosine[layer]:.2f}, err {error[layer]:.2f})"
                     for layer, source in region["sources"].items())


def _cost_table(regions: list[dict]) -> list[str]:
    """Rows: number of sharing layers; columns: shapes; cells: perplexity increase (layers)."""
    shapes = list(dict.fromkeys((region["num_blocks"], region["include_last_layer"]) for region in regions))
    cells = {(region["num_sharing_layers"], region["num_blocks"], region["include_last_layer"]): region
             for region in regions}
    lines = ["| sharing layers | " + " | ".join(shape_label(*shape) for shape in shapes) + " |",
             "|---:|" + "---|" * len(shapes)]
    for count in sorted({region["num_sharing_layers"] for region in regions}):
        row = [cells.get((count, *shape)) for shape in shapes]
        text = [f"{_percent(region['increase'])} ({describe(region['layers'])})" if region else "" for region in row]
        lines.append(f"| {count} | " + " | ".join(text) + " |")
    return lines


def _top_pairs(pairs: dict) -> list[str]:
    """The pairs whose attention output changes least when the later layer takes the earlier one's tensors."""
    error, cosine = pairs["attention_error"], pairs["cosine"]
    found = [(error[i][j], i, j) for i in range(len(error)) for j in range(len(error)) if error[i][j] is not None]
    lines = ["| source i | layer j | attention-output error | cosine |", "|---:|---:|---:|---:|"]
    for value, i, j in sorted(found)[:TOP_PAIRS]:
        lines.append(f"| {i} | {j} | {value:.3f} | {cosine[i][j]:.3f} |")
    return lines


def _mode_section(mode: str, found: dict, baseline: dict, max_increase: float) -> list[str]:
    tensors = " and ".join(found["pairs"]["shared_tensors"])
    lines = [f"## {mode} sharing (a sharing layer reuses its source's post-RoPE {tensors})", ""]
    chosen = found["recommendation"]
    if chosen is None:
        cheapest = min(found["regions"], key=lambda region: region["increase"])
        lines += [f"**No region within the budget** ({_percent(max_increase)} perplexity): the cheapest is "
                  f"layers {describe(cheapest['layers'])} at {_percent(cheapest['increase'])}. Nothing here "
                  "is redundant enough to share at inference; raise --max-increase to see the least costly "
                  "region as a snippet.", ""]
    else:
        lines += [f"**Recommended**: layers {describe(chosen['layers'])} ({len(chosen['layers'])} of "
                  f"{len(found['pairs']['cosine'])}), perplexity {_percent(chosen['increase'])} "
                  f"(budget {_percent(max_increase)}).", "", "```yaml", found["snippet"].rstrip(), "```", "",
                  "Each sharing layer, its source, and how alike they are (cosine of the shared tensors, "
                  f"relative error of the layer's attention output with the source's tensors): {_links(chosen)}.",
                  "", "Its neighbours:", "", "| layers | shape | perplexity | increase |", "|---|---|---:|---:|"]
        for region in [chosen, *found["neighbours"]]:
            mark = " **(recommended)**" if region is chosen else ""
            lines.append(f"| {describe(region['layers'])}{mark} | "
                         f"{shape_label(region['num_blocks'], region['include_last_layer'])} | "
                         f"{region['perplexity']:.4g} | {_percent(region['increase'])} |")
        lines.append("")
    lines += ["Perplexity increase of every region switched on at inference (no sharing: "
              f"{baseline['perplexity']:.4g}):", "", *_cost_table(found["regions"]), "",
              "The most redundant pairs:", "", *_top_pairs(found["pairs"]), ""]
    return lines


def report(result: dict) -> str:
    meta, settings = result["metadata"], result["settings"]
    lines = [
        f"# Which layers should share: `{meta['model']}`", "",
        f"{meta['num_layers']} layers, {meta['num_attention_heads']} query heads in {meta['num_key_value_heads']} "
        f"key-value groups; {result['tokens']} tokens of `{settings['data']}` in windows of {settings['seq_length']} "
        f"({meta['device']}, {meta['dtype']}). Perplexity with no sharing: {result['baseline']['perplexity']:.4g}.",
        "",
    ]
    if meta["trained_sharing_layers"]:
        lines += [f"This model was trained to share layers {describe(meta['trained_sharing_layers'])}: their own Q/K/V "
                  "weights stopped training when they began to share, so the pairwise numbers there describe "
                  "stale weights; read the perplexity costs.", ""]
    for mode, found in result["modes"].items():
        lines += _mode_section(mode, found, result["baseline"], settings["max_increase"])
    lines += ["How to read this: docs/ANALYSIS.md.", ""]
    return "\n".join(lines)


def _heatmap(fig, ax, matrix: list[list[float | None]], title: str, colours: str, limits) -> None:
    """Sources 0..L-2 (rows) against sharing layers 1..L-1 (columns); the cells below the diagonal are empty."""
    values = np.array([[np.nan if value is None else value for value in row[1:]] for row in matrix[:-1]], dtype=float)
    image = ax.imshow(values, cmap=colours, vmin=limits[0], vmax=limits[1])
    size = len(values)
    if size <= 12:
        for i in range(size):
            for j in range(i, size):
                red, green, blue, _ = image.cmap(image.norm(values[i, j]))
                ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=ink)
    step = max(1, size // 12)
    ax.set_xticks(range(0, size, step), [str(j + 1) for j in range(0, size, step)])
    ax.set_yticks(range(0, size, step), [str(i) for i in range(0, size, step)])
    ax.set_xlabel("sharing layer j")
    ax.set_ylabel("source layer i")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)


def _curves(ax, found: dict, max_increase: float) -> None:
    shapes = list(dict.fromkeys((region["num_blocks"], region["include_last_layer"]) for region in found["regions"]))
    for shape in shapes:
        regions = sorted((region for region in found["regions"]
                          if (region["num_blocks"], region["include_last_layer"]) == shape),
                         key=lambda region: region["num_sharing_layers"])
        ax.plot([region["num_sharing_layers"] for region in regions],
                [100 * region["increase"] for region in regions], marker="o", markersize=3, label=shape_label(*shape))
    ax.axhline(100 * max_increase, color="black", linestyle="--", linewidth=1, label="budget")
    chosen = found["recommendation"]
    if chosen is not None:
        ax.plot([chosen["num_sharing_layers"]], [100 * chosen["increase"]], marker="*", markersize=14,
                color="gold", markeredgecolor="black", linestyle="none", label="recommended")
    highest = max(100 * region["increase"] for region in found["regions"])
    if highest > 20 * max(1.0, 100 * max_increase):  # linear up to the budget's scale, logarithmic above
        ax.set_yscale("symlog", linthresh=max(1.0, 100 * max_increase))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sharing layers")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_title("inference-time sharing: cost against region length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot(result: dict, path) -> None:
    """One row per mode: cosine heatmap, attention-output error heatmap, perplexity increase curves."""
    modes = result["modes"]
    fig = Figure(figsize=(17, 4.8 * len(modes)))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.1, top=0.88, wspace=0.25, hspace=0.4)
    axes = np.atleast_2d(fig.subplots(len(modes), 3))
    for row, (mode, found) in zip(axes, modes.items(), strict=True):
        pairs = found["pairs"]
        tensors = "/".join(name[0].upper() for name in pairs["shared_tensors"])
        worst = max((value for line in pairs["attention_error"] for value in line if value is not None), default=1.0)
        _heatmap(fig, row[0], pairs["cosine"], f"{mode}: cosine of {tensors} (1 = the same)", "viridis", (0, 1))
        _heatmap(fig, row[1], pairs["attention_error"], f"{mode}: attention-output error with i's {tensors} "
                 "(0 = the same)", "magma_r", (0, max(1.0, min(worst, 2.0)) if math.isfinite(worst) else 1.0))
        _curves(row[2], found, result["settings"]["max_increase"])
    fig.suptitle(f"{Path(result['metadata']['model']).name}: which layers should share "
                 f"({result['tokens']} tokens)")
    fig.savefig(path, dpi=110)
