"""Study seed strategies abshpc | mtd | ga | distfit: ``fn(study_context, params) -> list[Policy]``.

``register()`` adds them to ``search.study``'s seed registry (``[seeds] strategies = ["abshpc", ...]``,
parameters as ``abshpc_epsilon = 0.005`` or a ``[seeds.abshpc]`` table; names are the keyword arguments
of the method functions). The accuracy evaluator is the study's [evaluator] WITHOUT the MACs gate: the
methods walk from light to heavy compression, and a gated evaluator would reject every light step.
Layers: uncoupled prunable layers of the search space (abshpc, ga, distfit); its decomposable layers (mtd).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.search.methods import METHODS, abshpc_search, distfit_search, ga_select, mtd_search, seed_policies
from slimsearch.search.methods.common import as_accuracy

_FUNCS: dict[str, Callable[..., Any]] = {
    "abshpc": abshpc_search, "mtd": mtd_search, "ga": ga_select, "distfit": distfit_search,
}  # fmt: skip
# Supplied by the adapter (or hooks a study file cannot express), never by [seeds] parameters.
_RESERVED = {"model", "layers", "acc", "inputs", "input_shape", "finetune", "apply", "on_step"}


def allowed_params(name: str) -> list[str]:
    """The [seeds] parameter names method ``name`` accepts."""
    sig = inspect.signature(_FUNCS[name])
    names = [p for p, v in sig.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    return sorted(set(names) - _RESERVED)


def check_params(name: str) -> Callable[[Mapping[str, Any], str], None]:
    """Load-time check of a strategy's parameters: unknown names are a SlimError saying where."""

    def check(params: Mapping[str, Any], where: str) -> None:
        allowed = allowed_params(name)
        for key in params:
            if key not in allowed:
                raise SlimError(f"{where} {name}_{key}: unknown parameter; allowed: {', '.join(allowed)}")

    return check


def _seed_layers(ctx: Any, name: str) -> list[str]:
    space = ctx.space
    if name == "mtd":
        return [d.layer for d in space.decs]
    return [u.layers[0] for u in space.units if len(u.layers) == 1]


def study_seed(name: str) -> Callable[[Any, Mapping[str, Any]], list[Policy]]:
    """Registry adapter for method ``name``: builds acc/layers/inputs from the study context."""

    def fn(ctx: Any, params: Mapping[str, Any]) -> list[Policy]:
        from slimsearch.core.data import batches
        from slimsearch.evaluators.evaluate import evaluate

        ectx = dataclasses.replace(ctx.eval_ctx, max_macs=None)  # new fingerprint: no MACs bound
        cfg = ctx.cfg.evaluator

        def acc(policy: Policy) -> float:
            return as_accuracy(evaluate(ectx, cfg, policy))

        layers = _seed_layers(ctx, name)
        if not layers:
            return []
        opts = dict(params)
        inputs = None
        if name == "ga":
            n = int(opts.get("samples", 256))
            inputs, _ = next(iter(batches(ctx.splits.train, n, shuffle=True, seed=ctx.cfg.study.seed)))
        return seed_policies(name, model=ctx.model, acc=acc, layers=layers, inputs=inputs, **opts)

    fn.__name__ = f"{name}_study_seed"
    return fn


def register() -> None:
    """Add the four method strategies to ``search.study``'s seed registry."""
    from slimsearch.search.study import register_seed_strategy

    for name in METHODS:
        register_seed_strategy(name, check=check_params(name))(study_seed(name))
