"""Ray Tune results without Ray: where an experiment lives, its meta file, the final result a trial reports,
the trial table (one row per Ray trial) and its rows as ``TrialRecord``s.

What each trial reports to Tune (``tune.report``): intermediate ``{"val_acc", "step", "status":
"partial"}`` from the fine-tune's periodic evaluations (ASHA stops the weak ones), then one final result
with every metric of ``evaluators.evaluate``, ``status`` (ok | infeasible | fail), ``feasible``,
``reason``, the policy JSON, the Optuna trial ``number`` and the Ray ``node_id``. Infeasible and failed
candidates report ``val_acc = 0.0``, so neither ASHA nor the sampler mistakes them for good ones;
the MACs violation also goes to the Optuna trial as a constraint (TPE / NSGA-II are constraint-aware).

Files next to the experiment: ``<workdir>/ray/<name>-results.csv`` (one row per trial, written at the end of
every run) and ``<workdir>/ray/<name>-meta.json`` (target n_trials, objectives, baseline info for reports).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.evaluators.evaluate import EvalResult
from slimsearch.search import fingerprint
from slimsearch.search.paths import check_writable_dir
from slimsearch.search.records import COUNTED_STATUSES, TrialRecord
from slimsearch.search.study import StudyConfig

# Metrics copied from an EvalResult into the final Tune result (when present).
RESULT_METRICS = (
    "val_acc", "macs", "flops", "params", "macs_ratio", "params_ratio", "macs_violation", "latency_ms",
    "latency_pred_ms", "latency_ratio", "latency_violation", "apply_s", "cost_s", "train_s", "eval_s", "wall_s",
)  # fmt: skip


# Columns of the results table, first; Ray's own columns and config/<param> follow.
TABLE_COLUMNS = ("number", "trial_id", "ray_status", "status", "feasible", "val_acc", "macs", "params",
                 "macs_ratio", "params_ratio", "flops", "latency_ms", "latency_pred_ms", "wall_s", "seed", "reason",
                 "node_id", "policy_hash", "model_digest", "policy")  # fmt: skip

COUNTED = COUNTED_STATUSES  # statuses of evaluated trials (they count toward n_trials)
# Our statuses as Optuna names trial states (report tables use those).
_STATE = {"ok": "COMPLETE", "infeasible": "COMPLETE", "pruned": "PRUNED", "fail": "FAIL", "error": "FAIL",
          "running": "RUNNING", "pending": "WAITING"}  # fmt: skip


# ----------------------------------------------------------------------------- paths and meta


def ray_storage_path(cfg: StudyConfig) -> Path:
    """``RunConfig.storage_path``: ``<workdir>/ray`` (absolute)."""
    return (cfg.study.workdir / "ray").resolve()


def ray_experiment_dir(cfg: StudyConfig) -> Path:
    """The Tune experiment directory: ``<workdir>/ray/<study name>``."""
    return ray_storage_path(cfg) / cfg.name


def ray_results_csv(cfg: StudyConfig) -> Path:
    return ray_storage_path(cfg) / f"{cfg.name}-results.csv"


def ray_meta_path(cfg: StudyConfig) -> Path:
    return ray_storage_path(cfg) / f"{cfg.name}-meta.json"


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(cfg: StudyConfig, n_trials: int, info: Mapping[str, Any]) -> None:
    p = ray_meta_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"study": cfg.name, "n_trials": int(n_trials), "objectives": [o.spec for o in cfg.study.objectives],
            "experiment_dir": str(ray_experiment_dir(cfg)), "results_csv": str(ray_results_csv(cfg)), **info}  # fmt: skip
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, p)


# ----------------------------------------------------------------------------- what a trial reports


def fidelity(cfg: StudyConfig) -> tuple[int, int, bool]:
    """(max_t, grace_period, intermediate) for ASHA in units of fine-tune steps.

    The proxy (and a fine-tune without ``eval_every``) reports once, at ``max_t``; ASHA then only records.
    """
    ev = cfg.evaluator
    if ev.kind == "finetune":
        max_t = int(ev.steps)
        inter = 0 < ev.eval_every < max_t
        return max_t, int(ev.eval_every) if inter else max_t, inter
    return 1, 1, False


def final_result(cfg: StudyConfig, res: EvalResult, policy: Policy | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The last Tune result of a trial: every metric, status, feasibility, policy (values, no objects)."""
    max_t, _, _ = fidelity(cfg)
    out: dict[str, Any] = {k: float(res.metrics[k]) for k in RESULT_METRICS if k in res.metrics}
    out.update(extra)
    out.update(
        step=max_t,
        status=res.status,
        feasible=res.status == "ok",
        reason=res.reason,
        cached=bool(getattr(res, "cached", False)),
        policy=policy.to_json() if policy is not None else "",
        policy_hash=policy.hash if policy is not None else "",
        model_digest=getattr(res, "model_digest", ""),
    )
    if res.status != "ok" or not math.isfinite(out.get("val_acc", math.nan)):
        out["val_acc"] = 0.0  # infeasible / failed: worst accuracy for ASHA and the sampler
    for o in cfg.study.objectives:  # every objective needs a value for OptunaSearch
        if o.metric not in out:
            out[o.metric] = math.inf if o.direction == "minimize" else -math.inf
    return out


