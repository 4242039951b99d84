"""Loss and throughput plots of training runs from their TensorBoard logs: ``python tools/plot_runs.py --help``; the code is :mod:`analysis.plot_runs`."""

import sys

from analysis.plot_runs import main

if __name__ == "__main__":
    sys.exit(main())
