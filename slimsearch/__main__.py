"""``python -m slimsearch``: the same command line as the ``slimsearch`` console script."""

import sys

from slimsearch.search.cli import main

sys.exit(main())
