"""Decoding speed of the EPAS transformers model, against transformers' own LlamaForCausalLM.

    python -m benchmarks.generate --random-init configs/tinyllama_1.1b.yaml --batch 1,32 \\
        --prompt 512,2048 --new-tokens 128 --json generate.json
    python -m benchmarks.generate --model exports/tinyllama_epas --sharing 0,0.25,0.5 --mode qk,kv
    python tools/benchmark.py generate ...   (the same command)

Needs torch, transformers and pyyaml (for a preset) only: no megatron-core, so it runs on a
machine that has only those. ``--model`` loads an export with the installed epas_hf classes, so
none of the folder's code runs (and the code measured is the code installed); a folder with other
code loads only with ``--trust-remote-code``.

For each (batch, prompt) case, greedy ``generate()`` of 128 (``--new-tokens``) tokens is timed with
the prefill and the decode steps after it apart (``--cache static``: greedy decoding with
preallocated caches, each decode step replayed from a CUDA graph, benchmarks/static_decoding.py),
for these rows, in interleaved rounds after an untimed warm-up (the same calls): ``llama``
(transformers' LlamaForCausalLM with the same weights: an EPAS model at 0% sharing is a plain LLaMA,
so this row is the anchor EPAS at 0% must match), ``epas 0%``, and each sharing fraction (deepest
layers first) in each mode. Gains are against ``epas 0%``. Each row's cache bytes are checked
against the prediction, (L - s/2)/L of a LLaMA cache in ``qk`` mode and (L - s)/L in ``kv`` mode,
and on a GPU the peak memory of the call is recorded; ``memory_bound_gain`` is the gain if a step's
time followed the bytes it reads (`predicted_step_bytes`). The JSON is rewritten after every case,
so a run cut short keeps what it measured; ``--time-budget`` skips the cases that would start after
it (never the first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from benchmarks.static_decoding import GraphedGreedy
from benchmarks.timing import (
    fractions,
    gain,
    interleaved,
    metadata,
    modes,
    positive_ints,
    print_table,
    synchronize,
)
from epas_hf import EpasLlamaConfig, EpasLlamaForCausalLM, foreign_code
from epas_hf.modeling_epas_llama import CACHE_KEYWORD
from epas import cli
from epas.config import load_config
from epas.errors import ConfigError, InputError
from epas.hf_config import hf_config_from_model
from epas.scheduler import resolve_target_layers
from epas.sharing import deepest_layers

EPAS_KEYS = ("sharing_layers", "sharing_mode", "trained_sharing_layers")
OWN_MODEL_TYPES = (EpasLlamaConfig.model_type, "llama")  # folders the installed EPAS classes load


class TokenClock(BaseStreamer):
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


def predicted_cache_bytes(config, num_sharing: int, mode: str, tokens: int, batch: int, element_size: int) -> int:
    """Bytes of an EpasCache: compute layers hold K and V, QK-sharing layers V only, KV-sharing
    layers nothing; so (L - s/2)/L of a LLaMA cache in qk mode and (L - s)/L in kv mode."""
    layers = config.num_hidden_layers
    tensors = 2 * layers - num_sharing if mode == "qk" else 2 * (layers - num_sharing)
    return tensors * batch * config.num_key_value_heads * config.head_dim * tokens * element_size


def predicted_step_bytes(config, num_sharing: int, mode: str, tokens: int, batch: int, element_size: int) -> int:
    """Bytes one decode step reads over a context of `tokens`: each layer's weights but the projections its sharing
    skips (q and k in qk mode, k and v in kv mode), the final norm and the LM head (the embedding lookup reads one
    row per sequence), and the cache: a compute layer's keys and values, a QK-sharing layer's values alone (it weighs
    them with its source's probabilities), a KV-sharing layer's source keys and values once more. Where a step is
    bound by memory, which is how decoding runs once the host no longer sets the pace, its time follows this."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    query, key = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = 2 * hidden * query + 2 * hidden * key + 3 * hidden * ffn + 2 * hidden
    skipped = hidden * (query + key if mode == "qk" else 2 * key)
    weights = config.num_hidden_layers * layer - num_sharing * skipped + hidden + config.vocab_size * hidden
    cache_tensors = 2 * config.num_hidden_layers - (num_sharing if mode == "qk" else 0)
    return (weights + cache_tensors * batch * key * tokens) * element_size


def cache_nbytes(cache) -> int:
    """Bytes of the keys and values a cache holds (an EPAS cache, or transformers' DynamicCache or StaticCache)."""
    held = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values"))
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))


