"""Where a training step's time goes, from the torch profiler: ``python tools/profile_train.py --help``; the code is :mod:`benchmarks.profile_train`."""

import sys

from benchmarks.profile_train import main

if __name__ == "__main__":
    sys.exit(main())
