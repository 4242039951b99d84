"""Continual pretraining or supervised fine-tuning of a Hugging Face LLaMA with EPAS (transformers Trainer,
optionally DeepSpeed ZeRO-2/3).

    python finetune_epas.py --config configs/finetune/tiny_cpu.yaml [section.key=value ...]
    torchrun --nproc-per-node 8 finetune_epas.py --config configs/tinyllama_1.1b_sft.yaml \\
        training.deepspeed=configs/deepspeed/zero3.json

The sharing region grows as in pretrain_epas.py (same epas settings); the run resumes from the newest
checkpoint in training.output_dir and ends with an EPAS folder in OUTPUT_DIR/model.
"""

from __future__ import annotations

import argparse
import sys

from epas import cli
from epas.config import FinetuneConfig, load_for_entry_point
from hf_training.finetune import finetune, validate_finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML preset (see configs/finetune/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=100")
    args = parser.parse_intermixed_args(argv)
    return cli.run(lambda: finetune(load_for_entry_point(args.config, args.overrides, validate_finetune, FinetuneConfig)))


if __name__ == "__main__":
    sys.exit(main())