def random_model(source: str, overrides: list[str], dtype: torch.dtype, device: str) -> EpasLlamaForCausalLM:
    """An EPAS model with random weights: from a preset's model section (its EPAS target counts as
    the trained region; the preset is read by the recipe's config loader, which needs only pyyaml)
    or from a Hugging Face ``config.json``. Built on the device: a 7B model initialised on the CPU
    would take minutes."""
    if source.endswith(".json"):
        if overrides:
            raise ConfigError("config overrides apply to a preset (.yaml), not to a config.json")
        config = EpasLlamaConfig.from_json_file(source)
    else:
        run = load_config(source, overrides)
        target = resolve_target_layers(run.model.num_layers, run.epas)
        config = EpasLlamaConfig(**hf_config_from_model(run.model, (), run.epas.mode, target))
    config.sharing_layers = []
    with torch.device(device):
        return EpasLlamaForCausalLM(config).to(dtype)


def load_model(args, dtype: torch.dtype, device: str) -> tuple[EpasLlamaForCausalLM, str]:
    if args.random_init:
        torch.manual_seed(args.seed)
        return random_model(args.random_init, args.overrides, dtype, device), f"{Path(args.random_init).stem} (random init)"
    if args.overrides:
        raise ConfigError("config overrides apply only to --random-init; an export's config is its config.json")
    return load_folder(args.model, args.trust_remote_code, dtype).to(device), args.model.name


def load_folder(folder: Path, trust_remote_code: bool, dtype: torch.dtype):
    """An export of this recipe (or a plain LLaMA folder) through the installed epas_hf classes, so no code
    from the folder runs; any other folder, or one whose model code differs from the installed epas_hf's,
    only with ``trust_remote_code`` (then transformers loads it as it would, running the folder's code)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{config_file} not found: --model takes a Hugging Face folder, e.g. from "
                         "tools/convert_checkpoint.py megatron-to-hf")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise InputError(f"{config_file} is not a Hugging Face config ({error})") from error
    foreign = foreign_code(folder)
    if model_type in OWN_MODEL_TYPES and not foreign:
        return EpasLlamaForCausalLM.from_pretrained(folder, sharing_layers=[], dtype=dtype)
    if not trust_remote_code:
        found = f"code other than the installed epas_hf's ({', '.join(foreign)})" if foreign else (
            f"a model of type {model_type!r}, not an EPAS export")
        raise InputError(
            f"{folder} holds {found}; loading it would run that code. Pass --trust-remote-code if you trust "
            "it; an export written by this version of tools/convert_checkpoint.py loads without it")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, sharing_layers=[], dtype=dtype)


def llama_twin(model: EpasLlamaForCausalLM) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM with the EPAS model's weights (the same names and shapes),
    on the same device and in the same dtype, with SDPA attention."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in EPAS_KEYS}
    fields.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config = LlamaConfig.from_dict(fields, attn_implementation="sdpa")
    parameter = next(model.parameters())
    with torch.device(parameter.device):
        llama = LlamaForCausalLM(config).to(parameter.dtype)
    llama.load_state_dict(model.state_dict())
    return llama.eval()


def check_trained(config, chosen: list[float], allow_untrained: bool) -> None:
    """Speed of a sharing set the model was not trained for is the speed of a worse model."""
    trained = config.trained_sharing_layers
    for fraction in chosen:
        outside = sorted(set(deepest_layers(config.num_hidden_layers, fraction)) - set(trained or ()))
        if outside and not allow_untrained:
            raise ConfigError(
                f"sharing {fraction:.0%} needs layers {outside}, outside the region this model was "
                f"trained to share ({'not recorded' if trained is None else trained}); lower --sharing, "
                "or pass --allow-untrained to time inference-time sharing anyway"
            )


def variants(model, llama, config, chosen_fractions, chosen_modes) -> list[dict]:
    """The timed rows: the LLaMA anchor (if any), EPAS at 0%, then each mode at each fraction."""
    rows = [] if llama is None else [dict(label="llama", model="llama", net=llama, mode=None, fraction=0.0, layers=())]
    rows.append(dict(label="epas 0%", model="epas", net=model, mode=None, fraction=0.0, layers=()))
    for mode in chosen_modes:
        for fraction in chosen_fractions[1:]:
            layers = deepest_layers(config.num_hidden_layers, fraction)
            rows.append(dict(label=f"{mode} {fraction:.0%}", model="epas", net=model, mode=mode, fraction=fraction,
                             layers=layers))
    return rows


def _select(variant: dict) -> None:
    """Put the EPAS model in the row's sharing set (0%: no layer shares, whatever the mode)."""
    if variant["model"] == "epas":
        net = variant["net"]
        net.config.sharing_mode = variant["mode"] or net.config.sharing_mode
        net.set_sharing_layers(variant["layers"])


