"""Speed of EPAS: training steps against stock Megatron-core, and decoding of exported models.

    python tools/benchmark.py train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 \\
        --mode qk,kv --json train.json
    python tools/benchmark.py train --config configs/llama2_7b.yaml --micro-batch 2 \\
        --peak-tflops 989 model.num_layers=8 device=cuda spec=te
    python tools/benchmark.py generate --model exports/tinyllama_epas --sharing 0,0.25,0.5 \\
        --batch 1,32 --prompt 512,2048 --new-tokens 128 --json generate.json
    python tools/benchmark.py generate --random-init configs/tinyllama_1.1b.yaml epas.mode=kv

Every variant of one run uses the same weights and inputs; after a warm-up the variants are
timed in interleaved rounds (A B C, B C A, ...) and compared by their medians, so that noise on
the machine hits them alike.

train: forward + backward of one micro-batch (no optimizer, no DDP) on a single device. Rows:
``stock`` (megatron-core's GPTModel with its own layer spec, no EPAS code, the EPAS model's
weights) and one EPAS model per mode at each sharing fraction (deepest layers first).
``measured_gain`` is the tokens/s gain over the same mode at 0%, ``predicted_gain`` the gain if
step time followed the FLOP model (``megatron_patches.flops``: FLOPs that sharing layers skip are
not counted as done). The summary gives the EPAS-at-0% overhead against stock (target: < 1%).

generate: greedy ``generate()`` of a Hugging Face EPAS folder (or a randomly initialised one),
with the prefill and the decode steps after it timed apart, and the cache's bytes checked against
the prediction: (L - s/2)/L of a LLaMA cache in ``qk`` mode, (L - s)/L in ``kv`` mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.gpt_model import GPTModel
from transformers.generation.streamers import BaseStreamer

from megatron_patches import distributed
from megatron_patches.config import ConfigError, RunConfig, load_config
from megatron_patches.flops import deepest_layers, mfu, training_flops_per_token
from megatron_patches.fusions import describe, fusions_of
from megatron_patches.hf_conversion import DTYPES, device_and_dtype, hf_config_from_model
from megatron_patches.model import build_model, transformer_config
from megatron_patches.scheduler import resolve_target_layers

# The benchmark is one process: presets laid out for several GPUs are run unsplit.
SINGLE_DEVICE = [
    "parallel.tensor_parallel=1",
    "parallel.pipeline_parallel=1",
    "parallel.virtual_pipeline=null",
    "parallel.sequence_parallel=false",
]


# ---- shared by both benchmarks ------------------------------------------------------------------


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sharing takes fractions like 0,0.25,0.5, got {text!r}")
    if not fractions or any(not 0 <= f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"sharing fractions must lie in [0, 1), got {text!r}")
    return sorted(set([0.0, *fractions]))  # 0% is every gain's baseline


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,32, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = list(dict.fromkeys(text.split(",")))
    if any(mode not in ("qk", "kv") for mode in modes):
        raise argparse.ArgumentTypeError(f"--mode takes qk, kv or qk,kv, got {text!r}")
    return modes


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


def _metadata(device: str, argv: list[str], model: str) -> dict:
    """What a figure needs to be reproduced: the machine, the versions, the command, the date."""
    return {
        "device": _device_name(device),
        "model": model,
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "command": shlex.join(["python", "tools/benchmark.py", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def interleaved(variants: list, measure, warmup: int, rounds: int) -> list[list]:
    """``measure(variant)`` results per variant over ``rounds`` rounds, each round shifted by one
    (A B C, B C A, ...) so that no variant always runs first or after the same neighbour."""
    for _ in range(warmup):
        for variant in variants:
            measure(variant)
    results = [[] for _ in variants]
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for index in [*range(shift, len(variants)), *range(shift)]:
            results[index].append(measure(variants[index]))
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def _gain(value: float, baseline: float) -> float:
    return value / baseline - 1


def _print_table(columns: list[tuple[str, str]], rows: list[dict]) -> None:
    """One line per row; ``columns`` are (key, format), ``None`` values print as '-'."""
    cells = [[key for key, _ in columns]]
    cells += [["-" if row[key] is None else format(row[key], fmt) for key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


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


def train_benchmark(args, argv: list[str]) -> dict:
    options = [f"{key}={value}" for key, value in (("device", args.device), ("spec", args.spec)) if value]
    run = load_config(args.config, [*SINGLE_DEVICE, *options, *args.overrides])
    distributed.initialize(run)
    try:
        return _train(run, args, argv)
    finally:
        distributed.shutdown()


def _train(run: RunConfig, args, argv: list[str]) -> dict:
    config = transformer_config(run)
    print(describe(fusions_of(config), run.device), file=sys.stderr, flush=True)
    epas_models = {}
    for mode in args.mode:
        epas_run = dataclasses.replace(run, epas=dataclasses.replace(run.epas, mode=mode))
        epas_models[mode] = build_model(epas_run, config).to(run.device)
    weights = epas_models[args.mode[0]].state_dict()
    for model in epas_models.values():
        model.load_state_dict(weights)
    variants = []
    if args.stock:
        stock = build_stock_model(run, config).to(run.device)
        stock.load_state_dict(weights)
        variants.append(TrainVariant("stock", stock, None, 0.0, ()))
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
            variant.model.set_sharing_layers(variant.sharing_layers)
        variant.model.zero_grad(set_to_none=True)
        _synchronize(run.device)
        start = time.perf_counter()
        loss = variant.model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        _synchronize(run.device)
        elapsed = time.perf_counter() - start
        losses.setdefault(variant.label, loss.item())
        return elapsed

    times = interleaved(variants, step, args.warmup, args.rounds)
    causal = run.spec == "te"  # flash attention skips the masked half; the trainer counts it so too
    records = _train_records(run, variants, times, losses, seq, causal, tokens.numel(), args.peak_tflops)
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
        "metadata": _metadata(run.device, argv, _model_label(args.config, run, seq, args.micro_batch)),
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
            "flops_causal": causal,
        },
        "records": records,
        "summary": summary,
    }


def _train_records(run, variants, times, losses, seq, causal, tokens_per_step, peak_tflops) -> list[dict]:
    """One row per variant; gains are against the same mode at 0% sharing."""
    records = []
    for variant, variant_times in zip(variants, times):
        median = statistics.median(variant_times)
        tokens_per_s = tokens_per_step / median
        flops = training_flops_per_token(run.model, variant.sharing_layers, variant.mode or "qk", seq, causal)
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
            measured = _gain(record["tokens_per_s"], base["tokens_per_s"])
            predicted = _gain(base["flops_per_token"], record["flops_per_token"])
        record.update(measured_gain=measured, predicted_gain=predicted,
                      ratio=measured / predicted if predicted else None)
    return records


def _report_train(result: dict) -> int:
    _print_table(
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


# ---- generate -----------------------------------------------------------------------------------


class _TokenClock(BaseStreamer):
    """The time of each put() of generate(): the prompt, then one per new token.

    generate() hands tokens over with ``.cpu()``, which waits for the device, so the gaps are
    the prefill (prompt to first token) and the decode steps after it.
    """

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def predicted_cache_bytes(config, num_sharing: int, tokens: int, batch: int, element_size: int) -> int:
    """Bytes of an EpasCache: compute layers hold K and V, QK-sharing layers V only, KV-sharing
    layers nothing; so (L - s/2)/L of a LLaMA cache in qk mode and (L - s)/L in kv mode."""
    layers = config.num_hidden_layers
    tensors = 2 * layers - num_sharing if config.sharing_mode == "qk" else 2 * (layers - num_sharing)
    return tensors * batch * config.num_key_value_heads * config.head_dim * tokens * element_size


def _random_model(source: str, overrides: list[str], dtype: torch.dtype, device: str):
    """An EPAS model with random weights: from a preset's model section (its EPAS target counts as
    the trained region) or from a Hugging Face ``config.json``. Built on the device: a 7B model
    initialised on the CPU would take minutes."""
    from epas_hf import EpasLlamaConfig, EpasLlamaForCausalLM

    if source.endswith(".json"):
        if overrides:
            raise ConfigError("config overrides apply to a preset (.yaml), not to a config.json")
        config = EpasLlamaConfig.from_json_file(source)
    else:
        run = load_config(source, overrides)
        target = resolve_target_layers(run.model.num_layers, run.epas)
        config = EpasLlamaConfig(**hf_config_from_model(run.model, (), run.epas.mode, target))
    with torch.device(device):
        return EpasLlamaForCausalLM(config).to(dtype)


def _load_model(args, dtype: torch.dtype, device: str):
    if args.random_init:
        torch.manual_seed(args.seed)
        model = _random_model(args.random_init, args.overrides, dtype, device)
        return model, f"{Path(args.random_init).stem} (random init)"
    if args.overrides:
        raise ConfigError("config overrides apply only to --random-init; an export's config is its config.json")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, sharing_layers=[], dtype=dtype)
    return model.to(device), args.model.name


def _check_trained(config, fractions: list[float], allow_untrained: bool) -> None:
    """Speed of a sharing set the model was not trained for is the speed of a worse model."""
    trained = config.trained_sharing_layers
    for fraction in fractions:
        outside = sorted(set(deepest_layers(config.num_hidden_layers, fraction)) - set(trained or ()))
        if outside and not allow_untrained:
            raise ConfigError(
                f"sharing {fraction:.0%} needs layers {outside}, outside the region this model was "
                f"trained to share ({'not recorded' if trained is None else trained}); lower --sharing, "
                "or pass --allow-untrained to time inference-time sharing anyway"
            )


def generate_benchmark(args, argv: list[str]) -> dict:
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, label = _load_model(args, dtype, device)
    model.eval()
    config = model.config
    _check_trained(config, args.sharing, args.allow_untrained)
    element_size = next(model.parameters()).element_size()
    generator = torch.Generator().manual_seed(args.seed)
    new_tokens = args.new_tokens

    def measure(case) -> dict:
        prompt, layers = case
        model.set_sharing_layers(layers)
        clock = _TokenClock()
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
            return_dict_in_generate=True,
        )
        if len(clock.times) != new_tokens + 1:
            raise RuntimeError(f"generate() made {len(clock.times) - 1} tokens, not {new_tokens}")
        return {
            "prefill_s": clock.times[1] - clock.times[0],
            "decode_s": clock.times[-1] - clock.times[1],
            "cache_bytes": output.past_key_values.nbytes(),
        }

    records = []
    for batch in args.batch:
        for prompt_length in args.prompt:
            print(f"batch {batch}, prompt {prompt_length}", file=sys.stderr, flush=True)
            prompt = torch.randint(0, config.vocab_size, (batch, prompt_length), generator=generator).to(device)
            cases = [(prompt, deepest_layers(config.num_hidden_layers, f)) for f in args.sharing]
            results = interleaved(cases, measure, args.warmup, args.rounds)
            records += _generate_rows(config, cases, results, args.sharing, new_tokens, element_size)
    return {
        "benchmark": "generate",
        "metadata": _metadata(device, argv, f"{label}, {config.num_hidden_layers} layers, "
                                            f"hidden {config.hidden_size}, {config.sharing_mode}"),
        "settings": {
            "source": str(args.model or args.random_init),
            "overrides": args.overrides,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "mode": config.sharing_mode,
            "trained_sharing_layers": config.trained_sharing_layers,
            "new_tokens": new_tokens,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "records": records,
    }


def _generate_rows(config, cases, results, fractions, new_tokens: int, element_size: int) -> list[dict]:
    """One row per sharing fraction of one (batch, prompt) case; gains are against 0% sharing."""
    rows = []
    for fraction, (prompt, layers), runs in zip(fractions, cases, results):
        batch, prompt_length = prompt.shape
        cached_tokens = prompt_length + new_tokens - 1  # the last new token is never fed back
        predicted = predicted_cache_bytes(config, len(layers), cached_tokens, batch, element_size)
        decode_s = statistics.median(r["decode_s"] for r in runs)
        prefill_s = statistics.median(r["prefill_s"] for r in runs)
        rows.append({
            "mode": config.sharing_mode,
            "sharing_fraction": fraction,
            "sharing_layers": list(layers),
            "batch": batch,
            "prompt": prompt_length,
            "new_tokens": new_tokens,
            "prefill_s": prefill_s,
            "prefill_times_s": [r["prefill_s"] for r in runs],
            "decode_s": decode_s,
            "decode_times_s": [r["decode_s"] for r in runs],
            "prefill_tokens_per_s": batch * prompt_length / prefill_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "cache_bytes": runs[-1]["cache_bytes"],
            "predicted_cache_bytes": predicted,
            "cache_fraction": predicted / predicted_cache_bytes(config, 0, cached_tokens, batch, element_size),
        })
    for row in rows:
        row["decode_gain"] = _gain(row["decode_tokens_per_s"], rows[0]["decode_tokens_per_s"])
        row["prefill_gain"] = _gain(row["prefill_tokens_per_s"], rows[0]["prefill_tokens_per_s"])
    return rows


def _report_generate(result: dict) -> int:
    _print_table(
        [("batch", "d"), ("prompt", "d"), ("sharing_fraction", ".0%"), ("prefill_s", ".4f"),
         ("decode_tokens_per_s", ".1f"), ("decode_gain", ".2%"), ("cache_bytes", "d"),
         ("predicted_cache_bytes", "d"), ("cache_fraction", ".4f")],
        result["records"],
    )
    wrong = [r for r in result["records"] if r["cache_bytes"] != r["predicted_cache_bytes"]]
    for r in wrong:
        print(f"ERROR: cache of {r['cache_bytes']} bytes, predicted {r['predicted_cache_bytes']} "
              f"(batch {r['batch']}, prompt {r['prompt']}, sharing {r['sharing_layers']})")
    if not wrong:
        print("cache bytes equal the prediction in every row")
    return 1 if wrong else 0


# ---- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sharing", type=_fractions, default=[0.0, 0.25, 0.5],
                        help="comma-separated fractions of layers sharing, deepest first (0 is always run)")
    common.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    common.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    common.add_argument("--json", type=Path, help="write metadata, settings and records here")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="forward+backward step per sharing fraction and stock")
    train.add_argument("--config", required=True, help="a preset from configs/")
    train.add_argument("--mode", type=_modes, default=["qk"], help="qk, kv or qk,kv (one EPAS model each)")
    train.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                       help="time megatron-core's stock GPTModel beside EPAS (default: on)")
    train.add_argument("--device", choices=("cpu", "cuda"), help="default: the preset's")
    train.add_argument("--spec", choices=("local", "te"), help="default: the preset's")
    train.add_argument("--micro-batch", type=int, default=2)
    train.add_argument("--seq-length", type=int, default=None, help="default: the model's")
    train.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (989: H100 dense bf16)")
    train.add_argument("overrides", nargs="*", help="config overrides, section.key=value")

    generate = commands.add_parser("generate", parents=[common],
                                   help="decode speed and cache bytes per sharing fraction")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a Hugging Face folder from convert_checkpoint.py megatron-to-hf")
    source.add_argument("--random-init", metavar="PRESET_OR_CONFIG_JSON",
                        help="random weights of a preset's model (or of a config.json): no export needed")
    generate.add_argument("--allow-untrained", action="store_true",
                          help="allow sharing layers outside the region the model was trained to share")
    generate.add_argument("--batch", type=_positive_ints, default=[1], help="e.g. 1,32")
    generate.add_argument("--prompt", type=_positive_ints, default=[512], help="prompt lengths, e.g. 512,2048")
    generate.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per sequence (at least 2)")
    generate.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    generate.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    generate.add_argument("--seed", type=int, default=0, help="for random weights and prompts")
    generate.add_argument("overrides", nargs="*", help="config overrides of a --random-init preset")
    generate.set_defaults(warmup=1, rounds=5)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.command == "generate" and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: one for the prefill, one or more to time decoding")
    benchmark, report = {
        "train": (train_benchmark, _report_train),
        "generate": (generate_benchmark, _report_generate),
    }[args.command]
    try:
        result = benchmark(args, argv)
    except ConfigError as error:
        parser.error(str(error))
    status = report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
