"""Convert between Hugging Face LLaMA folders and torch_dist checkpoints: ``python tools/convert_checkpoint.py --help``; the code is :mod:`megatron_training.convert`."""

import sys

from megatron_training.convert import main

if __name__ == "__main__":
    sys.exit(main())
