"""Side-by-side speed of EPAS sharing fractions, with the FLOP model's prediction beside each.

    python tools/benchmark.py train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 \\
        --mode qk --device cpu --json bench.json

Every variant runs on the same model and batch; after a warm-up the variants are timed in
interleaved rounds (A B C, B C A, ...) and compared by their medians, so machine noise hits
them alike. ``measured_saving`` is ``1 - time / time_at_sharing_0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_patches import distributed
from megatron_patches.config import ConfigError, load_config
from megatron_patches.flops import deepest_layers, sharing_saving, training_flops_per_token
from megatron_patches.model import build_model


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sharing takes fractions like 0,0.25,0.5, got {text!r}")
    if not fractions or any(not 0 <= f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"sharing fractions must lie in [0, 1), got {text!r}")
    return fractions


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_benchmark(args) -> list[dict]:
    overrides = [f"device={args.device}", f"epas.mode={args.mode}", *args.overrides]
    run = load_config(args.config, overrides)
    distributed.initialize(run)
    model = build_model(run)
    seq = args.seq_length or run.model.seq_length
    tokens = torch.randint(0, run.model.vocab_size, (args.micro_batch, seq))
    positions = torch.arange(seq).expand_as(tokens)
    if args.device == "cuda":
        model, tokens, positions = model.cuda(), tokens.cuda(), positions.cuda()

    fractions = sorted(set([0.0, *args.sharing]))
    layers = {f: deepest_layers(run.model.num_layers, f) for f in fractions}

    def step(fraction: float) -> float:
        model.set_sharing_layers(layers[fraction])
        model.zero_grad(set_to_none=True)
        _synchronize(args.device)
        start = time.perf_counter()
        model(tokens, positions, None, labels=tokens).mean().backward()
        _synchronize(args.device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for fraction in fractions:
            step(fraction)
    times = {f: [] for f in fractions}
    for round_index in range(args.rounds):
        shift = round_index % len(fractions)
        for fraction in fractions[shift:] + fractions[:shift]:
            times[fraction].append(step(fraction))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    base = statistics.median(times[0.0])
    records = []
    for fraction in fractions:
        median = statistics.median(times[fraction])
        predicted = sharing_saving(run.model, layers[fraction], args.mode, seq_length=seq)
        measured = 1 - median / base
        flops = training_flops_per_token(run.model, layers[fraction], args.mode, seq) * tokens.numel()
        records.append(
            {
                "sharing_fraction": fraction,
                "sharing_layers": list(layers[fraction]),
                "mode": args.mode,
                "step_time_s": median,
                "step_times_s": times[fraction],
                "tokens_per_s": tokens.numel() / median,
                "tflops_per_s": flops / median / 1e12,
                "predicted_saving": predicted,
                "measured_saving": measured,
                "measured_over_predicted": measured / predicted if predicted else None,
            }
        )
    return records


def _print_table(records: list[dict]) -> None:
    print(f"{'sharing':>8} {'layers':>7} {'step s':>9} {'tok/s':>9} {'TFLOP/s':>8} "
          f"{'predicted':>10} {'measured':>9} {'ratio':>6}")
    for r in records:
        ratio = "-" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
        print(
            f"{r['sharing_fraction']:>8.2f} {len(r['sharing_layers']):>7d} {r['step_time_s']:>9.4f} "
            f"{r['tokens_per_s']:>9.0f} {r['tflops_per_s']:>8.3f} {r['predicted_saving']:>10.2%} "
            f"{r['measured_saving']:>9.2%} {ratio:>6}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="forward+backward step time per sharing fraction")
    train.add_argument("--config", required=True, help="a preset from configs/")
    train.add_argument("--sharing", type=_fractions, default=[0.0, 0.25, 0.5],
                       help="comma-separated fractions of layers sharing, deepest first")
    train.add_argument("--mode", choices=("qk", "kv"), default="qk")
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train.add_argument("--micro-batch", type=int, default=2)
    train.add_argument("--seq-length", type=int, default=None, help="default: the model's")
    train.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    train.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    train.add_argument("--json", type=Path, help="write the records here")
    train.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)

    try:
        records = train_benchmark(args)
    except ConfigError as error:
        parser.error(str(error))
    _print_table(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
