"""Where a decode step's time goes: torch-profiler tables of LlamaForCausalLM, EPAS at 0% and EPAS sharing.

    python -m benchmarks.profile_generate --random-init configs/llama_125m.yaml --batch 32 --prompt 2048 \\
        --sharing 0.5 --mode qk --output profile_generate_125m.txt

Each row is timed on the same weights and prompt: the prompt is prefilled (not profiled), then ``--steps``
single-token forward passes with the cache run under ``torch.profiler`` after ``--warmup`` untimed ones (the work of
one ``generate()`` step, without its sampling); with ``--cache static``, greedy steps of ``GraphedGreedy`` (a
preallocated cache, on a GPU each step replayed from its CUDA graph), whose kernels are the whole step. The report
gives each row's median step time, the number of kernels (GPU) or operators (CPU) one step launches, and the
operators with the most self time, so per-step host overhead (launches, Python, mask building) shows beside the
attention and matmul time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.generate import _select, add_cache_option, llama_twin, random_model, variants
from benchmarks.static_decoding import GraphedGreedy
from benchmarks.timing import modes, synchronize, write_report
from epas import cli
from epas_hf.modeling_epas_llama import CACHE_KEYWORD


def _fraction(text: str) -> float:
    fraction = float(text)
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"--sharing takes one fraction in (0, 1), got {text!r}")
    return fraction


def prefill(net, prompt: torch.Tensor):
    """The prompt's forward: its cache and the first new token."""
    with torch.no_grad():
        output = net(prompt, use_cache=True)
    return getattr(output, CACHE_KEYWORD), output.logits[:, -1:].argmax(-1)


def timed_steps(step, count: int, device: str) -> list[float]:
    """The time of each of ``count`` calls of ``step`` (one decode step each), the device synchronized around it."""
    times = []
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def greedy_step(net, cache, token: torch.Tensor):
    """A one-token forward with the cache, the greedy token fed to the next call: the work of a generate() step."""
    def step():
        nonlocal token
        with torch.no_grad():
            token = net(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return step


def graphed_step(net, prompt: torch.Tensor, steps: int):
    """One greedy step of a GraphedGreedy prefilled with ``prompt``, with room for ``steps`` steps: on a GPU, the
    replay of its CUDA graph."""
    batch, length = prompt.shape
    decoder = GraphedGreedy(net, batch, length + steps + 1, steps + 1)
    decoder.reset()
    decoder.prefill(prompt)
    return functools.partial(decoder.decode, 1)


def profile_decoding(args) -> str:
    device, dtype = cli.device_and_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    model = random_model(args.random_init, args.overrides, dtype, device).eval()
    llama = llama_twin(model)
    rows = variants(model, llama, model.config, [0.0, args.sharing], args.mode)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    config = model.config
    lines = [f"{Path(args.random_init).stem}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"batch {args.batch}, prompt {args.prompt}, {args.cache} cache, {str(dtype).removeprefix('torch.')}, "
             f"{device} "
             f"({torch.cuda.get_device_name() if cuda else 'CPU'}), torch {torch.__version__}"]
    for row in rows:
        _select(row)
        if args.cache == "static":
            step = graphed_step(row["net"], prompt, args.warmup + args.steps)
        else:
            step = greedy_step(row["net"], *prefill(row["net"], prompt))
        timed_steps(step, args.warmup, device)
        with profile(activities=activities) as profiler:
            times = timed_steps(step, args.steps, device)
        del step  # and with it the row's cache, before the next row's prefill
        events = profiler.key_averages()
        launches = sum(e.count for e in events if e.device_type.name == "CUDA") if cuda else sum(
            e.count for e in events if e.key.startswith("aten::"))
        lines += [
            "",
            f"== {row['label']} (sharing layers {list(row['layers'])}): median decode step "
            f"{statistics.median(times) * 1000:.2f} ms over {args.steps} steps; "
            f"{launches / args.steps:.0f} {'kernels' if cuda else 'aten operators'} per step",
            events.table(sort_by=sort_by, row_limit=args.rows),
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-init", required=True, metavar="PRESET", help="random weights of a preset's model")
    parser.add_argument("--sharing", type=_fraction, default=0.5, help="profiled beside 0%% and LLaMA")
    parser.add_argument("--mode", type=modes, default=["qk"], help="qk, kv or qk,kv")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=2048)
    add_cache_option(parser)
    parser.add_argument("--steps", type=int, default=8, help="profiled decode steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps per row")
    parser.add_argument("--rows", type=int, default=20, help="operators per table")
    parser.add_argument("--seed", type=int, default=0)
    cli.add_device_options(parser)
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument("overrides", nargs="*", help="config overrides of the preset, section.key=value")
    args = parser.parse_args(argv)
    return cli.run(lambda: write_report(profile_decoding(args), args.output))


if __name__ == "__main__":
    sys.exit(main())
