"""Where a training step's time goes: torch-profiler tables of EPAS at 0% and at one sharing fraction.

    python tools/profile_train.py --config configs/tinyllama_1.1b.yaml --device cuda --spec local \\
        --micro-batch 4 --sharing 0.5 --mode qk --output profile_1.1b.txt

The step is the one ``tools/benchmark.py train`` times (forward + backward of one micro-batch, one
device, the preset's parallel layout reset to one device). After a warm-up, a few steps of each
sharing set run under ``torch.profiler``; the tables list the operators with the most device time
(CPU time on a CPU run), self time only, so that the rows add up to the step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.timing import write_report
from benchmarks.train import SINGLE_DEVICE
from epas import cli
from epas.config import load_config
from epas.sharing import deepest_layers
from megatron_patches.fusions import describe, fusions_of
from megatron_patches.model import build_model, in_training_precision, transformer_config
from megatron_training import distributed


def _sharing_fraction(text: str) -> float:
    fraction = float(text)
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"--sharing takes one fraction in (0, 1), got {text!r}")
    return fraction


def profile_steps(args) -> str:
    """The report: a header, then per sharing set its median step time and its top operators."""
    options = [f"device={args.device}", f"spec={args.spec}", f"epas.mode={args.mode}"]
    run = load_config(args.config, [*SINGLE_DEVICE, *options, *args.overrides])
    distributed.initialize(run)
    try:
        config = transformer_config(run)
        epas = build_model(run, config).to(run.device)
        model = in_training_precision(epas, config)  # as the trainer runs it
        cuda = run.device == "cuda"
        seq = run.model.seq_length
        tokens = torch.randint(0, run.model.vocab_size, (args.micro_batch, seq), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(run.device)
        positions = torch.arange(seq, device=tokens.device).expand_as(tokens)

        def step() -> float:
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(tokens, positions, None, labels=tokens).mean().backward()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        m = run.model
        lines = [
            f"{Path(args.config).stem}: {m.num_layers} layers, hidden {m.hidden_size}, seq {seq}, micro-batch "
            f"{args.micro_batch}, {run.spec} spec, {config.params_dtype}, {run.device}"
            f" ({torch.cuda.get_device_name() if cuda else 'CPU'}), torch {torch.__version__}",
            describe(fusions_of(config), run.device),
        ]
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        for fraction in (0.0, args.sharing):
            layers = deepest_layers(m.num_layers, fraction)
            epas.set_sharing_layers(layers)
            for _ in range(args.warmup):
                step()
            with profile(activities=activities) as profiler:
                times = sorted(step() for _ in range(args.steps))
            lines += [
                "",
                f"== {args.mode} {fraction:.0%} (sharing layers {list(layers)}): median step "
                f"{times[len(times) // 2] * 1000:.1f} ms over {args.steps} profiled steps",
                profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows),
            ]
        return "\n".join(lines)
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset from configs/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--spec", choices=("local", "te"), default="local")
    parser.add_argument("--mode", choices=("qk", "kv"), default="qk")
    parser.add_argument("--sharing", type=_sharing_fraction, default=0.5, help="profiled beside 0%%")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per sharing set")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per sharing set")
    parser.add_argument("--rows", type=int, default=25, help="operators per table")
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    return cli.run(lambda: write_report(profile_steps(args), args.output))


if __name__ == "__main__":
    sys.exit(main())
