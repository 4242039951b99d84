"""Accuracy of one EPAS model at several sharing lengths: the paper's Table 6 for any exported model.

    python tools/evaluate.py MODEL_DIR --sharing-lengths 0,3,5 --tasks piqa,arc_easy,hellaswag
    python tools/evaluate.py MODEL_DIR --sharing-lengths 0,1,2 --tasks my_task --include-path my_tasks/ \\
        --valid-data data/demo/corpus --seq-length 512 --output evaluation/demo

MODEL_DIR is a folder from ``tools/convert_checkpoint.py megatron-to-hf`` or finetune_epas.py (a
plain LLaMA folder works with ``--allow-untrained``). Sharing length L is
the L deepest layers of the region the model was trained to share (``trained_sharing_layers``
in its config.json): with region 17..21, L=3 shares layers 19, 20, 21 and L=0 shares none.
``--allow-untrained`` counts over all layers but layer 0 instead (the paper's inference-time
sharing baseline, e.g. on a model trained without EPAS).

The model is loaded once and switched between lengths with ``set_sharing_layers``. Tasks run
through lm-evaluation-harness as a library (``--include-path`` adds local task YAMLs: nothing
is downloaded for them); ``--valid-data`` adds the perplexity of a megatron ``.bin/.idx``
dataset. The output folder gets results.json (every number), table.md (tasks x sharing
lengths, with the average of the accuracies) and sharing_lengths.png. See
docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import warnings
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from epas import cli
from epas.data.tokenizer import load_tokenizer
from epas.errors import ConfigError, InputError
from epas.hf_config import read_model_config
from epas_hf import EpasLlamaForCausalLM

# The metric a task's row shows: the first of these the task reports, else its first metric.
DEFAULT_METRICS = ("acc_norm", "acc")
TABLE, RESULTS, PLOT = "table.md", "results.json", "sharing_lengths.png"
VALIDATION_ROW = "validation perplexity"


# ---- sharing lengths -------------------------------------------------------------------------------


def sharing_sets(num_layers: int, trained: list[int] | None, lengths: list[int],
                 allow_untrained: bool) -> dict[int, list[int]]:
    """The layers each sharing length switches on: the deepest ones of the trained region (or, with
    allow_untrained, of layers 1..N-1), since EPAS grows its region from the deep end."""
    region = list(range(1, num_layers)) if allow_untrained else sorted(trained or [])
    too_long = [length for length in lengths if length > len(region)]
    if too_long and allow_untrained:
        raise InputError(f"sharing lengths {too_long} exceed the {len(region)} layers that can share "
                              f"(layers 1..{num_layers - 1}: layer 0 has no source); lower --sharing-lengths")
    if too_long:
        where = ("this model records no trained sharing region (trained_sharing_layers is null)" if trained is None
                 else f"this model was trained to share {len(region)} layers ({region})")
        raise InputError(f"sharing lengths {too_long} exceed the trained region: {where}; lower "
                              "--sharing-lengths, or pass --allow-untrained to count over all layers but "
                              "layer 0 (inference-time sharing)")
    return {length: region[len(region) - length:] for length in lengths}


def describe_layers(layers: list[int]) -> str:
    """A sharing set in a table header: "none", "21", "19-21" or "3,5,7"."""
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ---- inputs, checked before the model loads --------------------------------------------------------


def data_prefix(path: str, option: str = "--valid-data") -> str:
    """The megatron dataset prefix of ``path``, given with or without its .bin/.idx suffix."""
    prefix = path.removesuffix(".bin").removesuffix(".idx")
    missing = [prefix + suffix for suffix in (".bin", ".idx") if not Path(prefix + suffix).is_file()]
    if missing:
        raise InputError(f"{option} {path}: {' and '.join(missing)} not found; pass the prefix of "
                         "a dataset written by tools/preprocess_data.py (PREFIX.bin and PREFIX.idx)")
    return prefix


def task_manager(tasks: list[str], include_paths: list[Path]):
    """An lm-eval TaskManager that knows every task asked for. Indexing lm-eval's own ~15,000
    task configs takes seconds, so a run of local tasks indexes only the include paths."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("lm-evaluation-harness is not installed: pip install 'lm-eval>=0.4.13,<0.5'") from None
    missing = [path for path in include_paths if not path.is_dir()]
    if missing:
        raise InputError(f"--include-path {', '.join(map(str, missing))} is not a folder; pass the "
                              "folder holding your task YAML files")
    paths = [str(path) for path in include_paths]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}: lm-eval has no such task or group"
                              + (f" and {', '.join(paths)} define none" if paths else "")
                              + "; check the names (lm-eval ls tasks), or pass --include-path "
                              "with the folder of your task YAMLs")
    return manager


# ---- the model -------------------------------------------------------------------------------------


