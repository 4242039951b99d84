"""Figures of tools/benchmark.py results: what sharing gains against what the FLOP model allows.

    python tools/plot_benchmark.py train_125m.json train_1.1b.json --output train.png
    python tools/plot_benchmark.py generate_125m.json generate_1.1b.json --output generate.png

One panel per JSON file, all of one kind. ``train``: the measured tokens/s gain against the
sharing fraction per mode, with the FLOP bound (the gain if step time followed the FLOP model)
dashed in the same colour, and EPAS-at-0% against stock in the panel title. ``generate``
(``benchmarks/generate.py``): the decode tokens/s gain against the sharing fraction per mode,
batch size and prompt length, with the memory-bound model's gain thin in the same colour, and
EPAS-at-0% against LlamaForCausalLM and how decoding ran in the title. Titles name
the model, the device and the versions stored in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from epas import cli
from epas.errors import InputError

KINDS = ("train", "generate")


def load_results(paths: list[Path]) -> list[dict]:
    """The benchmark results, checked to be of one kind."""
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"cannot read {path}: {error}")
        if not isinstance(result, dict) or result.get("benchmark") not in KINDS:
            raise InputError(f"{path} is not the JSON of a train or generate benchmark")
        results.append(result)
    kinds = {result["benchmark"] for result in results}
    if len(kinds) > 1:
        raise InputError(f"the files mix {' and '.join(sorted(kinds))} results; plot each kind on its own")
    return results


def _series(records: list[dict], key: str, value: str) -> dict:
    """{group: ([sharing fractions], [values])} with records grouped by ``key(record)``."""
    series = {}
    for record in sorted(records, key=lambda r: r["sharing_fraction"]):
        xs, ys = series.setdefault(key(record), ([], []))
        xs.append(record["sharing_fraction"])
        ys.append(record[value])
    return series


def _train_panel(axes, result: dict) -> None:
    epas = [r for r in result["records"] if r["model"] == "epas"]
    measured = _series(epas, lambda r: r["mode"], "measured_gain")
    predicted = _series(epas, lambda r: r["mode"], "predicted_gain")
    for colour, mode in enumerate(measured):
        axes.plot(*measured[mode], "o-", color=f"C{colour}", label=f"{mode} measured")
        axes.plot(*predicted[mode], "--", color=f"C{colour}", label=f"{mode} FLOP bound")
    title = result["metadata"]["model"]
    overhead = result["summary"].get("epas_overhead_vs_stock")
    if overhead:
        title += "\nEPAS 0% vs stock: " + ", ".join(f"{m} {v:+.2%}" for m, v in overhead.items())
    axes.set_title(title, fontsize=9)
    axes.set_ylabel("tokens/s gain over 0%")


def _generate_panel(axes, result: dict) -> None:
    """Per (batch, prompt) a colour, per mode a line style; each mode's line starts at EPAS 0%."""
    records = result["records"]
    cases = list(dict.fromkeys((r["batch"], r["prompt"]) for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records if r["mode"]))
    for colour, case in enumerate(cases):
        for style, bound_style, mode in zip(("o-", "s--"), (":", "-."), modes):
            rows = [r for r in records if (r["batch"], r["prompt"]) == case and r["model"] == "epas"
                    and r["mode"] in (None, mode)]
            xs, ys = zip(*sorted((r["sharing_fraction"], r["decode_gain"]) for r in rows))
            axes.plot(xs, ys, style, color=f"C{colour}", label=f"{mode}, batch {case[0]}, prompt {case[1]}")
            if all("memory_bound_gain" in r for r in rows):  # results written before the model lack it
                xs, ys = zip(*sorted((r["sharing_fraction"], r["memory_bound_gain"]) for r in rows))
                axes.plot(xs, ys, bound_style, color=f"C{colour}", linewidth=1, label=f"{mode}, memory-bound model")
    cache = {(r["mode"], r["sharing_fraction"]): r["cache_fraction"] for r in records if r["mode"]}
    decoding = "generate()"
    if result["settings"].get("cache") == "static":
        decoding = "static cache, CUDA graphs" if result["settings"]["device"] == "cuda" else "static cache"
    title = f"{result['metadata']['model']}, {decoding}\ncache / LLaMA cache: " + ", ".join(
        f"{mode} {fraction:.0%} {size:.2f}" for (mode, fraction), size in sorted(cache.items()))
    anchor = result.get("summary", {}).get("epas_at_0_vs_llama")
    if anchor:
        title += "\nEPAS 0% vs LlamaForCausalLM (decode): " + ", ".join(
            f"b{a['batch']} p{a['prompt']} {a['decode_vs_llama']:+.1%}" for a in anchor)
    axes.set_title(title, fontsize=8)
    axes.set_ylabel("decode tokens/s gain over EPAS 0%")


def plot_results(results: list[dict], output: Path) -> Path:
    """One panel per result side by side; the figure is titled with the devices and versions."""
    panel = _train_panel if results[0]["benchmark"] == "train" else _generate_panel
    figure = Figure(figsize=(max(6.5, 5.5 * len(results)), 4.8), layout="constrained")
    for axes, result in zip(figure.subplots(1, len(results), squeeze=False)[0], results):
        panel(axes, result)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("sharing fraction (deepest layers first)")
        axes.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    kind = "training step" if panel is _train_panel else "decoding"
    devices = " | ".join(sorted({result["metadata"]["device"] for result in results}))
    versions = " | ".join(sorted({
        f"torch {m['torch']} · megatron-core {m['megatron_core'] or '-'} · transformers {m['transformers']}"
        for m in (result["metadata"] for result in results)
    }))
    figure.suptitle(f"EPAS {kind} on {devices}\n{versions}", fontsize=9)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of tools/benchmark.py (one kind)")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    return cli.run(lambda: print(f"wrote {plot_results(load_results(args.results), args.output)}"))


if __name__ == "__main__":
    sys.exit(main())