# ----------------------------------------------------------------------------- the trial table


def _trial_status(ray_status: str, last: Mapping[str, Any]) -> str:
    """Our status from Ray's trial status and the last result: ok | infeasible | fail | pruned | error | running."""
    s = last.get("status")
    if ray_status == "ERROR":  # Tune gave up on it (SlotGenerator replaced it): whatever it reported, not counted
        return "error"
    if s == "partial":
        return "pruned" if ray_status == "TERMINATED" else "running"
    if s in ("ok", "infeasible", "fail", "pruned"):
        return s
    return {"ERROR": "error", "TERMINATED": "error"}.get(
        ray_status, "running" if ray_status == "RUNNING" else "pending"
    )


def _first_line(e: BaseException) -> str:
    """The most telling line of an exception: Ray nests tracebacks in messages, so prefer the last
    "SomethingError: ..." line, else the first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Timeout): ", ln)]
    text = named[-1] if named else (lines[0] if lines else type(e).__name__)
    return text[:300]


def _error_line(trial: Any) -> str:
    """The telling line of a trial's latest failure, "" when there is none. Tune keeps no message on the
    ``Trial``: it appends "Failure # k (occurred at ...)" and the exception to an error file, in its staging
    folder while the driver runs (``error_file`` needs Ray), then in the trial's folder of the experiment."""
    paths = []
    for get in (lambda: trial.error_file, lambda: Path(trial.path, trial.run_metadata.error_filename)):
        try:
            paths.append(get())
        except Exception:  # no Ray session (staging path), no error file name, not a Trial
            continue
    for p in paths:
        try:
            text = Path(p).read_text(errors="replace") if p else ""
        except OSError:
            continue
        latest = re.split(r"^Failure # \d+ \(occurred at [^)]*\)[ \t]*$", text, flags=re.M)[-1]
        if latest.strip():
            return _first_line(Exception(latest))
    return ""


def trials_table(trials: Sequence[Any]) -> pd.DataFrame:
    """One row per Ray trial (``ray.tune.experiment.Trial``, read through its attributes only): our columns
    first, then Ray's and config/<param>."""

    rows = []
    for t in trials:
        last = dict(t.last_result or {})
        last.pop("config", None)
        row = {k: v for k, v in last.items() if not isinstance(v, (dict, list))}
        row.update({f"config/{k}": v for k, v in (t.config or {}).items()})
        row["trial_id"] = t.trial_id
        row["ray_status"] = t.status
        row["status"] = _trial_status(t.status, last)
        row["number"] = int(last.get("number", (t.config or {}).get("_number", -1)))
        row.setdefault("feasible", False)
        if row["status"] == "error":
            row["reason"] = f"trial error: {_error_line(t) or 'see the trial error file'}"
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    for c in TABLE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[[*TABLE_COLUMNS, *[c for c in df.columns if c not in TABLE_COLUMNS]]]
    return df.sort_values("number", kind="stable").reset_index(drop=True)


