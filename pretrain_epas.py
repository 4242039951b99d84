"""Pretrain (or continue pretraining) a LLaMA-style model with EPAS on Megatron-core.

    python pretrain_epas.py --config configs/tiny_cpu.yaml [section.key=value ...]
    torchrun --nproc-per-node 8 pretrain_epas.py --config configs/llama2_7b.yaml parallel.tensor_parallel=2

With no --config the embedded default (configs/tiny_cpu.yaml) runs on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from megatron_patches import distributed
from megatron_patches.config import ConfigError, load_config, to_dict
from megatron_patches.training import NonFiniteLossError, pretrain, validate_run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_cpu.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        run = load_config(args.config, args.overrides)
        validate_run(run, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        if is_rank0:
            print(f"config error: {error}", file=sys.stderr)
        return 2
    if is_rank0:
        print(f"config {args.config}, resolved:\n{yaml.safe_dump(to_dict(run), sort_keys=False)}", flush=True)
    distributed.initialize(run)
    try:
        pretrain(run)
    except (NonFiniteLossError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