def generate_benchmark(args, argv: list[str], program: str) -> dict:
    device, dtype = cli.device_and_dtype(args.device, args.dtype)
    model, label = load_model(args, dtype, device)
    model.eval()
    config = model.config
    check_trained(config, args.sharing, args.allow_untrained)
    llama = llama_twin(model) if args.anchor else None
    element_size = next(model.parameters()).element_size()
    generator = torch.Generator().manual_seed(args.seed)
    rows = variants(model, llama, config, args.sharing, args.mode)
    on_gpu = device == "cuda"

    decoders = {}  # --cache static: one GraphedGreedy per row, for the current (batch, prompt) case

    def generate_call(variant: dict, prompt: torch.Tensor) -> tuple[float, float, object]:
        """generate(): the prefill and the decode steps timed apart by the streamer."""
        clock = TokenClock()
        output = variant["net"].generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
            return_dict_in_generate=True,
        )
        if len(clock.times) != args.new_tokens + 1:
            raise RuntimeError(f"generate() made {len(clock.times) - 1} tokens, not {args.new_tokens}")
        return clock.times[1] - clock.times[0], clock.times[-1] - clock.times[1], getattr(output, CACHE_KEYWORD)

    def static_call(variant: dict, prompt: torch.Tensor) -> tuple[float, float, object]:
        """GraphedGreedy: its prefill, then the decode steps replayed from the row's CUDA graph."""
        decoder = decoders.get(variant["label"])
        if decoder is None:
            batch, length = prompt.shape
            decoder = decoders[variant["label"]] = GraphedGreedy(variant["net"], batch, length + args.new_tokens - 1,
                                                                 args.new_tokens)
        decoder.reset()
        synchronize(device)
        start = time.perf_counter()
        decoder.prefill(prompt)
        synchronize(device)
        prefilled = time.perf_counter()
        decoder.decode(args.new_tokens - 1)
        synchronize(device)
        end = time.perf_counter()
        if decoder.tokens().shape[1] != args.new_tokens:
            raise RuntimeError(f"the static decoder made {decoder.tokens().shape[1]} tokens, not {args.new_tokens}")
        return prefilled - start, end - prefilled, decoder.cache

    call = static_call if args.cache == "static" else generate_call

    def measure(case) -> dict:
        variant, prompt = case
        _select(variant)
        synchronize(device)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if on_gpu else 0
        prefill_s, decode_s, cache = call(variant, prompt)
        peak = torch.cuda.max_memory_allocated() if on_gpu else None
        return {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "cache_bytes": cache_nbytes(cache),
            "peak_memory_bytes": peak,
            "generate_memory_bytes": None if peak is None else peak - resident,
        }

    result = {
        "benchmark": "generate",
        "metadata": metadata(device, program, argv, f"{label}, {config.num_hidden_layers} layers, "
                                                    f"hidden {config.hidden_size}, {dtype_name(dtype)}"),
        "settings": {
            "source": str(args.model or args.random_init),
            "model_code": type(model).__module__,
            "overrides": args.overrides,
            "device": device,
            "dtype": dtype_name(dtype),
            "modes": args.mode,
            "cache": args.cache,
            "anchor": args.anchor,
            "trained_sharing_layers": config.trained_sharing_layers,
            "new_tokens": args.new_tokens,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "time_budget_s": args.time_budget,
        },
        "records": [],
        "skipped": [],
        "complete": False,
    }
    start = time.perf_counter()
    for batch in args.batch:
        for prompt_length in args.prompt:
            late = args.time_budget is not None and time.perf_counter() - start > args.time_budget
            if late and result["records"]:
                result["skipped"].append({"batch": batch, "prompt": prompt_length})
                print(f"batch {batch}, prompt {prompt_length}: skipped (time budget)", file=sys.stderr, flush=True)
                continue
            print(f"batch {batch}, prompt {prompt_length}", file=sys.stderr, flush=True)
            prompt = torch.randint(0, config.vocab_size, (batch, prompt_length), generator=generator).to(device)
            cases = [(variant, prompt) for variant in rows]
            runs = interleaved(cases, measure, args.warmup, args.rounds)
            decoders.clear()  # the next case has other shapes: free this one's caches and graphs
            result["records"] += case_rows(config, rows, runs, batch, prompt_length, args.new_tokens, element_size)
            write_json(args.json, result)
    result["complete"] = True
    result["summary"] = summary(result["records"])
    write_json(args.json, result)
    return result


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_rows(config, rows, runs, batch: int, prompt_length: int, new_tokens: int, element_size: int) -> list[dict]:
    """One record per row of one (batch, prompt) case; gains are against EPAS at 0% sharing."""
    cached_tokens = prompt_length + new_tokens - 1  # the last new token is never fed back
    llama_cache = predicted_cache_bytes(config, 0, "qk", cached_tokens, batch, element_size)
    records = []
    for variant, measured in zip(rows, runs):
        sharing, mode = len(variant["layers"]), variant["mode"] or "qk"
        predicted = predicted_cache_bytes(config, sharing, mode, cached_tokens, batch, element_size)
        decode_s = statistics.median(r["decode_s"] for r in measured)
        prefill_s = statistics.median(r["prefill_s"] for r in measured)
        peaks = [r["peak_memory_bytes"] for r in measured if r["peak_memory_bytes"] is not None]
        records.append({
            "label": variant["label"],
            "model": variant["model"],
            "mode": variant["mode"],
            "sharing_fraction": variant["fraction"],
            "sharing_layers": list(variant["layers"]),
            "batch": batch,
            "prompt": prompt_length,
            "new_tokens": new_tokens,
            "prefill_s": prefill_s,
            "prefill_times_s": [r["prefill_s"] for r in measured],
            "decode_s": decode_s,
            "decode_times_s": [r["decode_s"] for r in measured],
            "prefill_tokens_per_s": batch * prompt_length / prefill_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "cache_bytes": measured[-1]["cache_bytes"],
            "predicted_cache_bytes": predicted,
            "cache_fraction": predicted / llama_cache,
            "step_bytes": predicted_step_bytes(config, sharing, mode, cached_tokens, batch, element_size),
            "peak_memory_bytes": max(peaks) if peaks else None,
            "generate_memory_bytes": max(r["generate_memory_bytes"] for r in measured) if peaks else None,
        })
    base = next(r for r in records if r["label"] == "epas 0%")
    for record in records:
        record["decode_gain"] = gain(record["decode_tokens_per_s"], base["decode_tokens_per_s"])
        record["prefill_gain"] = gain(record["prefill_tokens_per_s"], base["prefill_tokens_per_s"])
        record["memory_bound_gain"] = gain(base["step_bytes"], record["step_bytes"])
    return records


