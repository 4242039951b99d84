"""RESULTS.md and results.json: the paper's Tables 4 and 6 in this setting, beside the paper's own numbers, every
run's numbers, and a plain statement, computed from the numbers, of what holds and what does not."""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from analysis.evaluate import package_version
from analysis.reproduction import figures
from analysis.reproduction.plan import Run, Settings, preset, resolved, target, tokens_per_run
from analysis.reproduction.results import (collect, held_out, increases, mean_std, paired_differences,
                                           pretraining_costs, select, write_json)

FIGURES = "results_figures"
# The paper's figures (EPAS_METHOD.md): Table 4 validation loss without -> with EPAS (qk, 50% of the layers);
# Table 6 average accuracy over 11 lm-eval tasks of TinyLlama continued with EPAS (target 5/22) and without.
PAPER_TABLE4 = {"125M": (3.74, 3.79), "1.1B": (3.19, 3.22), "3B": (3.06, 3.09), "7B": (2.99, 3.04)}
# A difference in held-out loss below this (0.5% in perplexity) is read as none.
NEGLIGIBLE = 0.005
PAPER_TABLE6 = {"lengths": ("0/22", "3/22", "5/22"), "epas": (57.07, 55.71, 54.47), "none": (56.70, 48.88, 44.99)}


def cell(values: list[float], signed: bool = False) -> str:
    mean, std = mean_std(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if math.isnan(std) else f"{text} ± {std:.3f}"


def table4(collected: list[dict], sharing: int, num_layers: int) -> list[str]:
    baseline = select(collected, "pretrain", "none")
    lines = ["| model (sharing at evaluation) | held-out loss | Δ against no sharing, paired by seed | paper, 125M |",
             "|---|---:|---:|---:|",
             f"| no sharing (0/{num_layers}) | {cell([held_out(r, 'qk', 0) for r in baseline])} | | "
             f"{PAPER_TABLE4['125M'][0]:.2f} |"]
    for variant in ("qk", "kv"):
        group = select(collected, "pretrain", variant)
        differences = pretraining_costs(collected, variant, sharing)
        before, after = PAPER_TABLE4["125M"]
        paper = f"{after:.2f} ({after - before:+.2f})" if variant == "qk" else "not reported"
        lines.append(f"| EPAS {variant} ({sharing}/{num_layers}) | "
                     f"{cell([held_out(r, variant, sharing) for r in group])} | {cell(differences, True)} | {paper} |")
    return lines


def length_table(collected: list[dict], rows: list[tuple[str, str, str, str]], lengths: list[int],
                 num_layers: int) -> list[str]:
    """Held-out loss per sharing length; ``rows`` are (label, stage, variant, mode)."""
    lines = ["| model | " + " | ".join(f"{length}/{num_layers}" for length in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for label, stage, variant, mode in rows:
        group = select(collected, stage, variant)
        lines.append(f"| {label} | " + " | ".join(cell([held_out(r, mode, length) for r in group])
                                                 for length in lengths) + " |")
    return lines


def table6(collected: list[dict], lengths: list[int], num_layers: int) -> list[str]:
    rows = [("continued with EPAS (qk)", "cpt", "epas", "qk"),
            ("continued without sharing, qk sharing at inference only", "cpt", "none", "qk")]
    lines = length_table(collected, rows, lengths, num_layers)
    for label, _, variant, mode in rows:
        group = select(collected, "cpt", variant)
        lines.append(f"| rise over 0/{num_layers}: {label.split(',')[0]} | "
                     + " | ".join(cell(increases(group, mode, length), True) for length in lengths) + " |")
    paper = ["", "The paper's Table 6 (TinyLlama, average accuracy over 11 tasks, higher is better):", "",
             "| model | " + " | ".join(PAPER_TABLE6["lengths"]) + " |", "|---|---:|---:|---:|"]
    for key, label in (("epas", "continued with EPAS"), ("none", "continued without EPAS, sharing at inference")):
        values = PAPER_TABLE6[key]
        paper.append(f"| {label} | " + " | ".join(
            f"{value:.2f}" + ("" if i == 0 else f" ({(value - values[0]) / values[0]:+.1%})")
            for i, value in enumerate(values)) + " |")
    return lines + paper


def run_table(collected: list[dict], lengths: list[int]) -> list[str]:
    lines = ["| run | seed | final train loss | evaluated as | " + " | ".join(map(str, lengths)) + " |",
             "|---|---:|---:|---|" + "---:|" * len(lengths)]
    for run in collected:
        for mode, losses in run["held_out_loss"].items():
            how = f"{mode}, {'trained region' if run['uses_epas'] else 'inference-time sharing'}"
            lines.append(f"| {run['stage']} {run['variant']} | {run['seed']} | {run['final_train_loss']:.3f} | {how} | "
                         + " | ".join(f"{losses[length]:.3f}" for length in lengths) + " |")
    return lines


def verdicts(collected: list[dict], sharing: int, num_layers: int) -> list[str]:
    """What holds and what does not, each statement computed from the numbers above."""
    baseline = select(collected, "pretrain", "none")
    seeds = len(baseline)
    lines = []
    for variant in ("qk", "kv"):
        costs = pretraining_costs(collected, variant, sharing)
        mean, _ = mean_std(costs)
        spread = mean_std([held_out(r, "qk", 0) for r in baseline])[1]
        if mean < -NEGLIGIBLE:
            finding = "lower than without sharing: no cost at this scale (the paper's cost in qk mode: +0.03 to +0.05)"
        elif mean <= NEGLIGIBLE:
            finding = f"no cost at this scale (none above {NEGLIGIBLE}; the paper's cost in qk mode: +0.03 to +0.05)"
        elif mean <= 0.1:
            finding = "a small cost, as the paper reports (+0.03 to +0.05 in qk mode)"
        else:
            finding = "a larger cost than the paper reports (+0.03 to +0.05 in qk mode)"
        agreement = (f"all {seeds} seeds agree in sign" if len({c > 0 for c in costs}) == 1 and seeds > 1
                     else "the seeds do not agree in sign" if seeds > 1 else "one seed only")
        noise = "" if math.isnan(spread) else f"; the seeds of the baseline spread by {spread:.3f}"
        lines.append(f"- **Table 4, EPAS {variant} pretraining:** held-out loss {mean:+.3f} against no sharing "
                     f"(per seed: {', '.join(f'{c:+.3f}' for c in costs)}; {agreement}{noise}): {finding}.")
    epas, plain = select(collected, "cpt", "epas"), select(collected, "cpt", "none")
    rise_epas, rise_plain = increases(epas, "qk", sharing), increases(plain, "qk", sharing)
    gaps = [p - e for e, p in zip(rise_epas, rise_plain, strict=True)]
    if all(gap > NEGLIGIBLE for gap in gaps):
        finding = ("That holds, in every seed: a model continued with EPAS keeps its quality when its deep layers "
                   "share; the one continued without EPAS does not.")
    elif mean_std(gaps)[0] > NEGLIGIBLE:
        finding = "That holds on average but not in every seed."
    else:
        finding = f"That is not reproduced here: the two rise by the same amount (within {NEGLIGIBLE})."
    lines.append(
        f"- **Table 6, continual pretraining:** sharing {sharing}/{num_layers} layers raises the held-out loss of the "
        f"model continued with EPAS by {mean_std(rise_epas)[0]:+.3f} and that of the model continued without sharing "
        f"by {mean_std(rise_plain)[0]:+.3f} (per seed: "
        + ", ".join(f"{e:+.3f} against {p:+.3f}" for e, p in zip(rise_epas, rise_plain, strict=True)) + "). "
        + finding)
    at_zero = mean_std(paired_differences(plain, epas, lambda r: held_out(r, "qk", 0)))[0]
    deployed = mean_std(paired_differences(plain, epas, lambda r: held_out(r, "qk", 0),
                                           lambda r: held_out(r, "qk", sharing)))[0]
    cost = ("a cost the paper does not see (57.07 against 56.70 average accuracy): here, continuing with EPAS "
            "costs some quality, traded for the sharing" if at_zero > NEGLIGIBLE else
            "no cost, as in the paper (57.07 against 56.70 average accuracy)")
    lines.append(f"- **Against the model continued without sharing** (and used without sharing), the model continued "
                 f"with EPAS is {at_zero:+.3f} in held-out loss without sharing and {deployed:+.3f} sharing its "
                 f"{sharing} layers: {cost}.")
    untrained = increases(baseline, "qk", sharing)
    trained = increases(select(collected, "pretrain", "qk"), "qk", sharing)
    lines.append(f"- **Pretrained models:** sharing {sharing}/{num_layers} layers raises the held-out loss of the EPAS "
                 f"qk model by {mean_std(trained)[0]:+.3f} over its own no-sharing loss, and that of the model "
                 f"trained without EPAS (inference-time qk sharing) by {mean_std(untrained)[0]:+.3f}.")
    return lines


def processor_name() -> str:
    """The CPU's model name where Linux tells it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def write(settings: Settings, corpus: dict, command: str, calls: list[float]) -> list[Path]:
    """RESULTS.md, results.json and the figures in the output folder; returns their paths, RESULTS.md first."""
    collected = collect(settings)
    model = preset("pretrain").model
    sharing, num_layers = target("pretrain"), model.num_layers
    lengths = list(range(sharing + 1))
    (settings.output / FIGURES).mkdir(exist_ok=True)
    curves, by_length = settings.output / FIGURES / "loss_curves.png", settings.output / FIGURES / "sharing_lengths.png"
    figures.loss_curves(collected, curves)
    figures.sharing_lengths(collected, sharing, num_layers, by_length)

    pretrain, cpt = (resolved(settings, Run(stage, "none", settings.seeds[0])) for stage in ("pretrain", "cpt"))
    tokens = {"pretrain": tokens_per_run(pretrain), "cpt": tokens_per_run(cpt)}
    versions = {name: package_version(name) for name in ("torch", "megatron-core", "transformers")}
    machine = processor_name()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    pretrain_rows = [("no sharing, qk sharing at inference only", "pretrain", "none", "qk"),
                     ("no sharing, kv sharing at inference only", "pretrain", "none", "kv"),
                     ("EPAS qk", "pretrain", "qk", "qk"), ("EPAS kv", "pretrain", "kv", "kv")]
    splits = corpus["splits"]
    text = [
        "# Does EPAS do what the paper says? A reproduction at small scale",
        "",
        f"Generated by `{command}` on {date} ({len(os.sched_getaffinity(0))} CPU cores, {machine}, Python "
        f"{platform.python_version()}, torch {versions['torch']}, megatron-core {versions['megatron-core']}, "
        f"transformers {versions['transformers']}; {sum(calls) / 60:.0f} minutes"
        + (f" over {len(calls)} calls, resumed or re-reported" if len(calls) > 1 else "")
        + "). Every number below comes from "
        f"that run; `results.json` holds them all. Mean ± sample standard deviation over "
        f"{len(settings.seeds)} seed{'s' if len(settings.seeds) > 1 else ''} ({', '.join(map(str, settings.seeds))}).",
        "",
        "## Setup",
        "",
        f"- **Model:** LLaMA-style, {num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} "
        f"heads in {model.num_query_groups} KV groups, vocabulary {model.vocab_size}, sequences of "
        f"{model.seq_length}; fp32 on the CPU (`configs/reproduce.yaml`).",
        f"- **Data:** the docstrings of Python's standard library and its help topics (PSF licence, Python "
        f"{corpus['python']}), split by document: pretrain {splits['pretrain']['tokens']:,} tokens, cpt "
        f"{splits['cpt']['tokens']:,}, held-out {splits['heldout']['tokens']:,} (no run trains on it); exact "
        "duplicates removed first; a byte-level BPE tokenizer trained on the pretrain split.",
        f"- **Pretraining:** {pretrain.training.train_steps} steps of {pretrain.data.global_batch_size} × "
        f"{model.seq_length} tokens ({tokens['pretrain']:,} tokens, "
        f"{tokens['pretrain'] / splits['pretrain']['tokens']:.0%} of the split: less than one epoch), three runs per "
        f"seed with the same seed, data order and steps: no sharing, EPAS qk, EPAS kv. EPAS grows its region from "
        f"layer {num_layers - 1} toward layer {num_layers - sharing}, one layer every {pretrain.epas.interval} steps, "
        f"so the {sharing}-layer target is complete after step {pretrain.epas.interval * sharing}.",
        f"- **Continual pretraining:** the model pretrained without sharing, continued for {cpt.training.train_steps} "
        f"steps on the cpt split ({tokens['cpt']:,} tokens it has not seen; new optimizer, learning rate "
        f"{cpt.optimizer.lr:g} with {cpt.optimizer.warmup_steps} warm-up steps) two ways with the same seed and "
        f"data: with EPAS qk (one layer every {cpt.epas.interval} steps) and without sharing.",
        f"- **Evaluation:** `tools/evaluate.py` on the exported models: next-token loss on the "
        f"{collected[0]['held_out_tokens']:,} held-out tokens at sharing lengths 0 to {sharing} (the deepest layers "
        "share). Models trained without EPAS run the same layers with sharing switched on only at evaluation "
        "(`--allow-untrained`, the paper's inference-time sharing). The paper reports lm-eval accuracy; models "
        "this small answer those tasks at chance, so held-out loss stands in for it (lower is better).",
        "- Nothing was tuned on the held-out split; every run is reported below, none left out.",
        "",
        "## What holds and what does not",
        "",
        *verdicts(collected, sharing, num_layers),
        "",
        "## Table 4 in this setting: the cost of EPAS pretraining",
        "",
        *table4(collected, sharing, num_layers),
        "",
        "The paper's Table 4 for the other sizes (validation loss without → with EPAS): "
        + "; ".join(f"{size} {a:.2f} → {b:.2f} ({b - a:+.2f})" for size, (a, b) in PAPER_TABLE4.items()) + ".",
        "",
        "Every pretrained model at every sharing length (held-out loss):",
        "",
        *length_table(collected, pretrain_rows, lengths, num_layers),
        "",
        "## Table 6 in this setting: continual pretraining, evaluated at several sharing lengths",
        "",
        "Held-out loss (lower is better):",
        "",
        *table6(collected, lengths, num_layers),
        "",
        "## Loss curves",
        "",
        f"![training loss, with the steps where the sharing region grows]({FIGURES}/loss_curves.png)",
        "",
        f"![the rise in held-out loss against the sharing length]({FIGURES}/sharing_lengths.png)",
        "",
        "## Every run",
        "",
        "Held-out loss at each sharing length; final train loss is the mean of the last five logged steps.",
        "",
        *run_table(collected, lengths),
        "",
        "## What would test it at larger scale",
        "",
        "This is a small model on a small corpus trained for minutes: it can show whether the mechanism behaves as "
        "the paper says, not the size of the effect at scale. The paper's own settings, with this recipe:",
        "",
        "- Table 4: `configs/llama_125m.yaml` pretrained on 1B tokens (0.25M tokens × 4000 steps) with "
        "`epas.num_sharing_layers=0` and with the default 50% target, several seeds, validation loss compared.",
        "- Table 6: TinyLlama continued with `configs/tinyllama_1.1b_cpt.yaml` (target 5/22) and the same run with "
        "`epas.num_sharing_layers=0`, both evaluated with `tools/evaluate.py --sharing-lengths 0,3,5` on the "
        "paper's lm-eval tasks (see docs/EVALUATION.md), the second with `--allow-untrained`.",
        "",
        "## Running it",
        "",
        "```bash",
        "make reproduce   # python tools/reproduce.py --output results/reproduction --publish docs",
        "```",
        "",
        "It shows each job as it starts and ends, the running training steps and an ETA. Every job is a command of "
        "the project's tools, logged in `results/reproduction/logs/`; stopped (Ctrl-C, `SIGTERM`, a lost machine), "
        "the same command resumes: finished jobs are kept (`state/`), training goes on from its last checkpoint. "
        "The runs are set by `configs/reproduce.yaml` and `configs/reproduce_cpt.yaml`; `--seeds`, "
        "`--pretrain-steps`, `--cpt-steps` (a shorter run keeps the shape of its schedules), `--held-out-tokens` and "
        "`--jobs` (runs at a time; the cores are shared between them) change the rest. The output folder holds the "
        "corpus, each run's checkpoints, TensorBoard log, export and evaluations, `RESULTS.md`, `results.json` and "
        f"`{FIGURES}/`; `--publish docs` copies the report and figures into docs/.",
        "",
    ]
    report_path = settings.output / "RESULTS.md"
    report_path.write_text("\n".join(text))
    write_json(settings.output / "results.json", {
        "command": command, "date": date, "versions": versions, "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)), "seeds": list(settings.seeds), "corpus": corpus,
        "tokens_per_run": tokens, "sharing_target": sharing, "num_layers": num_layers, "runs": collected,
    })
    return [report_path, curves, by_length]
