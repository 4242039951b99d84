"""One figure of benchmark JSON files: ``python tools/plot_benchmark.py --help``; the code is :mod:`benchmarks.plot`."""

import sys

from benchmarks.plot import main

if __name__ == "__main__":
    sys.exit(main())
