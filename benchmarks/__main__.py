"""Speed of EPAS, one command per benchmark (also ``tools/benchmark.py``):

    python -m benchmarks train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 --mode qk,kv
    python -m benchmarks generate --random-init configs/tinyllama_1.1b.yaml --batch 1,32 --prompt 512,2048
    python -m benchmarks convert --config configs/llama3.2_1b_cpt.yaml --work /tmp/convert

``train`` times a training step beside stock megatron-core (:mod:`benchmarks.train`); ``generate`` times
decoding of the transformers EPAS model beside ``LlamaForCausalLM`` and needs no megatron-core
(:mod:`benchmarks.generate`); ``convert`` measures checkpoint conversion's time and peak memory at a preset's
size (:mod:`benchmarks.conversion`). ``COMMAND --help`` lists a command's options.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "benchmarks.train", "generate": "benchmarks.generate", "convert": "benchmarks.conversion"}


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: {prog} {{{','.join(COMMANDS)}}} [options]\n\n{__doc__}", file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command = importlib.import_module(COMMANDS[argv[0]])  # only the one asked for: generate needs no megatron-core
    return command.main(argv[1:], prog=f"{prog} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