def summary(records: list[dict]) -> dict:
    """Per case: EPAS at 0% against the LLaMA anchor (target: within 2%) and whether every row's
    cache held the predicted bytes."""
    cases = {}
    for record in records:
        cases.setdefault((record["batch"], record["prompt"]), {})[record["label"]] = record
    anchor = []
    for (batch, prompt), rows in cases.items():
        if "llama" in rows:
            anchor.append({
                "batch": batch,
                "prompt": prompt,
                "decode_vs_llama": gain(rows["epas 0%"]["decode_tokens_per_s"], rows["llama"]["decode_tokens_per_s"]),
                "prefill_vs_llama": gain(rows["epas 0%"]["prefill_tokens_per_s"], rows["llama"]["prefill_tokens_per_s"]),
            })
    return {
        "epas_at_0_vs_llama": anchor,
        "epas_at_0_within_2_percent_of_llama": all(abs(a["decode_vs_llama"]) <= 0.02 for a in anchor) if anchor else None,
        "cache_bytes_as_predicted": all(r["cache_bytes"] == r["predicted_cache_bytes"] for r in records),
    }


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def report(result: dict) -> int:
    """The table and the checks; exit status 1 when a cache did not hold the predicted bytes."""
    print_table(
        [("batch", "d"), ("prompt", "d"), ("label", "s"), ("prefill_s", ".4f"), ("decode_tokens_per_s", ".1f"),
         ("decode_gain", ".2%"), ("memory_bound_gain", ".2%"), ("cache_bytes", "d"), ("predicted_cache_bytes", "d"), ("cache_fraction", ".4f"),
         ("peak_memory_bytes", "d")],
        result["records"],
    )
    for case in result["summary"]["epas_at_0_vs_llama"]:
        print(f"EPAS at 0% against LlamaForCausalLM, batch {case['batch']}, prompt {case['prompt']}: "
              f"decode {case['decode_vs_llama']:+.2%}, prefill {case['prefill_vs_llama']:+.2%} (target: within 2%)")
    for skipped in result["skipped"]:
        print(f"skipped by the time budget: batch {skipped['batch']}, prompt {skipped['prompt']}")
    wrong = [r for r in result["records"] if r["cache_bytes"] != r["predicted_cache_bytes"]]
    for r in wrong:
        print(f"ERROR: cache of {r['cache_bytes']} bytes, predicted {r['predicted_cache_bytes']} "
              f"({r['label']}, batch {r['batch']}, prompt {r['prompt']}, sharing {r['sharing_layers']})")
    if not wrong:
        print("cache bytes equal the prediction in every row")
    return 1 if wrong else 0


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="dynamic: generate()'s steps, every one launched from Python (default); static: "
                             "preallocated caches and each decode step replayed from a CUDA graph "
                             "(benchmarks/static_decoding.py), so that a step costs its kernels' time")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a Hugging Face folder from convert_checkpoint.py megatron-to-hf")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load a --model folder that holds model code other than the installed epas_hf's "
                             "(transformers' trust_remote_code: that code runs); not needed for this recipe's exports")
    source.add_argument("--random-init", metavar="PRESET_OR_CONFIG_JSON",
                        help="random weights of a preset's model (or of a config.json): no export needed")
    parser.add_argument("--sharing", type=fractions, default=[0.0, 0.25, 0.5],
                        help="comma-separated fractions of layers sharing, deepest first (0 is always run)")
    parser.add_argument("--mode", type=modes, default=["qk", "kv"], help="qk, kv or qk,kv (default: both)")
    parser.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                        help="time transformers' LlamaForCausalLM with the same weights (default: on)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="allow sharing layers outside the region the model was trained to share")
    parser.add_argument("--batch", type=positive_ints, default=[1], help="e.g. 1,32")
    parser.add_argument("--prompt", type=positive_ints, default=[512], help="prompt lengths, e.g. 512,2048")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per sequence (at least 2)")
    add_cache_option(parser)
    cli.add_device_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="for random weights and prompts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (the same generate() calls as the timed ones)")
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no (batch, prompt) case but the first after this many seconds")
    parser.add_argument("--json", type=Path, help="write metadata, settings and records here (after every case)")
    parser.add_argument("overrides", nargs="*", help="config overrides of a --random-init preset, section.key=value")


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: one for the prefill, one or more to time decoding")


def main(argv=None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return cli.run(lambda: _run(args, argv, prog or "python -m benchmarks.generate"))


def _run(args, argv: list[str], program: str) -> int:
    status = report(generate_benchmark(args, argv, program))
    if args.json:
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
