"""A CPU smoke run of EPAS: a tiny model trains on one fixed batch while its sharing region grows.

    python tools/demo.py [--config configs/tiny_cpu.yaml] [section.key=value ...]

Each line shows the step, the loss, the layers in sharing mode and the share of training FLOPs
they skip; the region grows from the deepest layer as the scheduler prescribes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_patches import distributed
from megatron_patches.config import ConfigError, load_config
from megatron_patches.flops import sharing_saving
from megatron_patches.model import build_model
from megatron_patches.scheduler import SharingScheduler


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=None, help="default: until the region is complete, plus 5")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
        scheduler = SharingScheduler(run.model.num_layers, run.epas)
    except ConfigError as error:
        parser.error(str(error))

    distributed.initialize(run)
    model = build_model(run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(run.seed)
    tokens = torch.randint(0, run.model.vocab_size, (4, run.model.seq_length + 1), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(run.model.seq_length).expand_as(inputs)
    growth = scheduler.growth_steps
    steps = args.steps or (growth[-1][0] + 5 if growth else 20)

    print(f"EPAS demo: {run.model.num_layers} layers, mode {run.epas.mode}, target {list(scheduler.target)}")
    for step in range(1, steps + 1):
        model.set_sharing_layers(scheduler.current)
        optimizer.zero_grad()
        loss = model(inputs, positions, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        saving = sharing_saving(run.model, scheduler.current, run.epas.mode)
        print(f"step {step:4d}  loss {loss.item():7.4f}  sharing {list(scheduler.current)}  "
              f"FLOPs skipped {saving:5.1%}")
        if scheduler.step():
            print(f"  -> sharing region grows to layers {list(scheduler.current)}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
