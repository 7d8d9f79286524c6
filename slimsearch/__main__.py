"""``python -m slimsearch``: the same command line as the ``slimsearch`` console script.

``python -m`` puts the current directory first on ``sys.path``; it is removed before anything else is imported,
so a stray ``tomllib.py`` or ``numpy.py`` in a study folder never runs. A ``[model] factory`` in that folder is
still found (``core.models`` appends the directory, last, while it imports the factory).
"""

import os
import sys

sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]

from slimsearch.search.cli import main  # noqa: E402

sys.exit(main())
