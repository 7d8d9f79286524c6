"""Seed strategies: policies enqueued as a study's first trials, and the paper methods run on a study.

Built in: ``uniform`` (one policy per rate in ``uniform_rates``, every searched layer at that
rate). The paper methods (abshpc, mtd, ga, distfit) register themselves from the optional
``search.methods.seeds`` module with ``search.study.register_seed_strategy`` (that registration
checks their [seeds] parameters at load time).

``generate_seeds`` makes a study's seed policies. It runs the four methods itself (``run_study_method``)
so they share one ``MethodAcc``: the study's evaluator WITHOUT the MACs gate (the methods walk from
light to heavy compression; a gated evaluator would reject every light step), memoised by policy hash
across methods, and limited to ``[seeds] budget`` evaluator calls in total. Once the budget is spent,
every policy not evaluated yet is answered as rejected (accuracy ``REJECTED`` = -1, no evaluation), so
a method ends with the steps it accepted so far (abshpc/ga/distfit: remaining layers unpruned; mtd: its
rule switches to Tucker-2 for the remaining layers, which it never evaluates anyway). ``slimsearch
method`` uses the same pieces.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

from core.errors import SlimError
from core.policy import CRITERIA, Policy
from search.study import SEED_STRATEGIES, known_seed_strategies, register_seed_strategy

METHOD_STRATEGIES = ("abshpc", "mtd", "ga", "distfit")
REJECTED = -1.0  # answer to a method's question once the evaluation budget is spent: below a0 - any tolerance


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


# ----------------------------------------------------------------------------- paper methods on a study


class MethodAcc:
    """``acc(policy) -> float`` for the methods: the study's evaluator without the MACs gate, memoised by
    policy hash, at most ``budget`` evaluations (None: unlimited); see the module docstring.

    ``calls``: evaluations made; ``refused``: questions answered ``REJECTED`` because the budget was spent.
    ``result(policy)`` is the full ``EvalResult`` of a policy, evaluated outside the budget if needed.
    """

    def __init__(self, eval_ctx: Any, eval_cfg: Any, budget: int | None = None) -> None:
        if budget is not None and budget < 1:
            raise SlimError(f"evaluation budget must be >= 1, got {budget}")
        self._ctx = dataclasses.replace(eval_ctx, max_macs=None)  # new fingerprint: no MACs bound
        self._cfg = eval_cfg
        self.budget = budget
        self.calls = 0
        self.refused = 0
        self._results: dict[str, Any] = {}

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.calls >= self.budget

    @property
    def left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.calls)

    def _evaluate(self, policy: Policy) -> Any:
        from evaluators.evaluate import evaluate

        res = self._results.get(policy.hash)
        if res is None:
            res = self._results[policy.hash] = evaluate(self._ctx, self._cfg, policy)
            self.calls += 1
        return res

    def __call__(self, policy: Policy) -> float:
        from search.methods.common import as_accuracy

        if policy.hash not in self._results and self.exhausted:
            self.refused += 1
            return REJECTED
        return as_accuracy(self._evaluate(policy))

    def result(self, policy: Policy) -> Any:
        """The ``EvalResult`` of ``policy`` (memoised; a new evaluation is not limited by the budget)."""
        return self._evaluate(policy)


def method_layers(ctx: Any, name: str) -> list[str]:
    """Layers a method works on: the space's decomposable layers (mtd) or its uncoupled prune units (others)."""
    space = ctx.space
    if name == "mtd":
        return [d.layer for d in space.decs]
    return [u.layers[0] for u in space.units if len(u.layers) == 1]


def method_inputs(ctx: Any, name: str, params: Mapping[str, Any]) -> Any:
    """Normalised train images for GA's fitness (``samples`` of them, seeded); None for the other methods."""
    if name != "ga":
        return None
    from core.data import batches

    n = int(params.get("samples", 256))
    x, _ = next(iter(batches(ctx.splits.train, n, shuffle=True, seed=ctx.cfg.study.seed)))
    return x


def run_study_method(ctx: Any, name: str, params: Mapping[str, Any], acc: MethodAcc) -> Any:
    """Run method ``name`` with ``params`` on the study context's baseline; returns its ``MethodResult``."""
    from search.methods import run_method

    layers = method_layers(ctx, name)
    if not layers:
        kind = "decomposable" if name == "mtd" else "uncoupled prunable"
        raise SlimError(f"method {name}: the study's search space has no {kind} layers to work on")
    opts = dict(params)
    if name == "distfit" and isinstance(opts.get("rates"), (list, tuple)):
        raise SlimError(f"method distfit: rates {list(opts['rates'])} gives several policies; give one rate")
    return run_method(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def method_seed_policies(ctx: Any, name: str, params: Mapping[str, Any], acc: MethodAcc) -> list[Policy]:
    """Seed policies of method ``name`` (distfit: one per rate when ``rates`` is a list), evaluated by ``acc``.

    The methods' own final evaluation is skipped unless asked for (the seed trial evaluates the policy).
    """
    from search.methods import seed_policies

    layers = method_layers(ctx, name)
    if not layers:
        return []
    opts = dict(params)
    if name != "abshpc":
        opts.setdefault("final_eval", False)
    return seed_policies(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def generate_seeds(ctx: Any, log: Callable[[str], None] | None = None) -> list[tuple[str, Policy]]:
    """(label, Policy) for every [seeds] strategy in order; the methods share one budgeted ``MethodAcc``."""
    cfg = ctx.cfg
    reg = known_seed_strategies()
    acc: MethodAcc | None = None
    out: list[tuple[str, Policy]] = []
    for name in cfg.seeds.strategies:
        params = cfg.seeds.params.get(name, {})
        if name in METHOD_STRATEGIES:
            acc = acc or MethodAcc(ctx.eval_ctx, cfg.evaluator, cfg.seeds.budget)
            before, refused = acc.calls, acc.refused
            pols = method_seed_policies(ctx, name, params, acc)
            if log is not None:
                left = "" if acc.budget is None else f" ({acc.left} of the budget of {acc.budget} left)"
                note = f"; budget spent, {acc.refused - refused} steps rejected unevaluated" if acc.refused > refused else ""
                log(f"seed strategy {name}: {len(pols)} policies, {acc.calls - before} evaluator calls{left}{note}")
        else:
            pols = reg[name](ctx, params)
        out += [(f"{name}#{i}", p) for i, p in enumerate(pols)]
    return out


__all__ = [
    "METHOD_STRATEGIES",
    "REJECTED",
    "SEED_STRATEGIES",
    "MethodAcc",
    "generate_seeds",
    "method_layers",
    "method_seed_policies",
    "run_study_method",
    "uniform_seeds",
]
