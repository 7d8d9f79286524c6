"""ABSHPC adaptive binary search (METHODS.md §1; Chung, Chang, Tsai, arXiv 2006.04451).

Stated by the paper: layers are processed from the LAST conv to the FIRST, each layer's rate is at most the
rate of the layer processed before it, and the tolerated accuracy loss ε (example 0.5%) bounds the search.
[inferred]: the binary search itself, with the loss measured against the ORIGINAL accuracy a0 while the
policy grows (cumulative), and ``while (hi − lo)·N_l ≥ 1``:

    a0 = acc(M0); r_prev = (N_L−1)/N_L; M = M0
    for l = L .. 1:
        lo, hi, best = 0, r_prev, 0
        while (hi − lo)·N_l ≥ 1:
            r = (lo + hi)/2
            if a0 − acc(cluster_prune(M, l, r)) ≤ ε: best, lo = r, r
            else: hi = r
        M = cluster_prune(M, l, best); r_prev = best

Rates become filter counts: a probe at r removes floor(r·N_l) filters, and ``best`` is snapped DOWN to the
filter grid (floor(best·N_l)/N_l) before it bounds the next layer, so the monotone constraint holds for the
rates actually applied, not just for the continuous probes. A probe that removes nothing reuses the known
accuracy of M (no evaluator call); probes are memoised, so evaluator calls ≤ 1 + Σ_l (ceil(log2 N_l) + 1).
``acc`` is whatever evaluator is configured (default: BN-recalibrated validation accuracy, no fine-tune);
a final fine-tune is the evaluator's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy, rate_for_removed
from slimsearch.search.methods.common import CountingAcc, MethodResult, conv_modules, cost_report
from torch import nn


def call_bound(sizes: Sequence[int]) -> int:
    """Upper bound on evaluator calls of ``abshpc_search`` for layers of ``sizes`` filters."""
    return 1 + sum(math.ceil(math.log2(n)) + 1 for n in sizes if n > 1)


def _layer_policy(removed: int, n: int, criterion: str) -> LayerPolicy:
    rate = rate_for_removed(removed, n)
    if criterion in ("hpc", "distfit"):
        # clusters = filters kept: exact, whatever rounding the rate goes through
        return LayerPolicy(prune_rate=rate, criterion=criterion, clusters=n - removed)
    return LayerPolicy(prune_rate=rate, criterion=criterion)


def abshpc_search(
    model: nn.Module,
    layers: Sequence[str],
    acc: Callable[[Policy], Any],
    *,
    epsilon: float = 0.005,
    criterion: str = "hpc",
    rate_resolution: float | None = None,
    max_rate: float | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> MethodResult:
    """Per-layer prune rates by ABSHPC's adaptive binary search, last conv first.

    ``layers``: prunable conv names in FORWARD order. ``acc(policy)`` -> accuracy in [0, 1] (a float or an
    EvalResult). ``epsilon``: tolerated loss as a fraction (0.005 = 0.5 pt) against a0 = acc(empty policy).
    ``rate_resolution``: stop a layer's search once hi − lo < max(1/N_l, rate_resolution) (None: one filter).
    ``max_rate``: start bound of the last layer (default (N_L−1)/N_L). With ``input_shape`` the report also
    holds MACs/params of the result (needs core.apply).
    """
    if not layers:
        raise SlimError("abshpc: no layers to search")
    if epsilon < 0:
        raise SlimError(f"abshpc: epsilon must be >= 0 (a fraction, 0.005 = 0.5 pt), got {epsilon!r}")
    if rate_resolution is not None and not 0 < rate_resolution < 1:
        raise SlimError(f"abshpc: rate_resolution must be in (0, 1), got {rate_resolution!r}")
    if max_rate is not None and not 0 <= max_rate < 1:
        raise SlimError(f"abshpc: max_rate must be in [0, 1), got {max_rate!r}")
    convs = conv_modules(model, layers)
    counted = CountingAcc(acc)
    a0 = counted(Policy())
    policy = Policy()
    acc_m = a0  # accuracy of the current (accepted) policy M
    last_n = convs[layers[-1]].out_channels
    r_prev = Fraction(last_n - 1, last_n) if max_rate is None else Fraction(max_rate).limit_denominator(10**6)
    history: list[dict[str, Any]] = []
    decisions: dict[str, dict[str, Any]] = {}

    for name in reversed(layers):
        n = convs[name].out_channels
        step = Fraction(1, n) if rate_resolution is None else max(Fraction(1, n), Fraction(rate_resolution))
        lo, hi, best = Fraction(0), r_prev, Fraction(0)
        best_acc = acc_m
        calls_before = counted.calls
        while hi - lo >= step:
            r = (lo + hi) / 2
            removed = math.floor(r * n)
            if removed == 0:
                a = acc_m
            else:
                a = counted(policy.with_layer(name, _layer_policy(removed, n, criterion)))
            ok = a0 - a <= epsilon
            history.append({"layer": name, "rate": float(r), "removed": removed, "acc": a, "accepted": ok})
            if ok:
                best, lo, best_acc = r, r, a
            else:
                hi = r
        removed = math.floor(best * n)
        if removed:
            policy = policy.with_layer(name, _layer_policy(removed, n, criterion))
            acc_m = best_acc
        r_prev = Fraction(removed, n)  # snapped: the next layer is bounded by the rate actually applied
        decisions[name] = {
            "filters": n,
            "removed": removed,
            "rate": removed / n,
            "acc": acc_m,
            "loss": a0 - acc_m,
            "calls": counted.calls - calls_before,
        }

    report: dict[str, Any] = {
        "a0": a0,
        "final_acc": acc_m,
        "epsilon": epsilon,
        "criterion": criterion,
        "evaluator_calls": counted.calls,
        "call_bound": call_bound([c.out_channels for c in convs.values()]),
        "layers": decisions,
        "order": list(reversed(layers)),
    }
    if input_shape is not None:
        report["cost"] = cost_report(model, policy, input_shape)
    return MethodResult("abshpc", policy, report, history)
