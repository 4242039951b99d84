"""Which layers should share? Pairwise redundancy of attention tensors and the cost of each sharing region.

    python tools/analyze_sharing.py MODEL_DIR --data PREFIX_OR_JSONL [--mode qk|kv|both] [--tokens N] \\
        [--output DIR]

MODEL_DIR is a plain Hugging Face LLaMA folder or an EPAS export; it is loaded with the installed
epas_hf classes, so no code from the folder runs. --data is the prefix of a ``.bin/.idx`` dataset
(tools/preprocess_data.py) or a jsonl/parquet file of texts (tokenized with the folder's tokenizer,
or --tokenizer, as preprocess_data.py does): held-out text, of which the first --tokens are used.

1. With sharing off, forward hooks measure for every pair of layers i < j how well layer j's own
   post-RoPE tensors are replaced by layer i's: the cosine of Q, K and V per key-value group, and the
   relative error of layer j's attention output when it takes layer i's Q/K (qk) or K/V (kv).
2. Every region an ``epas:`` section can ask for (1..--max-blocks blocks, with or without the last
   layer, each size) is switched on at inference and its perplexity measured, as tools/evaluate.py
   measures it (the same windows and code).
3. The recommended region is the one with the most sharing layers whose perplexity rises by at most
   --max-increase percent, the cheapest of those.

The output folder gets report.md (the recommendation as an ``epas:`` snippet with its cost and its
neighbours', the cost of every region, the most redundant pairs), results.json (every number) and
sharing_analysis.png (the pairwise heatmaps and perplexity increase against region length). See
docs/ANALYSIS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis.evaluate import (
    checked_tokens,
    data_prefix,
    load_model,
    package_version,
    read_tokens,
    token_windows,
    validation_loss,
)
from analysis.sharing_regions import candidates, neighbours, recommend, snippet, sources
from analysis.sharing_report import PLOT, plot, report
from analysis.sharing_statistics import SHARED_TENSORS, TENSORS, pair_statistics
from epas import cli
from epas.data.preprocess import JSONL_SUFFIXES, PARQUET_SUFFIX, ChunkEncoder, read_chunks
from epas.data.tokenizer import load_tokenizer
from epas.errors import ConfigError, InputError
from epas.hf_config import read_model_config
from epas_hf import foreign_code

REPORT, RESULTS = "report.md", "results.json"
MODES = {"qk": ("qk",), "kv": ("kv",), "both": ("qk", "kv")}
DEFAULT_SEQ_LENGTH = 2048  # cap on the default window (max_position_embeddings can be 128k)


# ---- data ------------------------------------------------------------------------------------------


def read_text_tokens(path: Path, max_tokens: int | None, vocab_size: int, tokenizer_dir: Path, text_key: str):
    """A jsonl or parquet file's documents tokenized as tools/preprocess_data.py does (no BOS, EOS
    after each), concatenated, cut at ``max_tokens``; the file is read only as far as needed."""
    if not path.is_file():
        raise InputError(f"--data {path} not found; pass a jsonl/parquet file or the prefix of a .bin/.idx dataset")
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except ConfigError as error:
        raise InputError(f"{error} (text data is tokenized with the model folder's tokenizer, or --tokenizer DIR)") \
            from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer in {tokenizer_dir} has no EOS token to end documents with; pass "
                         "--tokenizer DIR, or tokenize the data with tools/preprocess_data.py")
    encoder = ChunkEncoder(tokenizer, text_key, tokenizer.eos_token_id, np.int64)
    pieces, count = [], 0
    for chunk in read_chunks(path, text_key, 256):
        pieces.append(encoder(chunk).tokens)
        count += len(pieces[-1])
        if max_tokens is not None and count >= max_tokens:
            break
    tokens = np.concatenate(pieces)[:max_tokens] if pieces else np.zeros(0, dtype=np.int64)
    return checked_tokens(tokens, f"--data {path}", vocab_size)


def read_data(data: str, max_tokens: int | None, vocab_size: int, tokenizer_dir: Path, text_key: str) -> np.ndarray:
    if Path(data).suffix in (*JSONL_SUFFIXES, PARQUET_SUFFIX):
        return read_text_tokens(Path(data), max_tokens, vocab_size, tokenizer_dir, text_key)
    return read_tokens(data_prefix(data, "--data"), max_tokens, vocab_size, "--data")


# ---- the analysis ----------------------------------------------------------------------------------


def _matrix(values: torch.Tensor) -> list[list[float | None]]:
    """A [layers, layers] tensor as nested lists, None where i >= j (no pair)."""
    size = values.shape[0]
    return [[float(values[i, j]) if i < j else None for j in range(size)] for i in range(size)]


def _pairs(statistics, mode: str) -> dict:
    """The pairwise numbers of one mode: means over groups, and per group ([i][j][group])."""
    cosine = {name: statistics.cosine(name) for name in TENSORS}
    error = statistics.relative_error(mode)
    shared = torch.stack([cosine[name] for name in SHARED_TENSORS[mode]]).mean(0)  # [L, L, groups]
    return {
        "shared_tensors": list(SHARED_TENSORS[mode]),
        "cosine": _matrix(shared.mean(-1)),
        "cosine_per_tensor": {name: _matrix(values.mean(-1)) for name, values in cosine.items()},
        "attention_error": _matrix(statistics.total_relative_error(mode)),
        "cosine_per_group": shared.tolist(),
        "attention_error_per_group": error.tolist(),
    }


def _measure_regions(model, regions, windows, batch_size: int, mode: str, baseline: dict, pairs: dict,
                     progress: bool) -> list[dict]:
    """Perplexity of each region switched on at inference, as tools/evaluate.py computes it."""
    model.config.sharing_mode = mode
    measured = []
    for region in tqdm(regions, desc=f"{mode} regions", unit=" region", disable=not progress):
        model.set_sharing_layers(region.layers)
        loss = validation_loss(model, windows, batch_size)
        links = sources(region.layers)
        measured.append({
            "layers": list(region.layers),
            "num_sharing_layers": region.num_sharing_layers,
            "num_blocks": region.num_blocks,
            "include_last_layer": region.include_last_layer,
            "sources": {str(layer): source for layer, source in links.items()},
            "cosine": {str(layer): pairs["cosine"][source][layer] for layer, source in links.items()},
            "attention_error": {str(layer): pairs["attention_error"][source][layer] for layer, source in links.items()},
            "loss": loss["loss"],
            "perplexity": loss["perplexity"],
            "increase": loss["perplexity"] / baseline["perplexity"] - 1,
        })
    return measured


def analyze(model, windows: list[torch.Tensor], modes: tuple[str, ...], batch_size: int = 8, max_blocks: int = 2,
            max_increase: float = 0.1, progress: bool = True) -> dict:
    """Pair statistics, the cost of every candidate region and the recommendation, for each mode.
    The model keeps its sharing mode; it ends with sharing off."""
    original_mode, num_layers = model.config.sharing_mode, model.config.num_hidden_layers
    statistics = pair_statistics(model, windows, batch_size, modes, progress)
    model.set_sharing_layers([])
    baseline = validation_loss(model, windows, batch_size)
    regions = candidates(num_layers, max_blocks)
    results = {}
    try:
        with warnings.catch_warnings():  # regions outside an export's trained region are the point here
            warnings.filterwarnings("ignore", message="sharing_layers .* lie outside the region")
            for mode in modes:
                pairs = _pairs(statistics, mode)
                measured = _measure_regions(model, regions, windows, batch_size, mode, baseline, pairs, progress)
                chosen = recommend(measured, max_increase)
                results[mode] = {
                    "pairs": pairs,
                    "regions": measured,
                    "recommendation": chosen,
                    "neighbours": neighbours(chosen, measured) if chosen else [],
                    "snippet": snippet(chosen, mode, baseline["perplexity"]) if chosen else None,
                }
    finally:
        model.config.sharing_mode = original_mode
        model.set_sharing_layers([])
    return {"baseline": baseline, "tokens": statistics.tokens, "modes": results}


# ---- command line ----------------------------------------------------------------------------------


def _run(args, argv: list[str]) -> dict:
    config = read_model_config(args.model)  # a clear error for a missing or non-LLaMA folder, before loading
    seq_length = args.seq_length or min(config.get("max_position_embeddings", DEFAULT_SEQ_LENGTH), DEFAULT_SEQ_LENGTH)
    tokens = read_data(args.data, args.tokens, config["vocab_size"], args.tokenizer or args.model, args.json_key)
    windows = token_windows(tokens, seq_length)
    device, dtype = cli.device_and_dtype(args.device, args.dtype)
    foreign = foreign_code(args.model)
    if foreign:
        print(f"note: {args.model} holds code other than the installed epas_hf's ({', '.join(foreign)}); it is not "
              "run: the weights are analysed with the installed model classes", flush=True)
    modes = MODES[args.mode]
    print(f"loading {args.model} ({config['num_hidden_layers']} layers) on {device}; {len(tokens)} tokens in "
          f"{len(windows)} windows of {seq_length}; modes {', '.join(modes)}", flush=True)
    model = load_model(args.model, dtype, device)
    result = analyze(model, windows, modes, args.batch_size, args.max_blocks, args.max_increase / 100)
    result["metadata"] = {
        "model": str(args.model),
        "num_layers": config["num_hidden_layers"],
        "num_attention_heads": model.config.num_attention_heads,
        "num_key_value_heads": model.config.num_key_value_heads,
        "trained_sharing_layers": config.get("trained_sharing_layers"),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {name: package_version(name) for name in ("transformers", "torch")},
        "python": platform.python_version(),
        "command": shlex.join(["python", "tools/analyze_sharing.py", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result["settings"] = {"data": args.data, "tokens": args.tokens, "seq_length": seq_length,
                          "batch_size": args.batch_size, "mode": args.mode, "max_blocks": args.max_blocks,
                          "max_increase": args.max_increase / 100}
    return result


def write_outputs(result: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / RESULTS).write_text(json.dumps(result, indent=2))
    (output / REPORT).write_text(report(result))
    plot(result, output / PLOT)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="a Hugging Face LLaMA folder or an EPAS export")
    parser.add_argument("--data", required=True, metavar="PREFIX_OR_JSONL",
                        help="held-out text: a .bin/.idx prefix, or a .jsonl/.json/.parquet file")
    parser.add_argument("--mode", choices=tuple(MODES), default="qk", help="what sharing layers reuse (default: qk)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of --data to use (default: 32768)")
    parser.add_argument("--seq-length", type=int, help=f"window length (default: the model's "
                        f"max_position_embeddings, at most {DEFAULT_SEQ_LENGTH})")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--max-increase", type=float, default=10.0, metavar="PERCENT",
                        help="perplexity increase a recommended region may cost, in %% (default: 10)")
    parser.add_argument("--max-blocks", type=int, default=2, help="candidate regions of 1..N blocks (default: 2)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for text data (default: MODEL_DIR)")
    parser.add_argument("--json-key", default="text", help="the text field of jsonl/parquet data (default: text)")
    cli.add_device_options(parser)
    parser.add_argument("--output", type=Path, help="output folder (default: sharing_analysis/<MODEL_DIR name>)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    cli.refuse_below_one(parser, args, ("tokens", "seq_length", "batch_size", "max_blocks"))
    if args.max_increase < 0:
        parser.error("--max-increase is a percentage, 0 or more")
    return cli.run(lambda: _run_and_write(args, argv))


def _run_and_write(args, argv: list[str]) -> None:
    result = _run(args, argv)
    output = args.output or Path("sharing_analysis") / args.model.resolve().name
    write_outputs(result, output)
    for mode, found in result["modes"].items():
        print(f"{mode}: " + (found["snippet"] if found["snippet"] else "no region within the perplexity budget\n"),
              end="")
    for name in (REPORT, RESULTS, PLOT):
        print(output / name)


if __name__ == "__main__":
    sys.exit(main())
