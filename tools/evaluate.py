"""Accuracy and perplexity of an exported EPAS model at several sharing lengths: ``python tools/evaluate.py --help``; the code is :mod:`analysis.evaluate`."""

import sys

from analysis.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
