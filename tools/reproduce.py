"""Tables 4 and 6 of the paper at small scale, on CPU, in one command: ``python tools/reproduce.py --help``; the code is :mod:`analysis.reproduce`."""

import sys

from analysis.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
