"""Seed strategies: policies enqueued as a study's first trials, and the paper methods run on a study.

Built in: ``uniform`` (one policy per rate in ``uniform_rates``, every searched layer at that
rate), ``global`` (one threshold over all units' mean-normalised filter norms) and ``tp_global``
(Torch-Pruning's global group-norm allocation, bisected onto the MACs bound). The paper methods
(abshpc, mtd, ga, distfit) are registered here too (``method_strategy``). The registry and the load-time
checks of every strategy's [seeds] parameters are in ``search.seed_params``.

``generate_seeds`` makes a study's seed policies. It runs the four methods itself (``run_study_method``)
so they share one ``MethodAcc``: the study's evaluator WITHOUT the MACs gate (the methods walk from
light to heavy compression; a gated evaluator would reject every light step), memoised by policy hash
across methods, and limited to ``[seeds] budget`` evaluator calls in total. Once the budget is spent,
every policy not evaluated yet is answered as rejected (accuracy ``REJECTED`` = -1, no evaluation), so
a method ends with the steps it accepted so far (abshpc/ga/distfit: remaining layers unpruned; mtd: its
rule switches to Tucker-2 for the remaining layers, which it never evaluates anyway). ``slimsearch
method`` (``search.method_cmd``) uses the same pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import slimsearch.evaluators.evaluate as evaluation
from slimsearch.core.budget import bisect_budget
from slimsearch.core.cost import count_cost
from slimsearch.core.criteria import global_rates, group_importance
from slimsearch.core.data import batches
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.core.tp_prune import pruned_rates, tp_prune
from slimsearch.evaluators.config import EvaluatorConfig
from slimsearch.evaluators.context import EvalContext
from slimsearch.evaluators.evaluate import EvalResult
from slimsearch.search.context import StudyContext
from slimsearch.search.methods import (
    MethodResult,
    run_method,
    seed_policies,
)
from slimsearch.search.methods.common import as_accuracy
from slimsearch.search.seed_params import (
    METHOD_STRATEGIES,
    SEED_STRATEGIES,
    register_seed_strategy,
    typed_params,
)
from slimsearch.search.study import StudyConfig
from slimsearch.spaces.space import Param
from torch import nn

REJECTED = -1.0  # answer to a method's question once the evaluation budget is spent: below a0 - any tolerance


@register_seed_strategy("uniform")
def uniform_seeds(ctx: StudyContext, params: Mapping[str, Any]) -> list[Policy]:
    """Every searched layer pruned at the same rate: one policy per entry of ``rates``.

    Rates are clipped to the space's [low, high] by ``SearchSpace.uniform_policy``'s round trip
    through the space parameters, so the enqueued trial is a point of the search space.
    """
    rates = params.get("rates", [0.3, 0.5])
    crit = params.get("criterion", "l1")
    return [ctx.space.uniform_policy(float(r), crit) for r in rates]


@register_seed_strategy("global")
def global_seeds(ctx: StudyContext, params: Mapping[str, Any]) -> list[Policy]:
    """Torch-Pruning-style global pruning as a seed: one threshold over every searched unit's filter group
    norms (each divided by its unit's mean, ``core.criteria.global_rates``) removes ``fractions`` of all
    their filters; a unit's rate is the share of its filters below it, filters chosen by ``criterion``.
    Over-budget seeds are fitted like any sample (``[constraint] fit``)."""
    mods = dict(ctx.model.named_modules())
    scores = {u.key: group_importance([mods[n].weight for n in u.layers]) for u in ctx.space.units
              if isinstance(u.rate, Param)}  # fmt: skip
    crit = params.get("criterion", "l2")
    return [ctx.space.unit_policy(global_rates(scores, float(f)), crit) for f in params.get("fractions", [0.5])]


@register_seed_strategy("tp_global")
def tp_global_seeds(ctx: StudyContext, params: Mapping[str, Any]) -> list[Policy]:
    """Torch-Pruning's global pruning (``GroupMagnitudeImportance(p=2)``: a group's norm over the conv, its
    BatchNorm and the next conv's input slice, one threshold for all) as a seed: the kept-filter count it gives
    each searched unit, the filters chosen by ``criterion`` (default fpgm). Without ``ratios`` and with a MACs
    bound, TP's ratio is bisected onto the bound (the allocation a user would get from Torch-Pruning at that
    budget); otherwise one seed per ratio, fitted like any sample. Units Torch-Pruning cannot trace (a
    residual stream behind an option-A shortcut) stay unpruned in the seed."""
    units = [u for u in ctx.space.units if isinstance(u.rate, Param)]
    if not units:
        return []
    searched = {n for u in units for n in u.layers}
    mods = dict(ctx.model.named_modules())
    ignore = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and n not in searched]
    top = max(float(u.rate.high) for u in units)
    crit = params.get("criterion", "fpgm")

    @functools.cache  # the bisection's last ratio is pruned again for the seed
    def prune(ratio: float) -> nn.Module:
        return tp_prune(ctx.model, "tp_global", ratio, ctx.input_shape, max_ratio=top, ignore=ignore)

    def seed(pruned: nn.Module) -> Policy:
        rates = pruned_rates(ctx.model, pruned, [u.layers[0] for u in units])
        return ctx.space.unit_policy({u.key: rates[u.layers[0]] for u in units if u.layers[0] in rates}, crit)

    bound = getattr(ctx.eval_ctx, "max_macs", None)
    if "ratios" in params or bound is None:
        return [seed(prune(float(r))) for r in params.get("ratios", [0.5])]
    try:
        ratio, _ = bisect_budget(lambda r: count_cost(prune(r), ctx.input_shape).macs, bound, hi=top, iters=10)
    except SlimError:  # even the most pruned allocation is over the bound: fitted like any sample
        ratio = top
    return [seed(prune(ratio))]


# ----------------------------------------------------------------------------- paper methods on a study


class MethodAcc:
    """``acc(policy) -> float`` for the methods: the study's evaluator without the MACs gate, memoised by
    policy hash, at most ``budget`` evaluations (None: unlimited); see the module docstring.

    ``calls``: evaluations made; ``refused``: questions answered ``REJECTED`` because the budget was spent.
    ``result(policy)`` is the full ``EvalResult`` of a policy, evaluated outside the budget if needed.
    """

    def __init__(self, eval_ctx: EvalContext, eval_cfg: EvaluatorConfig, budget: int | None = None) -> None:
        if budget is not None and budget < 1:
            raise SlimError(f"evaluation budget must be >= 1, got {budget}")
        self._ctx = dataclasses.replace(eval_ctx, max_macs=None)  # new fingerprint: no MACs bound
        self._cfg = eval_cfg
        self.budget = budget
        self.calls = 0
        self.refused = 0
        self._results: dict[str, EvalResult] = {}

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.calls >= self.budget

    @property
    def left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.calls)

    def _evaluate(self, policy: Policy) -> EvalResult:
        res = self._results.get(policy.hash)
        if res is None:
            res = self._results[policy.hash] = evaluation.evaluate(self._ctx, self._cfg, policy)
            self.calls += 1
        return res

    def __call__(self, policy: Policy) -> float:
        if policy.hash not in self._results and self.exhausted:
            self.refused += 1
            return REJECTED
        return as_accuracy(self._evaluate(policy))

    def result(self, policy: Policy) -> EvalResult:
        """The ``EvalResult`` of ``policy`` (memoised; a new evaluation is not limited by the budget)."""
        return self._evaluate(policy)


def method_layers(ctx: StudyContext, name: str) -> list[str]:
    """Layers a method works on: the space's decomposable layers (mtd) or its uncoupled prune units (others)."""
    space = ctx.space
    if name == "mtd":
        return [d.layer for d in space.decs]
    return [u.layers[0] for u in space.units if len(u.layers) == 1]


