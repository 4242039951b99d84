"""Training-step speed of EPAS against stock Megatron-core (``tools/benchmark.py train``).

    python tools/benchmark.py train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 \\
        --mode qk,kv --json train.json
    python tools/benchmark.py train --config configs/llama2_7b.yaml --micro-batch 2 \\
        --peak-tflops 989 model.num_layers=8 device=cuda spec=te

Forward + backward of one micro-batch (no optimizer, no DDP) on a single device, in the precision
the trainer uses (bf16 models inside megatron-core's ``Float16Module``). Rows: ``stock``
(megatron-core's GPTModel with its own layer spec, no EPAS code, the EPAS model's weights) and one
EPAS model per mode at each sharing fraction (deepest layers first), timed in interleaved rounds
after a warm-up and compared by their medians. ``measured_gain`` is the tokens/s gain over the same
mode at 0%, ``predicted_gain`` the gain if step time followed the FLOP model (``epas.flops``: FLOPs
that sharing layers skip are not counted as done). The summary gives the EPAS-at-0% overhead
against stock (target: < 1%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.utils import unwrap_model

from benchmarks.timing import fractions, gain, interleaved, metadata, modes, print_table, synchronize
from epas import cli
from epas.config import RunConfig, load_config
from epas.flops import attention_counting, mfu, training_flops_per_token
from epas.sharing import deepest_layers
from megatron_patches.fusions import describe, fusions_of
from megatron_patches.model import build_model, in_training_precision, transformer_config
from megatron_training import distributed

# The benchmark is one process: presets laid out for several GPUs are run unsplit.
SINGLE_DEVICE = [
    "parallel.tensor_parallel=1",
    "parallel.pipeline_parallel=1",
    "parallel.virtual_pipeline=null",
    "parallel.sequence_parallel=false",
]


# ---- train --------------------------------------------------------------------------------------


def build_stock_model(run: RunConfig, config) -> GPTModel:
    """megatron-core's own GPTModel and layer spec, built like ``build_model`` builds EPAS."""
    if run.spec == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=run.model.padded_vocab_size(),
        max_sequence_length=run.model.seq_length,
        share_embeddings_and_output_weights=run.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=run.model.rotary_base,
    )


@dataclasses.dataclass
class TrainVariant:
    """One timed row: a model and the sharing set it runs with."""

    label: str
    model: torch.nn.Module
    mode: str | None  # None: the stock model
    fraction: float
    sharing_layers: tuple[int, ...]


def _model_label(config_path: str, run: RunConfig, seq: int, micro_batch: int) -> str:
    m = run.model
    return (f"{Path(config_path).stem}: {m.num_layers} layers, hidden {m.hidden_size}, seq {seq}, "
            f"micro-batch {micro_batch}, {run.spec} spec")


def train_benchmark(args, argv: list[str], program: str) -> dict:
    options = [f"{key}={value}" for key, value in (("device", args.device), ("spec", args.spec)) if value]
    run = load_config(args.config, [*SINGLE_DEVICE, *options, *args.overrides])
    distributed.initialize(run)
    try:
        return _train(run, args, argv, program)
    finally:
        distributed.shutdown()


def _train(run: RunConfig, args, argv: list[str], program: str) -> dict:
    config = transformer_config(run)
    print(describe(fusions_of(config), run.device), file=sys.stderr, flush=True)
    epas_models = {}
    for mode in args.mode:
        epas_run = dataclasses.replace(run, epas=dataclasses.replace(run.epas, mode=mode))
        epas_models[mode] = build_model(epas_run, config).to(run.device)
    weights = epas_models[args.mode[0]].state_dict()
    for mode, model in epas_models.items():
        model.load_state_dict(weights)
        epas_models[mode] = in_training_precision(model, config)  # as the trainer runs it
    variants = []
    if args.stock:
        stock = build_stock_model(run, config).to(run.device)
        stock.load_state_dict(weights)
        variants.append(TrainVariant("stock", in_training_precision(stock, config), None, 0.0, ()))
    for mode, model in epas_models.items():
        for fraction in args.sharing:
            layers = deepest_layers(run.model.num_layers, fraction)
            variants.append(TrainVariant(f"{mode} {fraction:.0%}", model, mode, fraction, layers))

    seq = args.seq_length or run.model.seq_length
    generator = torch.Generator().manual_seed(run.seed)
    tokens = torch.randint(0, run.model.vocab_size, (args.micro_batch, seq), generator=generator)
    positions = torch.arange(seq).expand_as(tokens)
    tokens, positions = tokens.to(run.device), positions.to(run.device)
    losses = {}  # every step of a variant has the same loss: the weights never change

    def step(variant: TrainVariant) -> float:
        if variant.mode is not None:
            unwrap_model(variant.model).set_sharing_layers(variant.sharing_layers)
        variant.model.zero_grad(set_to_none=True)
        synchronize(run.device)
        start = time.perf_counter()
        loss = variant.model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        synchronize(run.device)
        elapsed = time.perf_counter() - start
        losses.setdefault(variant.label, loss.item())
        return elapsed

    times = interleaved(variants, step, args.warmup, args.rounds)
    counting = attention_counting(run.spec)  # as the trainer counts
    records = _train_records(run, variants, times, losses, seq, counting, tokens.numel(), args.peak_tflops)
    baselines = {r["mode"]: r for r in records if r["model"] == "epas" and r["sharing_fraction"] == 0.0}
    summary = {}
    if args.stock:
        stock = records[0]
        summary = {
            "epas_overhead_vs_stock": {
                mode: base["step_time_s"] / stock["step_time_s"] - 1 for mode, base in baselines.items()
            },
            "loss_equal_to_stock": {mode: base["loss"] == stock["loss"] for mode, base in baselines.items()},
        }
    return {
        "benchmark": "train",
        "metadata": metadata(run.device, program, argv,
                             _model_label(args.config, run, seq, args.micro_batch)),
        "settings": {
            "config": args.config,
            "overrides": args.overrides,
            "model": dataclasses.asdict(run.model),
            "device": run.device,
            "spec": run.spec,
            "dtype": str(config.params_dtype).removeprefix("torch."),
            "fused_kernels": fusions_of(config),
            "seq_length": seq,
            "micro_batch": args.micro_batch,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "peak_tflops": args.peak_tflops,
            "flops_causal": counting["causal"],
            "flops_reuse_probabilities": counting["reuses_probabilities"],
        },
        "records": records,
        "summary": summary,
    }


