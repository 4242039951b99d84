"""Does EPAS do what the paper says? Its Tables 4 and 6 at small scale, on 2 CPU cores, in one command.

    python tools/reproduce.py --output results/reproduction [--seeds 1,2,3] [--jobs 2] [--publish docs]

It builds a corpus from the docstrings of Python's standard library (split into pretrain, cpt and held-out text),
pretrains an 8-layer LLaMA three ways with the same data, steps and seed (no sharing, EPAS qk, EPAS kv), continues
the model pretrained without sharing two ways on fresh text (EPAS qk, no sharing), exports every model and measures
its held-out perplexity at sharing lengths 0 to 4 (inference-time sharing for the models trained without EPAS),
for every seed. Then it writes RESULTS.md (the tables beside the paper's, loss curves, what holds and what does
not), results.json (every number of every run) and the figures into --output; --publish DIR copies the report
and its figures there (docs/ for the project's docs/RESULTS.md).

Every step is a command of the project's own tools (pretrain_epas.py, tools/convert_checkpoint.py,
tools/evaluate.py), logged under --output/logs. Interrupted (Ctrl-C, a lost machine), the same command resumes:
finished steps are kept and training goes on from its last checkpoint. The presets are configs/reproduce.yaml
and configs/reproduce_cpt.yaml; --pretrain-steps/--cpt-steps shorten the runs (the region still completes at the
same fraction of each run). See docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from analysis.reproduction import plan, report
from analysis.reproduction.results import write_json
from analysis.reproduction.runner import Runner, format_duration
from epas import cli
from epas.data.reproduction_corpus import build_reproduction_corpus
from epas.errors import InputError


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the corpus, runs and report")
    parser.add_argument("--seeds", type=_seeds, default=(1, 2, 3), help="comma-separated (default: 1,2,3)")
    parser.add_argument("--pretrain-steps", type=int, help="default: configs/reproduce.yaml's (200)")
    parser.add_argument("--cpt-steps", type=int, help="default: configs/reproduce_cpt.yaml's (100)")
    parser.add_argument("--held-out-tokens", type=int, help="evaluate on the first N held-out tokens only "
                        "(default: all of them)")
    parser.add_argument("--jobs", type=int, help="runs at a time, sharing the CPU cores (default: 2 where there "
                        "are 2 or more cores)")
    parser.add_argument("--publish", type=Path, help="also copy RESULTS.md and its figures into this folder")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    cli.refuse_below_one(parser, args, ("jobs", "held_out_tokens"))
    return cli.run(lambda: reproduce(args, argv))


def reproduce(args, argv: list[str]) -> None:
    started = time.monotonic()
    settings = plan.Settings(args.output.resolve(), args.seeds, args.pretrain_steps, args.cpt_steps,
                             args.held_out_tokens)
    plan.check_settings(settings)
    jobs = plan.jobs(settings)  # every run's configuration is loaded and checked here, before anything starts
    cores = len(os.sched_getaffinity(0))
    parallel = args.jobs or min(2, cores)
    layout = plan.Layout(settings.output)

    print(f"corpus: {layout.corpus}", flush=True)
    corpus = build_reproduction_corpus(layout.corpus, plan.preset("pretrain").model.vocab_size)
    check_budget(settings, corpus)
    Runner(jobs, settings.output, parallel, max(1, cores // parallel)).run()

    command = shlex.join(["python", "tools/reproduce.py", *argv])
    calls = record_call(settings.output, time.monotonic() - started)
    written = report.write(settings, corpus, command, calls)
    if args.publish:
        publish(written, args.publish)
    print(f"finished in {format_duration(time.monotonic() - started)}: {written[0]}", flush=True)


def check_budget(settings: plan.Settings, corpus: dict) -> None:
    """Each run reads less than one epoch of its split, so no run sees a sample twice."""
    for stage, split in (("pretrain", "pretrain"), ("cpt", "cpt")):
        config = plan.resolved(settings, plan.Run(stage, "none", settings.seeds[0]))
        tokens = plan.tokens_per_run(config)
        train_share = int(config.data.split.split(",")[0]) / sum(int(part) for part in config.data.split.split(","))
        available = corpus["splits"][split]["tokens"] * train_share
        if tokens > available:
            raise InputError(f"the {stage} runs would read {tokens:,} tokens but the {split} split has "
                             f"{available:,.0f} to train on: they would repeat data; lower the steps")


def record_call(output: Path, seconds: float) -> list[float]:
    """The wall time of every call that worked on this folder, this one appended: a resumed reproduction reports
    the time all its calls took together."""
    path = output / "state" / "calls.json"
    calls = json.loads(path.read_text()) if path.exists() else []
    calls.append(round(seconds, 1))
    write_json(path, calls)
    return calls


def publish(written: list[Path], folder: Path) -> None:
    """RESULTS.md and the figures it links, side by side in ``folder`` as in the output folder."""
    root = written[0].parent
    for path in written:
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        print(f"published {target}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
