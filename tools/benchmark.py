"""Speed benchmarks, ``train`` and ``generate``: ``python tools/benchmark.py --help``; the code is :mod:`benchmarks`."""

import sys

from benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/benchmark.py"))
