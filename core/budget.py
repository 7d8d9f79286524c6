"""Fitting a policy under a MACs bound: every pruned layer keeps ``1 - t`` of its kept filters, one ``t`` for all.

A sampled or published policy says *where* to prune (its per-layer allocation, criteria, GA masks,
decompositions); the bound says *how much*. Scaling every layer's kept-filter count by one factor keeps the
allocation and moves the policy onto the bound, so a search (or a comparison at equal MACs) spends its
evaluations on feasible candidates instead of rejecting most of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypedDict, Unpack

from slimsearch.core.apply import apply_policy
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.macs import policy_macs
from slimsearch.core.policy import LayerPolicy, Policy, cp_max_rank, rate_for_removed, replace_layer
from torch import nn

FIT_REL_TOL = 0.02  # the one-factor fit's default: within 2 % under the bound where its steps allow


def prunable_leaders(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Convs a policy prunes directly: prunable and alone or leading their coupled group (module order)."""
    g = model_graph(model, tuple(input_shape))
    return [n for n, i in g.layers.items() if i.prunable and i.group in (None, n)]


def scale_kept(
    model: nn.Module,
    policy: Policy,
    t: float,
    input_shape: Sequence[int],
    *,
    criterion: str | None = "l1",
    max_rate: float = 1.0,
    min_rate: float = 0.0,
    fixed: frozenset[str] = frozenset(),
) -> Policy:
    """``policy`` with the kept-filter count of every prunable group it lists scaled by ``1 - t`` (floor, >= 1).

    Each layer keeps its criterion; ``clusters`` (hpc, distfit) becomes the new count; a ``keep`` mask keeps the
    strongest (L1) of the filters it kept. Coupled groups stay consistent (every listed member gets the new
    entry). Prunable leaders the policy does not list are pruned with ``criterion``, or left alone when it is
    None (a search space that excludes them). No layer is pushed past ``max_rate`` (a space's largest rate);
    one already past it stays as it is. Explicit decomposition ranks are clamped to the pruned kernel.
    ``t = 0`` returns the policy unchanged. A negative ``t`` prunes less: each pruned group keeps ``1 - t``
    times its filters (at most all, and no layer falls below ``min_rate``, a space's smallest rate); a
    ``keep`` mask gets back its strongest (L1) dropped filters. Groups whose listed layers are all in ``fixed``
    (listed only for their decomposition, outside a search space's prune units) stay as they are.
    """
    if not t < 1.0 or not math.isfinite(t):
        raise SlimError(f"scale factor t must be below 1, got {t}")
    shape = tuple(input_shape)
    g = model_graph(model, shape)
    mods = dict(model.named_modules())
    layers = dict(policy.layers)
    for leader in prunable_leaders(model, shape):
        members = g.groups.get(leader, [leader])
        listed = [m for m in members if m in layers]
        if (not listed and criterion is None) or (listed and all(m in fixed for m in listed)):
            continue
        lp = layers[listed[0]] if listed else LayerPolicy(criterion=criterion or "l1")
        n = g.layers[leader].out_channels
        k0 = lp.keep_count(n)
        if t >= 0:
            k = max(1, math.floor(k0 * (1.0 - t) + 1e-9), n - math.floor(max_rate * n + 1e-9))
            if k >= k0:
                continue
        else:
            k = min(math.floor(k0 * (1.0 - t) + 1e-9), n - math.floor(min_rate * n + 1e-9))
            if k <= k0:
                continue
        rate = rate_for_removed(n - k, n)
        if lp.keep is not None:
            w = mods[leader].weight.detach().flatten(1).abs().sum(1)
            pool = lp.keep if k < k0 else range(n)  # growing: the kept filters stay, the strongest others return
            kept = set(lp.keep) if k > k0 else set()
            strongest = sorted(pool, key=lambda i: (i not in kept, -float(w[i]), i))[:k]
            new = replace_layer(lp, prune_rate=rate, keep=tuple(sorted(strongest)))
        elif lp.clusters is not None:
            new = replace_layer(lp, prune_rate=rate, clusters=k)
        else:
            new = replace_layer(lp, prune_rate=rate)
        for m in listed:  # members must agree on pruning; each keeps its own decomposition
            layers[m] = replace_layer(layers[m], prune_rate=new.prune_rate, keep=new.keep, clusters=new.clusters)
        if not listed:
            layers[leader] = new
    return _clamp_ranks(model, Policy(layers), shape)


