"""slimsearch: search per-layer CNN compression policies (pruning, clustering, CP/Tucker) under a MACs or
latency bound, with Optuna or Ray Tune.

The repository keeps its four rooms at the top level (core <- spaces <- evaluators <- search); the
installed distribution maps them under this one package: ``slimsearch.core``, ``slimsearch.spaces``,
``slimsearch.evaluators`` and ``slimsearch.search``.
"""

from __future__ import annotations

__version__ = "0.1.0"