def load_model(folder: Path, dtype: torch.dtype, device: str, sharing_mode: str | None = None) -> EpasLlamaForCausalLM:
    """The exported weights in this repository's EPAS model (the export's model files are a copy of
    it), with sharing off to start; its sharing layers run in ``sharing_mode`` (None: the folder's)."""
    mode = {"sharing_mode": sharing_mode} if sharing_mode else {}
    try:
        model = EpasLlamaForCausalLM.from_pretrained(folder, sharing_layers=[], dtype=dtype, **mode)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"cannot load the model in {folder} ({first_line}); pass a folder written by "
                              "tools/convert_checkpoint.py megatron-to-hf") from None
    return model.to(device).eval()


def read_tokens(prefix: str, max_tokens: int | None, vocab_size: int, option: str = "--valid-data") -> np.ndarray:
    """The dataset's documents concatenated in file order (each ends with its EOD token), cut at
    ``max_tokens``."""
    with warnings.catch_warnings():  # megatron-core warns that GPU libraries are missing: no matter here
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    pieces, count = [], 0
    for index in range(len(dataset)):
        if max_tokens is not None and count >= max_tokens:
            break
        pieces.append(dataset[index])
        count += len(pieces[-1])
    tokens = np.concatenate(pieces)[:max_tokens] if pieces else np.zeros(0, dtype=np.int64)
    return checked_tokens(tokens, f"{option} {prefix}", vocab_size)


def checked_tokens(tokens: np.ndarray, source: str, vocab_size: int) -> np.ndarray:
    """``tokens`` as int64, refused when there are too few for a perplexity or when they do not fit
    the model's vocabulary; ``source`` names the data in the message."""
    if len(tokens) < 2:
        raise InputError(f"{source} holds {len(tokens)} token(s); perplexity needs at least 2")
    if tokens.max() >= vocab_size:
        raise InputError(f"{source} holds token id {tokens.max()} but the model's vocabulary "
                              f"has {vocab_size} entries: the data was tokenized with another tokenizer")
    return tokens.astype(np.int64)