def _clamp_ranks(model: nn.Module, policy: Policy, shape: tuple[int, ...]) -> Policy:
    """Explicit CP/Tucker ranks no larger than the full rank of the layer after pruning."""
    fixed = {n: lp for n, lp in policy.layers.items() if lp.decomposition != "none" and lp.rank is not None}
    if not fixed:
        return policy
    pruned_only = Policy({n: replace_layer(lp, decomposition="none", rank=None, rank_ratio=None)
                          for n, lp in policy.layers.items()})  # fmt: skip
    shell = apply_policy(model, pruned_only, input_shape=shape, check=False)
    mods = dict(shell.named_modules())
    layers = dict(policy.layers)
    for n, lp in fixed.items():
        out_c, in_c, kh, kw = mods[n].weight.shape
        if isinstance(lp.rank, tuple):
            rank: int | tuple[int, int] = (min(lp.rank[0], in_c), min(lp.rank[1], out_c))
        else:
            rank = min(int(lp.rank), cp_max_rank(out_c, in_c, kh, kw))
        layers[n] = replace_layer(lp, rank=rank)
    return Policy(layers)


def bisect_budget(
    macs_at: Callable[[float], float], budget: float, lo: float = 0.0, hi: float = 0.95, iters: int = 12
) -> tuple[float, float]:
    """Smallest x in (lo, hi] (within (hi - lo) / 2**iters) with ``macs_at(x) <= budget``, and those MACs.

    ``macs_at`` must be non-increasing in x and ``macs_at(lo)`` above the budget (lo is never evaluated);
    a budget even ``hi`` cannot meet is a ``SlimError``.
    """
    m_hi = macs_at(hi)
    if m_hi > budget:
        raise SlimError(f"budget {budget:,.0f} MACs is out of reach: {m_hi:,.0f} MACs at the largest setting {hi}")
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = macs_at(mid)
        if m <= budget:
            hi, m_hi = mid, m
        else:
            lo = mid
    return hi, m_hi


class FitOptions(TypedDict, total=False):
    """``fit_cost``'s keyword options (their defaults are there), shared by ``fit_macs``."""

    criterion: str | None
    max_rate: float
    min_rate: float
    fill: bool
    t_max: float
    rel_tol: float
    max_evals: int
    top_up: bool


def fit_macs(
    model: nn.Module, policy: Policy, max_macs: float, input_shape: Sequence[int], **options: Unpack[FitOptions]
) -> tuple[Policy, float | None]:
    """``(policy, 0.0)`` when it is within ``max_macs``; else ``(scale_kept(policy, t), t)`` for a ``t <= t_max``
    whose MACs are within the bound and no more than ``rel_tol`` below it (or the smallest such ``t`` found in
    ``max_evals`` MACs counts); ``(policy, None)`` when even ``t_max`` does not fit (the caller's MACs gate
    rejects it). ``criterion``, ``max_rate``, ``min_rate``: as in ``scale_kept`` (None: unlisted layers stay
    unpruned). ``fill``: a policy more than ``rel_tol`` below the bound prunes less (``t < 0``) until it is
    within ``rel_tol`` of it, or keeps every filter of its pruned layers when even that fits, so that every
    trial spends the budget it is given. ``top_up``: see ``fit_cost``.

    A search fits every sample, so this runs once per trial: the root is found by regula falsi with the
    Illinois step (3-5 counts of ~20-60 ms on the CIFAR ResNets) rather than bisection (10+).
    """
    return fit_cost(model, policy, lambda p: policy_macs(model, p, input_shape), max_macs, input_shape, **options)


def fit_cost(
    model: nn.Module,
    policy: Policy,
    cost: Callable[[Policy], float],
    bound: float,
    input_shape: Sequence[int],
    *,
    criterion: str | None = None,
    max_rate: float = 1.0,
    min_rate: float = 0.0,
    fill: bool = False,
    t_max: float = 0.95,
    rel_tol: float = FIT_REL_TOL,
    max_evals: int = 10,
    top_up: bool = False,
    allowed: Callable[[Policy], bool] | None = None,
    fixed: frozenset[str] = frozenset(),
) -> tuple[Policy, float | None]:
    """``fit_macs`` for any cost that falls as ``t`` grows (MACs, predicted latency): ``cost(policy) <= bound``
    after scaling the kept filters by ``1 - t``. ``top_up``: a scaled policy that the one factor leaves more
    than ``rel_tol`` under the bound (its whole-filter steps are coarse where many layers share a rate) gets
    filters back one at a time (``top_up_filters``, each step also ``allowed``, e.g. a second bound) until it
    is within ``rel_tol``; the ``t`` returned is then the one factor's. ``fixed``: as in ``scale_kept``."""
    policy, t = _fit_one_factor(model, policy, cost, bound, input_shape, criterion=criterion, max_rate=max_rate,
                                min_rate=min_rate, fill=fill, t_max=t_max, rel_tol=rel_tol, max_evals=max_evals,
                                fixed=fixed)  # fmt: skip
    if top_up and t:
        policy = top_up_filters(model, policy, cost, bound, input_shape, rel_tol=rel_tol, min_rate=min_rate,
                                allowed=allowed, fixed=fixed)  # fmt: skip
    return policy, t