def _resumable(exp_dir: Path) -> bool:
    """Whether an earlier run left state to resume: ``tuner.pkl`` (all ``Tuner.can_restore`` checks) and an
    experiment snapshot. Tune writes ``tuner.pkl`` before its first snapshot; a driver killed in between
    leaves a directory ``Tuner.restore`` rejects ("No experiment snapshot file"), in which no trial finished:
    that one starts afresh."""
    return (exp_dir / "tuner.pkl").is_file() and any(exp_dir.glob("experiment_state-*.json"))


def check_workdir(cfg: StudyConfig) -> None:
    """Before anything is built or Ray starts: the workdir can be written (or created), and a resumable
    experiment in it was run with this study file (its ``<name>-meta.json`` fingerprint, ``search.fingerprint``)."""
    check_writable_dir(cfg.study.workdir, f"{cfg.path}: [study] workdir")
    if _resumable(ray_experiment_dir(cfg)):
        fingerprint.check_config(_read_meta(ray_meta_path(cfg)).get(fingerprint.ATTR), cfg)


def _target(cfg: StudyConfig, default: int) -> int:
    return int(_read_meta(ray_meta_path(cfg)).get("n_trials", default))


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (the default embeds every parameter: too long for 50+ layers)."""
    return f"trial_{trial.trial_id}"


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of "host:port" / "ray://host:port" / "[v6]:port"; None for "auto" and friends."""
    a = address.split("://", 1)[-1].strip().rstrip("/")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def read_results_csv(cfg: StudyConfig) -> pd.DataFrame | None:
    """The trial table written at the end of the last run (None when there is none)."""
    csv = ray_results_csv(cfg)
    if not csv.is_file():
        return None
    df = pd.read_csv(csv)
    for c in TABLE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df


def _value(row: Mapping[str, Any], key: str) -> Any:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _summary(policy: str) -> str:
    """A stored policy's one-line summary; "" when there is none (or it does not parse: a row from elsewhere)."""
    try:
        return Policy.from_json(policy).summary() if policy else ""
    except SlimError:
        return ""


def record_from_row(row: Mapping[str, Any]) -> TrialRecord:
    """A row of the trial table as a ``TrialRecord``. Infeasible and failed trials report val_acc 0.0 to
    Tune (the worst, for ASHA and the sampler); in a record it is "not measured"."""
    status = str(_value(row, "status") or "pending")
    metrics = {}
    for k in (*RESULT_METRICS, "fit_s"):
        v = _value(row, k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[k] = float(v)
    if status not in ("ok", "pruned"):
        metrics.pop("val_acc", None)
    policy = _value(row, "policy")
    policy = policy if isinstance(policy, str) else ""
    wall = metrics.get("wall_s")
    return TrialRecord(
        number=int(_value(row, "number") if _value(row, "number") is not None else -1),
        state=_STATE.get(status, "FAIL"), status=status, counted=status in COUNTED, metrics=metrics,
        policy=policy, policy_summary=_summary(policy),
        policy_hash=str(_value(row, "policy_hash") or ""), seed=str(_value(row, "seed") or ""),
        reason=str(_value(row, "reason") or ""), duration_s=wall, model_digest=str(_value(row, "model_digest") or ""),
        cached=bool(_value(row, "cached")), trial_id=str(_value(row, "trial_id") or ""),
    )  # fmt: skip


def records_from_table(df: pd.DataFrame) -> list[TrialRecord]:
    return [record_from_row(row) for _, row in df.iterrows()]


def seeds_of(records: Sequence[TrialRecord]) -> list[str]:
    return sorted({r.seed for r in records if r.seed})