def _train_records(run, variants, times, losses, seq, counting, tokens_per_step, peak_tflops) -> list[dict]:
    """One row per variant; gains are against the same mode at 0% sharing."""
    records = []
    for variant, variant_times in zip(variants, times):
        median = statistics.median(variant_times)
        tokens_per_s = tokens_per_step / median
        flops = training_flops_per_token(
            run.model, variant.sharing_layers, variant.mode or "qk", seq, **counting
        )
        records.append({
            "label": variant.label,
            "model": "stock" if variant.mode is None else "epas",
            "mode": variant.mode,
            "sharing_fraction": variant.fraction,
            "sharing_layers": list(variant.sharing_layers),
            "loss": losses[variant.label],
            "step_time_s": median,
            "step_times_s": variant_times,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": flops,
            "tflops_per_s": tokens_per_s * flops / 1e12,
            "mfu": mfu(tokens_per_s, flops, peak_tflops * 1e12) if peak_tflops else None,
        })
    baselines = {r["mode"]: r for r in records if r["model"] == "epas" and r["sharing_fraction"] == 0.0}
    for record in records:
        base = baselines.get(record["mode"])
        measured = predicted = None
        if base is not None:
            measured = gain(record["tokens_per_s"], base["tokens_per_s"])
            predicted = gain(base["flops_per_token"], record["flops_per_token"])
        record.update(measured_gain=measured, predicted_gain=predicted,
                      ratio=measured / predicted if predicted else None)
    return records


def _report_train(result: dict) -> int:
    print_table(
        [("label", "s"), ("step_time_s", ".4f"), ("tokens_per_s", ".0f"), ("tflops_per_s", ".3f"),
         ("mfu", ".1%"), ("predicted_gain", ".2%"), ("measured_gain", ".2%"), ("ratio", ".2f")],
        result["records"],
    )
    summary = result["summary"]
    if summary:
        overheads = ", ".join(f"{mode} {value:+.2%}" for mode, value in summary["epas_overhead_vs_stock"].items())
        equal = all(summary["loss_equal_to_stock"].values())
        print(f"EPAS at 0% against stock: {overheads} (target: within 1%); "
              f"same loss as stock: {'yes' if equal else 'NO'}")
    return 0


# ---- command line -------------------------------------------------------------------------------


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset from configs/")
    parser.add_argument("--sharing", type=fractions, default=[0.0, 0.25, 0.5],
                        help="comma-separated fractions of layers sharing, deepest first (0 is always run)")
    parser.add_argument("--mode", type=modes, default=["qk"], help="qk, kv or qk,kv (one EPAS model each)")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                        help="time megatron-core's stock GPTModel beside EPAS (default: on)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: the preset's")
    parser.add_argument("--spec", choices=("local", "te"), help="default: the preset's")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=None, help="default: the model's")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (989: H100 dense bf16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    parser.add_argument("--json", type=Path, help="write metadata, settings and records here")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    return parser


def main(argv=None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return cli.run(lambda: _run(args, argv, prog or "python -m benchmarks.train"))


def _run(args, argv: list[str], program: str) -> int:
    result = train_benchmark(args, argv, program)
    status = _report_train(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
