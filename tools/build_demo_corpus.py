"""Build the demo corpus and tokenizer offline: ``python tools/build_demo_corpus.py --help``; the code is :mod:`epas.data.demo_corpus`."""

import sys

from epas.data.demo_corpus import main

if __name__ == "__main__":
    sys.exit(main())