def method_inputs(ctx: StudyContext, name: str, params: Mapping[str, Any]) -> Any:
    """Normalised train images for GA's fitness (``samples`` of them, seeded); None for the other methods."""
    if name != "ga":
        return None
    n = int(params.get("samples", 256))
    x, _ = next(iter(batches(ctx.splits.train, n, shuffle=True, seed=ctx.cfg.study.seed)))
    return x


def _layer_rates(name: str, opts: dict[str, Any], layers: Sequence[str]) -> dict[str, Any]:
    """GA takes per-layer rates only: one rate becomes a mapping; rates of layers the method does not work on
    are a ``SlimError``."""
    r = opts.get("rates")
    if name == "ga" and isinstance(r, (int, float)) and not isinstance(r, bool):
        opts["rates"] = dict.fromkeys(layers, float(r))
    elif isinstance(r, Mapping):
        unknown = [n for n in r if n not in layers]
        if unknown:
            raise SlimError(f"{name} rates: {unknown[0]!r} is not a layer the method works on; "
                            f"layers: {', '.join(layers)}")  # fmt: skip
    return opts


def run_study_method(ctx: StudyContext, name: str, params: Mapping[str, Any], acc: MethodAcc) -> MethodResult:
    """Run method ``name`` with ``params`` on the study context's baseline; returns its ``MethodResult``."""
    layers = method_layers(ctx, name)
    if not layers:
        kind = "decomposable" if name == "mtd" else "uncoupled prunable"
        raise SlimError(f"method {name}: the study's search space has no {kind} layers to work on")
    opts = _layer_rates(name, dict(params), layers)
    if name == "distfit" and isinstance(opts.get("rates"), (list, tuple)):
        raise SlimError(f"method distfit: rates {list(opts['rates'])} gives several policies; give one rate")
    return run_method(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def method_seed_policies(ctx: StudyContext, name: str, params: Mapping[str, Any], acc: MethodAcc) -> list[Policy]:
    """Seed policies of method ``name`` (distfit: one per rate when ``rates`` is a list), evaluated by ``acc``.

    The methods' own final evaluation is skipped unless asked for (the seed trial evaluates the policy).
    """
    layers = method_layers(ctx, name)
    if not layers:
        return []
    opts = _layer_rates(name, dict(params), layers)
    if name != "abshpc":
        opts.setdefault("final_eval", False)
    return seed_policies(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def generate_seeds(ctx: StudyContext, log: Callable[[str], None] | None = None) -> list[tuple[str, Policy]]:
    """(label, Policy) for every [seeds] strategy in order; the methods share one budgeted ``MethodAcc``."""
    cfg = ctx.cfg
    reg = SEED_STRATEGIES
    acc: MethodAcc | None = None
    out: list[tuple[str, Policy]] = []
    for name in cfg.seeds.strategies:
        params = cfg.seeds.params.get(name, {})
        if name in METHOD_STRATEGIES:
            acc = acc or MethodAcc(ctx.eval_ctx, cfg.evaluator, cfg.seeds.budget)
            before, refused = acc.calls, acc.refused
            pols = method_seed_policies(ctx, name, typed_params(name, params, f"[seeds] {name}_"), acc)
            if log is not None:
                left = "" if acc.budget is None else f" ({acc.left} of the budget of {acc.budget} left)"
                note = (
                    f"; budget spent, {acc.refused - refused} steps rejected unevaluated"
                    if acc.refused > refused
                    else ""
                )
                log(f"seed strategy {name}: {len(pols)} policies, {acc.calls - before} evaluator calls{left}{note}")
        else:
            pols = reg[name](ctx, params)
        out += [(f"{name}#{i}", p) for i, p in enumerate(pols)]
    return out


def method_options(
    cfg: StudyConfig, name: str, overrides: Mapping[str, Any], *, where: str = "option --set "
) -> dict[str, Any]:
    """Options of method ``name``: the study's [seeds] parameters for it (when it is a seed strategy there),
    updated by ``overrides``; unknown names and values of the wrong type are a ``SlimError``."""

    if name not in METHOD_STRATEGIES:
        raise SlimError(f"unknown method {name!r}; allowed: {', '.join(METHOD_STRATEGIES)}")
    out = typed_params(name, cfg.seeds.params.get(name, {}), f"{cfg.path}: [seeds] {name}_")
    out.update(typed_params(name, overrides, where))
    return out


def method_strategy(name: str) -> Callable[[StudyContext, Mapping[str, Any]], list[Policy]]:
    """Seed strategy ``name`` on its own: its policies with the study's evaluator without the MACs gate
    (``generate_seeds`` runs the methods itself instead, so they share one budget)."""

    def fn(ctx: StudyContext, params: Mapping[str, Any]) -> list[Policy]:
        return method_seed_policies(ctx, name, params, MethodAcc(ctx.eval_ctx, ctx.cfg.evaluator))

    fn.__name__ = f"{name}_study_seed"
    return fn


for _name in METHOD_STRATEGIES:  # their [seeds] parameters are checked at load time (search.seed_params)
    register_seed_strategy(_name)(method_strategy(_name))
