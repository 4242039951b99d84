"""Pretrain (or continue pretraining) a LLaMA-style model with EPAS on Megatron-core.

    python pretrain_epas.py --config configs/tiny_cpu.yaml [section.key=value ...]
    torchrun --nproc-per-node 8 pretrain_epas.py --config configs/llama2_7b.yaml parallel.tensor_parallel=2

With no --config the embedded default (configs/tiny_cpu.yaml) runs on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

from epas import cli
from epas.config import load_for_entry_point
from megatron_training import distributed
from megatron_training.trainer import pretrain
from megatron_training.validation import validate_run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_cpu.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config
    return cli.run(lambda: _pretrain(args))


def _pretrain(args) -> None:
    run = load_for_entry_point(args.config, args.overrides, validate_run)
    with distributed.collectives_explained(run):
        distributed.initialize(run)
        try:
            pretrain(run)
        finally:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":  # this file re-imported by a process multiprocessing spawned from a run
    distributed.end_with_parent()
