"""Tokenize jsonl or parquet text into a megatron-core indexed dataset: ``python tools/preprocess_data.py --help``; the code is :mod:`epas.data.preprocess`."""

import sys

from epas.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
