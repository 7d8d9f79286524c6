"""``TrialRecord``: one trial as status, report and export read it, whichever backend ran it; ranking the
feasible ones, the one-line trial view, and the summaries a run and a study give back.

Pure values (no Optuna, no Ray): the backends turn their trials into records (``optuna_study.record_from_trial``,
``ray_results.record_from_row``), and everything downstream reads only records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Metrics stored flat with a trial (and shown in reports), as the evaluator names them.
FLAT_METRICS = ("val_acc", "macs", "flops", "params", "macs_ratio", "params_ratio", "latency_ms", "latency_pred_ms",
                "latency_ratio")  # fmt: skip
COUNTED_STATUSES = ("ok", "infeasible", "fail", "pruned")  # evaluated trials: they count toward n_trials


@dataclass(frozen=True)
class TrialRecord:
    """One trial. ``state``: Optuna's names (COMPLETE, PRUNED, FAIL, RUNNING, WAITING); ``status``: the
    evaluator's verdict (ok | infeasible | fail | pruned), "error" for a trial given up on, "" or
    "running"/"pending" before it is evaluated. ``metrics`` holds measured values only (an infeasible or
    failed trial has no val_acc). ``counted``: whether it counts toward n_trials."""

    number: int
    state: str
    status: str
    counted: bool
    metrics: Mapping[str, float] = field(default_factory=dict)
    policy: str = ""  # the evaluated policy's JSON ("" when there is none)
    policy_summary: str = ""
    policy_hash: str = ""
    seed: str = ""
    reason: str = ""
    duration_s: float | None = None
    model_digest: str = ""
    cached: bool = False
    trial_id: str = ""  # the backend's own id where it has one (Ray's trial id)

    def metric(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and self.status == "ok"


def fmt_count(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def trial_line(r: TrialRecord) -> str:
    """One human line per finished trial."""
    status = r.status or ("interrupted" if r.state == "FAIL" else r.state.lower())
    m = r.metric
    parts = [f"trial {r.number:>4}", f"{status:<10}"]
    if m("val_acc") is not None:
        parts.append(f"val_acc {m('val_acc'):.4f}")
    if m("macs") is not None:
        ratio = m("macs_ratio")
        parts.append(f"MACs {fmt_count(m('macs'))} ({ratio if ratio is not None else float('nan'):.1%})")
    if m("params") is not None:
        parts.append(f"params {fmt_count(m('params'))}")
    if m("latency_ms") is not None:
        parts.append(f"{m('latency_ms'):.2f} ms")
    if m("wall_s") is not None:
        parts.append(f"{m('wall_s'):.1f}s" + (" (cached)" if r.cached else ""))
    if r.seed:
        parts.append(f"seed {r.seed}")
    if r.reason and status != "ok":
        parts.append(f"- {r.reason[:120]}")
    return "  ".join(parts)


def ranked(records: Sequence[TrialRecord], max_macs: float | None = None) -> list[TrialRecord]:
    """Feasible trials (within the study's bounds and ``max_macs``), best first: val_acc, then fewer MACs,
    then the earlier trial; one per distinct network (``model_digest``; the policy where a trial has none):
    cached repeats, re-drawn policies and policies that build the same network collapse."""
    ok = [r for r in records if r.feasible]
    if max_macs is not None:
        ok = [r for r in ok if (r.metric("macs") if r.metric("macs") is not None else math.inf) <= max_macs]
    ok.sort(key=lambda r: (-(r.metric("val_acc") or 0.0), r.metric("macs") or 0.0, r.number))
    seen: set[str] = set()
    out = []
    for r in ok:
        key = r.model_digest or r.policy or f"#{r.number}"
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def best(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The first of ``ranked`` (None when no trial is feasible)."""
    return next(iter(ranked(records)), None)


BEST_KEYS = ("val_acc", "macs", "macs_ratio", "params", "latency_pred_ms", "latency_ratio")


def best_summary(records: Sequence[TrialRecord]) -> dict[str, Any] | None:
    """The best trial's number, metrics and policy hash (None when no trial is feasible)."""
    b = best(records)
    if b is None:
        return None
    return {"trial": b.number, **{k: b.metric(k) for k in BEST_KEYS}, "policy_hash": b.policy_hash}


def by_state(records: Sequence[TrialRecord], key: str = "state") -> dict[str, int]:
    """How many records per ``state`` (or per ``status`` with ``key="status"``)."""
    out: dict[str, int] = {}
    for r in records:
        k = getattr(r, key)
        out[k] = out.get(k, 0) + 1
    return out


@dataclass
class StudyInfo:
    """What a backend knows about a study besides its trials: where it is stored (masked), its target,
    objectives and seeds, the counts by state it reports, and the baseline info recorded at the start
    (``context.study_info``: baseline cost, bounds, layers, baseline_sha)."""

    name: str
    storage: str
    n_trials: int
    objectives: list[str]
    seeds: list[str]
    by_state: dict[str, int]
    baseline: dict[str, Any]


@dataclass
class RunSummary:
    """What ``Backend.run`` returns: counted trials toward n_trials, counts by state, the best trial, time."""

    name: str
    counted: int
    n_trials: int
    by_state: dict[str, int]
    best: dict[str, Any] | None
    wall_s: float
    done: bool
    best_policy: Any = None  # core.policy.Policy of ``best`` (Ray backend)
    experiment_dir: Path | None = None  # Ray backend
    results_csv: Path | None = None  # Ray backend
    resumed: bool = False
    table: Any = field(default=None, repr=False)  # Ray backend: pandas DataFrame, one row per trial


def counted(records: Sequence[TrialRecord]) -> int:
    return sum(r.counted for r in records)
