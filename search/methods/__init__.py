"""The four methods of METHODS.md as plain functions on values and callables, plus seed adapters.

- ``abshpc_search``  adaptive binary search of per-layer rates, criterion "hpc" (§1)
- ``mtd_search``     CP-then-Tucker-2 switching rule (§2)
- ``ga_select``      sensitivity order + GA channel masks, criterion "mask" (§3); ``ga_mask`` the pure GA core
- ``distfit_policy`` / ``distfit_search``  norm-distribution-fitting selection at given rates (§4)

``METHOD_SEEDS[name](model=, acc=, layers=None, inputs=None, **options) -> list[Policy]`` wraps each method
for the search runner's seed registry (the policies are enqueued as the first trials).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.search.methods.abshpc import abshpc_search, call_bound
from slimsearch.search.methods.common import CountingAcc, MethodResult, cost_report, default_layers, sensitivity_scan
from slimsearch.search.methods.distfit import distfit_policy, distfit_search, wasserstein_report
from slimsearch.search.methods.ga import GAResult, ga_mask, ga_search, ga_select, plain_consumers
from slimsearch.search.methods.mtd import mtd_search
from torch import Tensor, nn

__all__ = [
    "METHOD_SEEDS",
    "CountingAcc",
    "GAResult",
    "MethodResult",
    "abshpc_search",
    "call_bound",
    "cost_report",
    "distfit_policy",
    "distfit_search",
    "ga_mask",
    "ga_search",
    "ga_select",
    "mtd_search",
    "plain_consumers",
    "run_method",
    "seed_policies",
    "sensitivity_scan",
    "wasserstein_report",
]

METHODS = ("abshpc", "mtd", "ga", "distfit")


def _layers(model: nn.Module, layers: Sequence[str] | None, inputs: Tensor | None, kind: str) -> list[str]:
    if layers is not None:
        return list(layers)
    if inputs is None:
        raise SlimError("method seed: give the layer names or example inputs to find the compressible layers")
    return default_layers(model, inputs[:1], kind)


def run_method(
    name: str,
    *,
    model: nn.Module,
    acc: Callable[[Policy], Any] | None,
    layers: Sequence[str] | None = None,
    inputs: Tensor | None = None,
    **options: Any,
) -> MethodResult:
    """Run one method by name (abshpc | mtd | ga | distfit) with its keyword ``options``."""
    if name not in METHODS:
        raise SlimError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    if name != "distfit" and acc is None:
        raise SlimError(f"method {name!r} needs an accuracy evaluator")
    kind = "decomposable" if name == "mtd" else "prunable"
    names = _layers(model, layers, inputs, kind)
    if name == "abshpc":
        return abshpc_search(model, names, acc, **options)  # type: ignore[arg-type]
    if name == "mtd":
        return mtd_search(model, names, acc, **options)  # type: ignore[arg-type]
    if name == "ga":
        if inputs is None:
            raise SlimError("method 'ga' needs input images for its fitness (inputs=)")
        return ga_select(model, names, acc, inputs, **options)  # type: ignore[arg-type]
    return distfit_search(model, names, acc=acc, **options)


def seed_policies(
    name: str,
    *,
    model: nn.Module,
    acc: Callable[[Policy], Any] | None = None,
    layers: Sequence[str] | None = None,
    inputs: Tensor | None = None,
    **options: Any,
) -> list[Policy]:
    """Seed policies of method ``name``. distfit takes ``rates=[r1, r2, ...]`` (several uniform seeds) or a
    mapping/float, or runs a sensitivity scan with ``acc`` when no rate is given."""
    if name == "distfit" and isinstance(options.get("rates"), (list, tuple)):
        names = _layers(model, layers, inputs, "prunable")
        return [distfit_policy(model, names, float(r)) for r in options["rates"]]
    return [run_method(name, model=model, acc=acc, layers=layers, inputs=inputs, **options).policy]


def _seed(name: str) -> Callable[..., list[Policy]]:
    def fn(**kwargs: Any) -> list[Policy]:
        return seed_policies(name, **kwargs)

    fn.__name__ = f"{name}_seed"
    fn.__doc__ = f"Seed policies from the {name} method (see search.methods.seed_policies)."
    return fn


METHOD_SEEDS: dict[str, Callable[..., list[Policy]]] = {m: _seed(m) for m in METHODS}