def token_windows(tokens: np.ndarray, seq_length: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_length`` inputs plus the next token as the last target
    (consecutive windows share that one token), the last window shorter: every token but the
    first is predicted exactly once, like megatron's validation samples without the shuffle."""
    return [torch.from_numpy(tokens[start:start + seq_length + 1]) for start in range(0, len(tokens) - 1, seq_length)]


def batches(windows: list[torch.Tensor], batch_size: int):
    """(inputs, labels) of ``batch_size`` windows at a time, right-padded to the longest: padding
    labels are -100 (ignored), and causal attention keeps padding out of the real positions."""
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        width = max(len(window) for window in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, window in enumerate(batch):
            inputs[row, :len(window) - 1] = window[:-1]
            labels[row, :len(window) - 1] = window[1:]
        yield inputs, labels


@torch.inference_mode()
def validation_loss(model, windows: list[torch.Tensor], batch_size: int) -> dict:
    """Mean next-token NLL over all windows (natural log) and its exp, the perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, labels in batches(windows, batch_size):
        logits = model(inputs.to(device), use_cache=False).logits.float()
        labels = labels.to(device)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


# ---- lm-eval ---------------------------------------------------------------------------------------


def pick_metric(task: str, numbers: dict, higher_is_better: dict, preferred: list[str]) -> dict:
    """The metric a task's row shows: the first of ``preferred`` it reports, else its first metric.
    lm-eval keys its numbers "metric,filter". Higher-is-better metrics (accuracies, as fractions)
    make the Average; lower-is-better ones (perplexities) do not."""
    reported = [key for key, value in numbers.items()
                if "," in key and "_stderr," not in key and isinstance(value, (int, float))]
    if not reported:
        raise InputError(f"lm-eval returned no metric for task {task}: {numbers}")
    by_name = {key.split(",")[0]: key for key in reversed(reported)}  # first filter of each metric wins
    chosen = next((by_name[name] for name in preferred if name in by_name), reported[0])
    metric, filter_name = chosen.split(",", 1)
    stderr = numbers.get(f"{metric}_stderr,{filter_name}")
    return {
        "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
        "value": numbers[chosen],
        "stderr": stderr if isinstance(stderr, (int, float)) else None,
        "higher_is_better": bool(higher_is_better.get(metric)),
        "all": {key: value for key, value in numbers.items() if "," in key},
    }


def run_tasks(lm, tasks: list[str], manager, num_fewshot: int | None, limit: float | None,
              preferred: list[str]) -> dict:
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                             limit=limit, log_samples=False)
    missing = [task for task in tasks if task not in output["results"]]
    if missing:
        raise InputError(f"lm-eval returned no result for {', '.join(missing)} (a group without an "
                              "aggregate metric?); list its subtasks in --tasks instead")
    return {task: pick_metric(task, output["results"][task], output["higher_is_better"].get(task, {}), preferred)
            for task in tasks}


# ---- the whole evaluation --------------------------------------------------------------------------


def evaluate(args, argv: list[str]) -> dict:
    """Every task and the validation perplexity at every sharing length; inputs are checked first,
    so a typo fails in seconds rather than after loading the model."""
    config = read_model_config(args.model)
    num_layers, trained = config["num_hidden_layers"], config.get("trained_sharing_layers")
    trained_mode = config.get("sharing_mode", "qk")
    mode = args.sharing_mode or trained_mode
    if mode != trained_mode and trained and not args.allow_untrained:
        raise InputError(f"--sharing-mode {mode}: this model was trained to share in {trained_mode} mode, so "
                         f"{mode} sharing is inference-time sharing; pass --allow-untrained as well")
    sets = sharing_sets(num_layers, trained, args.sharing_lengths, args.allow_untrained)
    prefix = data_prefix(args.valid_data) if args.valid_data else None
    seq_length = args.seq_length or config["max_position_embeddings"]
    manager = task_manager(args.tasks, args.include_path) if args.tasks else None

    tokenizer_dir = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except ConfigError as error:
        hint = "" if args.tokenizer else " (the export holds none: pass --tokenizer DIR)"
        raise InputError(f"{error}{hint}") from None
    tokens = read_tokens(prefix, args.valid_tokens, config["vocab_size"]) if prefix else None
    windows = token_windows(tokens, seq_length) if prefix else []
    device, dtype = cli.device_and_dtype(args.device, args.dtype)
    print(f"loading {args.model} ({num_layers} layers, {mode} sharing, trained region {trained} in {trained_mode} "
          f"mode) on {device}", flush=True)
    model = load_model(args.model, dtype, device, mode)
    lm = None
    if args.tasks:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, backend="causal")

    runs = []
    for step, (length, layers) in enumerate(sets.items(), start=1):
        print(f"[{step}/{len(sets)}] sharing length {length}: layers {describe_layers(layers)}", flush=True)
        model.set_sharing_layers(layers)
        run = {"sharing_length": length, "sharing_layers": list(model.config.sharing_layers), "tasks": {}}
        if args.tasks:
            print(f"    lm-eval: {', '.join(args.tasks)}", flush=True)
            run["tasks"] = run_tasks(lm, args.tasks, manager, args.num_fewshot, args.limit, args.metrics)
        accuracies = [task["value"] for task in run["tasks"].values() if task["higher_is_better"]]
        run["average"] = sum(accuracies) / len(accuracies) if accuracies else None
        if windows:
            print(f"    perplexity: {len(tokens)} tokens of {prefix} in {len(windows)} windows of "
                  f"{seq_length}", flush=True)
            run["validation"] = validation_loss(model, windows, args.batch_size)
        runs.append(run)

    return {
        "metadata": {
            "model": str(args.model),
            "tokenizer": str(tokenizer_dir),
            "num_layers": num_layers,
            "sharing_mode": mode,
            "trained_sharing_mode": trained_mode,
            "trained_sharing_layers": trained,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "versions": {name: package_version(name) for name in ("lm-eval", "transformers", "torch", "megatron-core")},
            "python": platform.python_version(),
            "command": shlex.join(["python", "tools/evaluate.py", *argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "settings": {
            "sharing_lengths": args.sharing_lengths,
            "allow_untrained": args.allow_untrained,
            "tasks": args.tasks,
            "include_path": [str(path) for path in args.include_path],
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "metrics": args.metrics,
            "batch_size": args.batch_size,
            "valid_data": prefix,
            "seq_length": seq_length if prefix else None,
            "valid_tokens": args.valid_tokens,
        },
        "runs": runs,
    }


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ---- outputs ---------------------------------------------------------------------------------------


def table_rows(result: dict) -> list[dict]:
    """Rows of the table and lines of the plot: the accuracies (higher-is-better metrics, in percent
    as in the paper), their Average, then the lower-is-better ones and the validation perplexity."""
    runs = result["runs"]
    rows = []
    for task in result["settings"]["tasks"]:
        first = runs[0]["tasks"][task]
        scale = 100 if first["higher_is_better"] else 1
        rows.append({"label": f"{task} ({first['metric']})", "higher_is_better": first["higher_is_better"],
                     "values": [run["tasks"][task]["value"] * scale for run in runs]})
    if runs[0]["average"] is not None:
        rows.append({"label": "Average", "higher_is_better": True, "values": [run["average"] * 100 for run in runs]})
    if "validation" in runs[0]:
        rows.append({"label": VALIDATION_ROW, "higher_is_better": False,
                     "values": [run["validation"]["perplexity"] for run in runs]})
    return sorted(rows, key=lambda row: not row["higher_is_better"])  # stable: keeps the order within each kind


def markdown_table(result: dict) -> str:
    meta, runs = result["metadata"], result["runs"]
    trained_mode = meta["trained_sharing_mode"]
    trained_mode = "" if trained_mode == meta["sharing_mode"] else f" in {trained_mode} mode"
    header = [f"{run['sharing_length']}/{meta['num_layers']} ({describe_layers(run['sharing_layers'])})"
              for run in runs]
    lines = [
        f"Model `{meta['model']}`: {meta['num_layers']} layers, {meta['sharing_mode']} sharing, trained region "
        f"{meta['trained_sharing_layers']}{trained_mode}. Columns: sharing length/layers (the layers sharing). "
        "Accuracies (higher-is-better metrics) in %; the Average is over them.",
        "",
        "| task (metric) | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for row in table_rows(result):
        label = f"**{row['label']}**" if row["label"] == "Average" else row["label"]
        lines.append(f"| {label} | " + " | ".join(f"{value:.2f}" for value in row["values"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Metric against sharing length: accuracies on one panel, the others (perplexities, lower is
    better) on a second one, as their scales differ."""
    rows = table_rows(result)
    lengths = [run["sharing_length"] for run in result["runs"]]
    ticks = [f"{run['sharing_length']}\n({describe_layers(run['sharing_layers'])})" for run in result["runs"]]
    panels = [(title, [row for row in rows if row["higher_is_better"] == higher])
              for title, higher in (("accuracies (%)", True), ("perplexities (lower is better)", False))]
    panels = [(title, chosen) for title, chosen in panels if chosen]
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    for ax, (title, chosen) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        for row in chosen:
            style = dict(color="black", linestyle="--", linewidth=2) if row["label"] == "Average" else {}
            ax.plot(lengths, row["values"], marker="o", label=row["label"], **style)
        ax.set_title(title)
        ax.set_xlabel("sharing length (layers sharing)")
        ax.set_xticks(lengths, ticks)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(Path(result["metadata"]["model"]).name)
    fig.savefig(path, dpi=120)


# ---- command line ----------------------------------------------------------------------------------


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sharing-lengths takes layer counts like 0,3,5, got {text!r}") from None
    if any(length < 0 for length in lengths):
        raise argparse.ArgumentTypeError(f"sharing lengths are layer counts, 0 or more; got {text!r}")
    return sorted(set(lengths))


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return list(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="an exported EPAS folder")
    parser.add_argument("--sharing-lengths", type=_lengths, required=True,
                        help="layer counts from the deep end of the trained region, e.g. 0,3,5")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="count lengths over layers 1..N-1 instead of the trained region")
    parser.add_argument("--sharing-mode", choices=("qk", "kv"),
                        help="run the sharing layers in this mode (default: the model's); another mode than the "
                             "trained one needs --allow-untrained")
    parser.add_argument("--tasks", type=_names, default=[], help="lm-eval task or group names, e.g. piqa,arc_easy")
    parser.add_argument("--include-path", type=Path, action="append", default=[],
                        help="a folder of local task YAMLs (repeatable)")
    parser.add_argument("--num-fewshot", type=int, help="default: each task's own (0 for most)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1): for quick checks only")
    parser.add_argument("--metrics", type=_names, default=list(DEFAULT_METRICS),
                        help="metric preference per task row, first reported wins (default: acc_norm,acc)")
    parser.add_argument("--valid-data", help="PREFIX of a .bin/.idx dataset: adds its perplexity")
    parser.add_argument("--seq-length", type=int, help="perplexity window (default: the model's "
                        "max_position_embeddings)")
    parser.add_argument("--valid-tokens", type=int, help="use only the first N tokens of --valid-data")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: MODEL_DIR)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    cli.add_device_options(parser)
    parser.add_argument("--output", type=Path, help="output folder (default: evaluation/<MODEL_DIR name>)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.tasks and not args.valid_data:
        parser.error("nothing to evaluate: give --tasks, --valid-data or both")
    cli.refuse_below_one(parser, args, ("batch_size", "seq_length", "valid_tokens"))
    return cli.run(lambda: _evaluate_and_write(args, argv))


def _evaluate_and_write(args, argv: list[str]) -> None:
    result = evaluate(args, argv)
    output = args.output or Path("evaluation") / args.model.resolve().name
    output.mkdir(parents=True, exist_ok=True)
    (output / RESULTS).write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    (output / TABLE).write_text(table)
    plot(result, output / PLOT)
    print(table)
    for name in (TABLE, RESULTS, PLOT):
        print(output / name)


if __name__ == "__main__":
    sys.exit(main())
