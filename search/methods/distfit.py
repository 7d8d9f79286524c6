"""Distribution-fitting filter pruning (METHODS.md §4; Zhang, Kou, Liu 2022).

Stated: "smaller norm = less important" leaves the kept filters' norm distribution unbalanced; the method
keeps filters whose norms fit the original distribution and deletes redundant ones. The selection itself
(criterion "distfit": equal-count L2-norm strata, the least redundant filter of each) lives in
core.criteria; this module turns rates into a policy — uniform, per layer, or from a sensitivity scan
[inferred] — and reports, per layer, the Wasserstein distance between the kept and the original filter-norm
distributions for distfit and for the norm/geometric baselines at the same keep count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from slimsearch.core.apply import kept_indices
from slimsearch.core.criteria import norm_wasserstein, select_filters
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy, rate_for_removed
from slimsearch.search.methods.common import (
    DEFAULT_SCAN_RATES,
    CountingAcc,
    MethodResult,
    admissible_rate,
    conv_modules,
    cost_report,
    sensitivity_scan,
)
from torch import nn


def _rates(layers: Sequence[str], rates: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(rates, Mapping):
        missing = [n for n in layers if n not in rates]
        if missing:
            raise SlimError(f"distfit: no rate given for layer {missing[0]!r}")
        out = {n: float(rates[n]) for n in layers}
    else:
        out = dict.fromkeys(layers, float(rates))
    bad = {n: r for n, r in out.items() if not 0.0 <= r < 1.0}
    if bad:
        name, r = next(iter(bad.items()))
        raise SlimError(f"distfit: rate of layer {name!r} must be in [0, 1), got {r!r}")
    return out


def distfit_policy(model: nn.Module, layers: Sequence[str], rates: float | Mapping[str, float]) -> Policy:
    """Criterion "distfit" on each layer at ``rates`` (one rate for all, or per layer); rate 0 layers omitted."""
    convs = conv_modules(model, layers)
    out = {}
    for name, r in _rates(layers, rates).items():
        n = convs[name].out_channels
        removed = min(n - 1, math.floor(r * n))
        if removed:
            out[name] = LayerPolicy(prune_rate=rate_for_removed(removed, n), criterion="distfit")
    return Policy(out)


def wasserstein_report(
    model: nn.Module, policy: Policy, compare: Sequence[str] = ("l1", "l2", "fpgm")
) -> dict[str, dict[str, Any]]:
    """Per pruned layer: keep count and the kept-vs-all filter-norm Wasserstein distance for the policy's
    criterion (key = its name) and for each criterion in ``compare`` at the same keep count."""
    convs = conv_modules(model, policy.layers)
    out: dict[str, dict[str, Any]] = {}
    for name, lp in policy.layers.items():
        w = convs[name].weight.detach()
        n = w.shape[0]
        k = lp.keep_count(n)
        row: dict[str, Any] = {"filters": n, "keep": k}
        for crit in dict.fromkeys((lp.criterion, *compare)):
            if crit == "group":  # scores the coupled group's weights: selected through the model's graph
                idx = kept_indices(model, Policy({name: replace(lp, criterion=crit, keep=None)}))[name]
            else:
                idx = select_filters(w, k, crit, keep_idx=lp.keep if crit == "mask" else None)
            row[crit] = norm_wasserstein(w, idx)
        out[name] = row
    return out


def distfit_search(
    model: nn.Module,
    layers: Sequence[str],
    *,
    rates: float | Mapping[str, float] | None = None,
    acc: Callable[[Policy], Any] | None = None,
    scan_rates: Sequence[float] = DEFAULT_SCAN_RATES,
    tol: float = 0.01,
    compare: Sequence[str] = ("l1", "l2", "fpgm"),
    final_eval: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> MethodResult:
    """Distfit policy at given ``rates``, or (rates None) at the rates of a sensitivity scan run with
    criterion "distfit" (largest scanned rate whose drop, and every lower rate's, is ≤ ``tol``), plus the
    Wasserstein report and, when ``acc`` is given, a0 and the final accuracy."""
    if not layers:
        raise SlimError("distfit: no layers to prune")
    counted = CountingAcc(acc) if acc is not None else None
    report: dict[str, Any] = {}
    if rates is None:
        if counted is None:
            raise SlimError("distfit: give either rates or an accuracy evaluator for the sensitivity scan")
        a0 = counted(Policy())
        scan = sensitivity_scan(model, layers, counted, rates=scan_rates, criterion="distfit", a0=a0)
        rates = {n: admissible_rate(scan[n], tol) for n in layers}
        report.update(a0=a0, sensitivity=scan, tol=tol)
    policy = distfit_policy(model, layers, rates)
    report["rates"] = dict(_rates(layers, rates))
    report["wasserstein"] = wasserstein_report(model, policy, compare)
    if counted is not None:
        report.setdefault("a0", counted(Policy()))
        if final_eval:
            report["final_acc"] = counted(policy)
        report["evaluator_calls"] = counted.calls
    if input_shape is not None:
        report["cost"] = cost_report(model, policy, input_shape)
    return MethodResult("distfit", policy, report)
