"""Which layers should share: ``python tools/analyze_sharing.py --help``; the code: :mod:`analysis.analyze_sharing`."""

import sys

from analysis.analyze_sharing import main

if __name__ == "__main__":
    sys.exit(main())
