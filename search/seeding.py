"""Seed strategies: policies enqueued as a study's first trials.

Built in: ``uniform`` (one policy per rate in ``uniform_rates``, every searched layer at that
rate). The paper methods (abshpc, mtd, ga, distfit) register themselves from the optional
``search.seeds`` package with ``search.study.register_seed_strategy``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from core.errors import SlimError
from core.policy import CRITERIA
from search.study import SEED_STRATEGIES, register_seed_strategy


def _check_uniform(params: Mapping[str, Any], where: str) -> None:
    allowed = ("rates", "criterion")
    for key in params:
        if key not in allowed:
            raise SlimError(f"{where} uniform_{key}: unknown parameter; allowed: uniform_rates, uniform_criterion")
    rates = params.get("rates", [0.3, 0.5])
    ok = (
        isinstance(rates, list)
        and rates
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates)
    )
    if not ok or not all(0 <= r < 1 for r in rates):
        raise SlimError(f"{where} uniform_rates: expected a non-empty list of rates in [0, 1), got {rates!r}")
    crit = params.get("criterion", "l1")
    if crit not in CRITERIA or crit == "mask":
        allowed_c = ", ".join(c for c in CRITERIA if c != "mask")
        raise SlimError(f"{where} uniform_criterion: unknown criterion {crit!r}; allowed: {allowed_c}")


@register_seed_strategy("uniform", check=_check_uniform)
def uniform_seeds(ctx: Any, params: Mapping[str, Any]) -> list[Any]:
    """Every searched layer pruned at the same rate: one policy per entry of ``rates``.

    Rates are clipped to the space's [low, high] by ``SearchSpace.uniform_policy``'s round trip
    through the space parameters, so the enqueued trial is a point of the search space.
    """
    rates = params.get("rates", [0.3, 0.5])
    crit = params.get("criterion", "l1")
    return [ctx.space.uniform_policy(float(r), crit) for r in rates]


def _load_optional() -> None:
    """Register the paper strategies of ``search.methods.seeds`` (abshpc, mtd, ga, distfit) when present."""
    if importlib.util.find_spec("search.methods") is None or importlib.util.find_spec("search.methods.seeds") is None:
        return
    importlib.import_module("search.methods.seeds").register()


_load_optional()

__all__ = ["SEED_STRATEGIES", "uniform_seeds"]
