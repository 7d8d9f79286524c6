"""The trial core both backends run: a sampled policy is fitted onto the study's bounds, evaluated, and turned
into what the backend records (Optuna user attrs here; Ray's final Tune result in ``ray_results.final_result``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import slimsearch.evaluators.evaluate as evaluation
from slimsearch.core.policy import Policy
from slimsearch.evaluators.evaluate import EvalResult
from slimsearch.search.context import StudyContext
from slimsearch.search.records import FLAT_METRICS
from slimsearch.search.study import StudyConfig

# ``report(step, val_acc) -> stop?``: the evaluator's periodic val accuracy during a fine-tune (pruners, ASHA).
Report = Callable[[int, float], bool]


@dataclass
class Fitted:
    """The policy a trial evaluates (the sample fitted onto the bounds) and the seconds the fit took."""

    policy: Policy
    fit_s: float


def fit_trial(sctx: StudyContext, sampled: Policy) -> Fitted:
    """``sampled`` fitted onto the study's bounds (``StudyContext.fit``), timed."""
    t0 = time.perf_counter()
    policy = sctx.fit(sampled)
    return Fitted(policy, time.perf_counter() - t0)


def evaluate_trial(sctx: StudyContext, cfg: StudyConfig, fitted: Fitted, report: Report | None = None) -> EvalResult:
    """The study's evaluator on the fitted policy (``report``: intermediate val accuracies)."""
    return evaluation.evaluate(sctx.eval_ctx, cfg.evaluator, fitted.policy, report=report)


def trial_attrs(fitted: Fitted, res: EvalResult) -> dict[str, Any]:
    """What a trial records of its evaluation, as plain values; "status" is last (it marks the trial evaluated)."""
    policy = fitted.policy
    attrs: dict[str, Any] = {
        "policy": policy.to_json(),
        "policy_hash": policy.hash,
        "policy_summary": policy.summary(),
        "metrics": {**{k: float(v) for k, v in res.metrics.items()}, "fit_s": fitted.fit_s},
        "reason": res.reason,
        "cached": bool(res.cached),
    }
    if getattr(res, "model_digest", ""):
        attrs["model_digest"] = res.model_digest
    attrs.update({k: float(res.metrics[k]) for k in FLAT_METRICS if k in res.metrics})
    if res.intermediate:
        attrs["intermediate"] = [[int(s), float(a)] for s, a in res.intermediate]
    attrs["status"] = res.status
    return attrs


def objective_values(cfg: StudyConfig, metrics: dict[str, float]) -> list[float]:
    """Objective values from a result's metrics; missing ones (infeasible: no val_acc) get the worst."""
    out = []
    for o in cfg.study.objectives:
        v = metrics.get(o.metric)
        if v is None or not math.isfinite(v):
            v = 0.0 if o.metric == "val_acc" else (math.inf if o.direction == "minimize" else -math.inf)
        out.append(float(v))
    return out