def top_up_filters(
    model: nn.Module,
    policy: Policy,
    cost: Callable[[Policy], float],
    bound: float,
    input_shape: Sequence[int],
    *,
    rel_tol: float,
    min_rate: float = 0.0,
    max_evals: int = 400,
    allowed: Callable[[Policy], bool] | None = None,
    fixed: frozenset[str] = frozenset(),
) -> Policy:
    """``policy`` (within ``bound``) with filters given back one at a time, most-pruned group first and round
    robin, while ``cost`` stays within the bound (and ``allowed`` holds), until it is within ``rel_tol`` under
    it (or no group can take another filter, or ``max_evals`` costs were counted). Deterministic, and a result
    within ``rel_tol`` is its own top-up, so a resumed trial evaluates the same policy."""
    shape = tuple(input_shape)
    g = model_graph(model, shape)
    f = cost(policy) - bound
    if f > 0:
        raise SlimError(f"top_up_filters needs a policy within the bound: {f + bound:,.0f} > {bound:,.0f}")
    open_: list[tuple[float, str, list[str]]] = []
    for leader in prunable_leaders(model, shape):
        listed = [m for m in g.groups.get(leader, [leader]) if m in policy.layers]
        if listed and not all(m in fixed for m in listed):
            open_.append((-float(policy[listed[0]].prune_rate), leader, listed))
    groups = [(leader, listed) for _, leader, listed in sorted(open_)]
    evals = 0
    while -f > rel_tol * bound and groups and evals < max_evals:
        for leader, listed in list(groups):
            n = g.layers[leader].out_channels
            k0 = policy[listed[0]].keep_count(n)
            grown = scale_kept(model, Policy({m: policy[m] for m in listed}), -1.0 / k0, shape, criterion=None,
                               min_rate=min_rate)  # fmt: skip
            if grown[listed[0]].keep_count(n) <= k0:  # all its filters back (or the space's smallest rate)
                groups.remove((leader, listed))
                continue
            cand = Policy(dict(policy.layers) | dict(grown.layers))
            c = cost(cand) - bound
            evals += 1
            if c > 0 or (allowed is not None and not allowed(cand)):  # one more filter here breaks a bound
                groups.remove((leader, listed))
                continue
            policy, f = cand, c
            if -f <= rel_tol * bound or evals >= max_evals:
                break
    return policy


def _fit_one_factor(
    model: nn.Module,
    policy: Policy,
    cost: Callable[[Policy], float],
    bound: float,
    input_shape: Sequence[int],
    *,
    criterion: str | None,
    max_rate: float,
    min_rate: float,
    fill: bool,
    t_max: float,
    rel_tol: float,
    max_evals: int,
    fixed: frozenset[str],
) -> tuple[Policy, float | None]:
    f0 = cost(policy) - bound
    if f0 <= 0 and (not fill or -f0 <= rel_tol * bound):
        return policy, 0.0

    def scale(t: float) -> Policy:
        return scale_kept(
            model, policy, t, input_shape, criterion=criterion, max_rate=max_rate, min_rate=min_rate, fixed=fixed
        )

    if f0 > 0:
        lo, hi, f_lo = 0.0, t_max, f0
        best = scale(hi)
        f_hi = cost(best) - bound
        if f_hi > 0:
            return policy, None
    else:  # fill: at t_min every pruned layer keeps all its filters (k0 >= n (1 - rate))
        top_rate = max((lp.prune_rate for lp in policy.layers.values()), default=0.0)
        t_min = 1.0 - 1.0 / (1.0 - top_rate)
        full = scale(t_min)
        f_lo = cost(full) - bound
        if f_lo <= 0:
            return full, t_min
        lo, hi, f_hi, best = t_min, 0.0, f0, policy
    w_lo, w_hi, side, repeats = f_lo, f_hi, 0, 0  # Illinois: the weight of an end that stays put is halved
    for _ in range(max_evals - 2):
        if -f_hi <= rel_tol * bound or hi - lo < 4e-3:
            break
        if repeats >= 2:  # the cost is a step function of t (whole filters): regula falsi stalls at a step
            x = (lo + hi) / 2
        else:
            x = (lo * w_hi - hi * w_lo) / (w_hi - w_lo)
            x = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
        cand = scale(x)
        f = cost(cand) - bound
        new_side = -1 if f <= 0 else 1
        repeats = repeats + 1 if new_side == side else 0
        if f <= 0:
            hi, f_hi, w_hi, best = x, f, f, cand
            w_lo = w_lo / 2 if side == -1 else w_lo
        else:
            lo, f_lo, w_lo = x, f, f
            w_hi = w_hi / 2 if side == 1 else w_hi
        side = new_side
    return best, hi
