"""Ray Tune backend: the study's search space through ``OptunaSearch``, ASHA on the intermediate val_acc.

One Ray Tune experiment per study, stored under ``<workdir>/ray/<study name>`` (``RunConfig.storage_path``
= ``<workdir>/ray``; an absolute path, so every node of a cluster on a shared filesystem writes the same
place). Running again continues it with ``Tuner.restore``: finished trials are kept, unfinished ones are
restarted from scratch with their parameters (there are no checkpoints: a trial is a short evaluation), and a
larger ``n_trials`` adds trials to the same experiment (see ``SlotGenerator`` in ``_search_classes``).

A trial whose worker process dies is retried with the same parameters up to ``[study] max_retry`` times
(``FailureConfig(max_failures)``); after that it is ERROR, does not count, and a fresh trial takes its slot
(at most n_trials such replacements), so a run still ends with n_trials evaluated trials. ERROR trials are
not restarted on resume: their slots were already refilled.

What each trial reports to Tune (``tune.report``): intermediate ``{"val_acc", "step", "status":
"partial"}`` from the fine-tune's periodic evaluations (ASHA stops the weak ones), then one final result
with every metric of ``evaluators.evaluate``, ``status`` (ok | infeasible | fail), ``feasible``,
``reason``, the policy JSON, the Optuna trial ``number`` and the Ray ``node_id``. Infeasible and failed
candidates report ``val_acc = 0.0``, so neither ASHA nor the sampler mistakes them for good ones;
the MACs violation also goes to the Optuna trial as a constraint (TPE / NSGA-II are constraint-aware).

Files next to the experiment (read by ``ray_trials`` / ``ray_best_policy`` without Ray running):
``<workdir>/ray/<name>-results.csv`` (one row per trial, written at the end of every run) and
``<workdir>/ray/<name>-meta.json`` (target n_trials, objectives, baseline info for reports).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.search.study import StudyConfig

Log = Callable[[str], None]

# Metrics copied from an EvalResult into the final Tune result (when present).
RESULT_METRICS = (
    "val_acc", "macs", "flops", "params", "macs_ratio", "params_ratio", "macs_violation", "latency_ms",
    "latency_pred_ms", "latency_ratio", "latency_violation", "apply_s", "cost_s", "train_s", "eval_s", "wall_s",
)  # fmt: skip
# Columns of the results table, first; Ray's own columns and config/<param> follow.
TABLE_COLUMNS = ("number", "trial_id", "ray_status", "status", "feasible", "val_acc", "macs", "params",
                 "macs_ratio", "params_ratio", "flops", "latency_ms", "latency_pred_ms", "wall_s", "seed", "reason",
                 "node_id", "policy_hash", "model_digest", "policy")  # fmt: skip
CONNECT_TIMEOUT_S = 5.0
COUNTED = ("ok", "infeasible", "fail", "pruned")  # statuses of evaluated trials (they count toward n_trials)

# (study file, study name) -> StudyContext, per Ray worker process: trials reusing the actor reuse it.
_CONTEXTS: dict[tuple[str, str], Any] = {}


# ----------------------------------------------------------------------------- paths


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


# ----------------------------------------------------------------------------- connecting


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of "host:port" / "ray://host:port" / "[v6]:port"; None for "auto" and friends."""
    a = address.split("://", 1)[-1].strip().rstrip("/")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with a ``SlimError`` when nothing listens at ``address`` (``ray.init`` would retry for minutes).

    "auto" is resolved through Ray's own lookup (RAY_ADDRESS, then the last cluster started on this machine).
    """
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # no public equivalent

        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except Exception as e:
            raise SlimError(f"cannot connect to Ray at {address}: {_first_line(e)}") from None
        if not target:
            raise SlimError(f"cannot connect to Ray at {address}: no running Ray cluster found on this machine")
    hp = _host_port(target)
    if hp is None:
        raise SlimError(f"cannot connect to Ray at {address}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        raise SlimError(f"cannot connect to Ray at {address}: {hp[0]}:{hp[1]} unreachable ({e})") from None


def _first_line(e: BaseException) -> str:
    """The most telling line of an exception: Ray nests tracebacks in messages, so prefer the last
    "SomethingError: ..." line, else the first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Timeout): ", ln)]
    text = named[-1] if named else (lines[0] if lines else type(e).__name__)
    return text[:300]


def _runtime_env() -> dict[str, Any]:
    """Workers import this package from the checkout, and see the SLIMSEARCH_* settings of the driver."""
    import slimsearch

    root = str(Path(slimsearch.__file__).resolve().parents[1])  # not the package's folder: its core/ would shadow
    env = {k: v for k, v in os.environ.items() if k.startswith("SLIMSEARCH_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


def connect(address: str | None, num_cpus: int) -> bool:
    """Start a private local Ray (``address`` None) or join the cluster at ``address``.

    Returns True when this call initialised Ray (the caller shuts it down). Already initialised: reused.
    Ray >= 2.5x clusters use token authentication: a client joining with an explicit address needs
    ``RAY_AUTH_MODE=token`` and the cluster's token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or
    ``RAY_AUTH_TOKEN``) in its environment.
    """
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "runtime_env": _runtime_env(),
                          "logging_level": logging.WARNING, "configure_logging": True}  # fmt: skip
    if address is None:
        # "local": always a new instance, never another user's cluster found in /tmp/ray.
        ray.init(address="local", num_cpus=num_cpus, **kw)
        return True
    check_reachable(address)
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        cause = e.__cause__ or e
        hint = ""
        if "InvalidAuthToken" in str(cause) or "AuthenticationError" in str(cause):
            hint = (
                " (the cluster uses token authentication: start slimsearch with RAY_AUTH_MODE=token and the "
                "cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
            )
        raise SlimError(f"cannot connect to Ray at {address}: {_first_line(cause)}{hint}") from None
    return True


# ----------------------------------------------------------------------------- the trainable


def _worker_context(cfg: StudyConfig) -> Any:
    """The study context of this worker process, built once (baseline must be cached by the driver)."""
    key = (str(cfg.path), cfg.name)
    sctx = _CONTEXTS.get(key)
    if sctx is None:
        from slimsearch.evaluators.cache import ResultCache
        from slimsearch.search.context import build_study_context

        sctx = build_study_context(cfg, allow_pretrain=False)
        sctx.eval_ctx.cache = ResultCache(cfg.study.workdir / "cache")  # shared with the Optuna backend
        _CONTEXTS[key] = sctx
    return sctx


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


def final_result(cfg: StudyConfig, res: Any, policy: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
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


def _trainable(config: dict[str, Any], study: StudyConfig) -> None:
    """Ray Tune function trainable: params -> Policy -> ``evaluate`` -> ``tune.report``."""
    import ray
    import torch
    from ray import tune
    from slimsearch.evaluators.evaluate import EvalResult, evaluate, one_line

    torch.set_num_threads(int(study.evaluator.cpus_per_trial))  # the CPUs the trial requested
    extra = {"number": int(config.get("_number", -1)), "seed": str(config.get("_seed", "")),
             "node_id": ray.get_runtime_context().get_node_id()}  # fmt: skip
    policy = None
    try:
        sctx = _worker_context(study)
        sampled = sctx.space.policy_from_params(config)
        t_fit = time.perf_counter()
        policy = sctx.fit(sampled)
        extra["fit_s"] = time.perf_counter() - t_fit
    except Exception as e:  # e.g. a worker that cannot see the data or the baseline: a failed trial
        res = EvalResult("fail", {}, f"worker: {one_line(e)}")
        tune.report(final_result(study, res, policy, extra))
        return
    max_t, _, inter = fidelity(study)
    report = None
    if inter:

        def report(step: int, acc: float) -> bool:
            if step < max_t:  # the final result carries the last step (ASHA stops a trial at max_t)
                tune.report({"val_acc": float(acc), "step": int(step), "status": "partial", **extra})
            return False  # ASHA stops a trial itself: the next tune.report ends its thread

    res = evaluate(sctx.eval_ctx, study.evaluator, policy, report=report)
    tune.report(final_result(study, res, policy, extra))


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (the default embeds every parameter: too long for 50+ layers)."""
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------- search algorithm

_SEARCH_CLASSES: dict[str, type] = {}


def _search_classes() -> tuple[type, type]:
    """(OptunaSearch subclass, SearchGenerator subclass), defined lazily so importing this module needs no Ray.

    They must stay the same class objects for pickling (``tuner.pkl`` holds them): cached at module level
    and registered under stable names in this module.
    """
    if _SEARCH_CLASSES:
        return _SEARCH_CLASSES["search"], _SEARCH_CLASSES["generator"]
    from optuna.trial import TrialState
    from ray.tune import Callback
    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    class SlimOptunaSearch(OptunaSearch):
        """OptunaSearch plus: the Optuna trial number and seed label in the config, the MACs and latency
        constraints (``bounds``), failed evaluations told as FAIL and ASHA-stopped trials as PRUNED (not as
        COMPLETE)."""

        def __init__(
            self, *args: Any, seed_labels: tuple[str, ...] = (), bounds: tuple[str, ...] = (), **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.seed_labels = tuple(seed_labels)
            self.bounds = tuple(bounds)

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if params is None:
                return None
            n = self._ot_trials[trial_id].number
            params["_number"] = n
            if n < len(self.seed_labels):
                params["_seed"] = self.seed_labels[n]
            return params

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            status = (result or {}).get("status")
            if result and self.bounds and any(k.endswith("_violation") for k in result):
                from slimsearch.evaluators.evaluate import violations

                cons = violations(result, self.bounds)
                ot_trial.set_user_attr("constraint", list(cons.values()))  # read by constraints_func (optuna < 5)
                if hasattr(ot_trial, "set_constraint"):
                    for name, v in cons.items():
                        ot_trial.set_constraint(name, v)
            if status in ("fail", "partial"):
                state = TrialState.FAIL if status == "fail" else TrialState.PRUNED
                try:
                    self._ot_study.tell(ot_trial, state=state)
                except Exception as e:  # same tolerance as OptunaSearch itself
                    logging.getLogger(__name__).warning(e)
                self._completed_trials.add(trial_id)
                return None
            return super().on_trial_complete(trial_id, result, error)

    class SlotGenerator(SearchGenerator):
        """SearchGenerator with n_trials *evaluated* trials as its goal.

        A trial that ends ERROR (its process died more than ``max_retry`` times; Tune gives up on it) gets a
        fresh trial in its place, up to n_trials replacements in all, so that a study whose workers are killed
        still reaches n_trials (the Optuna backend tops up the same way). On restore the total is raised to
        the n_trials in the meta file written by the current ``run_ray`` plus the replacements so far (the
        saved ``total_samples`` is the first run's num_samples), so a resumed experiment reaches a new target."""

        def __init__(self, searcher: Any, meta_path: str) -> None:
            super().__init__(searcher)
            self.meta_path = meta_path
            self.errors = 0  # trials that ended ERROR

        def _target(self) -> int | None:
            target = _read_meta(Path(self.meta_path)).get("n_trials")
            return target if isinstance(target, int) else None

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            super().on_trial_complete(trial_id, result, error)
            if error:
                self.errors += 1
                if self.errors <= (self._target() or self._total_samples):
                    self._total_samples += 1
                    self._finished = False

        def get_state(self) -> dict:
            return {**super().get_state(), "errors": self.errors}

        def set_state(self, state: dict) -> None:
            super().set_state(state)
            self.errors = int(state.get("errors", 0))
            target = self._target()
            if target is not None and target + min(self.errors, target) > self._total_samples:
                self._total_samples = target + min(self.errors, target)
                self._finished = False

    class TrialLines(Callback):
        """One line per finished trial through ``_PROGRESS_LOG``."""

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _log_trial_complete(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _log_trial_error(trial)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _log_trial_error(trial, retry=True)

    classes = {"SlimOptunaSearch": SlimOptunaSearch, "SlotGenerator": SlotGenerator, "TrialLines": TrialLines}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name
    globals().update(classes)
    _SEARCH_CLASSES.update(search=SlimOptunaSearch, generator=SlotGenerator, lines=TrialLines)
    return SlimOptunaSearch, SlotGenerator


def __getattr__(name: str) -> Any:
    """Unpickling ``tuner.pkl`` looks the classes up here: define them on first access."""
    if name in ("SlimOptunaSearch", "SlotGenerator", "TrialLines"):
        _search_classes()
        return globals()[name]
    raise AttributeError(name)


def make_search_alg(cfg: StudyConfig, space: Any, seeds: list[tuple[str, Any]], workers: int) -> Any:
    """SlotGenerator(ConcurrencyLimiter(SlimOptunaSearch)) for ``Tuner(param_space=space.ray_param_space())``.

    The sampler is the study's (``search.runner.make_sampler``: seeded TPE / NSGA-II / CMA-ES / random);
    seed policies are ``points_to_evaluate`` (complete points: every parameter of the Ray space).
    """
    from ray.tune.search import ConcurrencyLimiter
    from slimsearch.search.runner import bound_names, make_sampler

    search_cls, gen_cls = _search_classes()
    objectives = cfg.study.objectives
    metric: str | list[str] = [o.metric for o in objectives]
    mode: str | list[str] = ["max" if o.direction == "maximize" else "min" for o in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    points = [space.params_from_policy(p, strict=False, complete=True) for _, p in seeds]
    # The space itself reaches the searcher through Tuner(param_space=...) (set_search_properties).
    searcher = search_cls(
        metric=metric,
        mode=mode,
        points_to_evaluate=points or None,
        sampler=make_sampler(cfg, cfg.study.seed),
        seed_labels=tuple(label for label, _ in seeds),
        bounds=bound_names(cfg),
    )
    return gen_cls(ConcurrencyLimiter(searcher, max_concurrent=workers), str(ray_meta_path(cfg)))


def make_scheduler(cfg: StudyConfig) -> Any:
    """ASHA on val_acc (max) with ``time_attr="step"`` (fine-tune steps)."""
    from ray.tune.schedulers import ASHAScheduler

    max_t, grace, _ = fidelity(cfg)
    return ASHAScheduler(time_attr="step", metric="val_acc", mode="max", max_t=max_t, grace_period=grace)


# ----------------------------------------------------------------------------- results


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


def trials_table(trials: list[Any]) -> Any:
    """One row per Ray trial (``ray.tune.experiment.Trial``): our columns first, then Ray's and config/<param>."""
    import pandas as pd

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


def _load_trials(exp_dir: Path) -> list[Any]:
    """The experiment's trials from its state file (no Ray runtime needed)."""
    from ray.tune import ExperimentAnalysis

    # Trials that never reported (a crash right after they started) make it warn once per load: not news.
    lg = logging.getLogger("ray.tune.analysis.experiment_analysis")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        return list(ExperimentAnalysis(str(exp_dir)).trials)
    finally:
        lg.setLevel(old)


def ray_trials(cfg: StudyConfig) -> Any:
    """The study's trial table (pandas DataFrame), for ``status`` / ``report`` / ``export``.

    Read from the experiment directory when it exists (current even while a run is going on or after a
    crash; Ray need not be running), else from the CSV written at the end of the last run.
    """
    import pandas as pd

    exp = ray_experiment_dir(cfg)
    if exp.is_dir():
        try:
            return trials_table(_load_trials(exp))
        except Exception:  # a half-written state: fall back to the last complete CSV
            pass
    csv = ray_results_csv(cfg)
    if csv.is_file():
        df = pd.read_csv(csv)
        for c in TABLE_COLUMNS:
            if c not in df.columns:
                df[c] = None
        return df
    raise SlimError(f"no Ray results for study {cfg.name!r} under {ray_storage_path(cfg)}; "
                    f"start it with `slimsearch run {cfg.path}`")  # fmt: skip


def ranked_rows(df: Any) -> Any:
    """Feasible (status ok) trials, best first: val_acc, then fewer MACs, then lower number; one row per
    distinct network (as ``search.runner.ranked_feasible`` for Optuna studies)."""
    ok = df[df["status"] == "ok"]
    ok = ok.assign(_neg_macs=-ok["macs"].astype(float), _neg_n=-ok["number"].astype(int))
    ok = ok.sort_values(["val_acc", "_neg_macs", "_neg_n"], ascending=False)
    if "policy" in ok.columns:
        key = ok["policy"].astype(str)
        if "model_digest" in ok.columns:  # one row per network; the policy where no digest was recorded
            digest = ok["model_digest"]
            key = digest.where(digest.notna() & (digest.astype(str) != ""), key).astype(str)
        ok = ok[~key.duplicated()]
    return ok.drop(columns=["_neg_macs", "_neg_n"])


def best_row(df: Any) -> Any | None:
    """The first of ``ranked_rows`` (None when no trial is feasible)."""
    ok = ranked_rows(df)
    return None if ok.empty else ok.iloc[0]


def _row_metrics(row: Any) -> dict[str, Any]:
    out = {}
    for k in ("number", "trial_id", "status", "val_acc", "macs", "flops", "params", "macs_ratio", "params_ratio",
              "latency_ms", "reason", "seed", "node_id", "policy_hash"):  # fmt: skip
        v = row.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def ray_best_policy(cfg: StudyConfig, trial: str | int = "best") -> tuple[Any, dict[str, Any]]:
    """(Policy, metrics) of a Ray trial: "best" (highest feasible val_acc), an Optuna trial number, or a
    Ray trial id. Used by ``slimsearch export`` for Ray studies; a missing or unusable trial is a SlimError."""
    from slimsearch.core.policy import Policy

    df = ray_trials(cfg)
    if trial == "best":
        row = best_row(df)
        if row is None:
            raise SlimError(f"study {cfg.name!r}: no feasible finished Ray trial to export yet")
    else:
        s = str(trial).strip()
        hit = df[df["number"].astype(str) == s] if s.isdigit() else df[df["trial_id"].astype(str) == s]
        if hit.empty:
            raise SlimError(f"--trial {trial}: no such trial in Ray study {cfg.name!r} ({len(df)} trials)")
        row = hit.iloc[0]
        if row["status"] not in ("ok", "infeasible"):
            why = row.get("reason")
            raise SlimError(f"--trial {trial}: trial is {row['status']}, only evaluated trials can be exported"
                            + (f" ({why})" if isinstance(why, str) and why else ""))  # fmt: skip
    pol = row.get("policy")
    if not isinstance(pol, str) or not pol:
        raise SlimError(f"--trial {trial}: Ray trial {row.get('trial_id')} has no stored policy")
    return Policy.from_json(pol, where=f"Ray trial {row.get('trial_id')} policy"), _row_metrics(row)


_STATE = {"ok": "COMPLETE", "infeasible": "COMPLETE", "pruned": "PRUNED", "fail": "FAIL", "error": "FAIL",
          "running": "RUNNING", "pending": "WAITING"}  # fmt: skip


def ray_study_info(cfg: StudyConfig) -> dict[str, Any]:
    """What ``search.runner.study_info`` records for Optuna studies (baseline cost, MACs bound, layers),
    plus n_trials and objectives, from ``<name>-meta.json``; {} before the first run."""
    return _read_meta(ray_meta_path(cfg))


def ray_report_frame(cfg: StudyConfig) -> Any:
    """The trial table in ``search.report.trials_frame``'s columns (trial, state as Optuna names it,
    status, metrics, seed, policy summary, duration_s, reason), so Pareto front and charts work unchanged."""
    import pandas as pd
    from slimsearch.core.policy import Policy

    df = ray_trials(cfg)

    def summary(p: Any) -> str:
        return Policy.from_json(p).summary() if isinstance(p, str) and p else ""

    out = pd.DataFrame({
        "trial": df["number"].astype(int), "state": df["status"].map(_STATE).fillna("FAIL"), "status": df["status"],
        "val_acc": df["val_acc"], "macs": df["macs"], "macs_ratio": df["macs_ratio"], "flops": df["flops"],
        "params": df["params"], "params_ratio": df["params_ratio"], "latency_ms": df["latency_ms"],
        "seed": df["seed"].fillna(""), "policy": df["policy"].map(summary), "duration_s": df["wall_s"],
        "reason": df["reason"].fillna(""),
    })  # fmt: skip
    for c in ("val_acc", "macs", "macs_ratio", "flops", "params", "params_ratio", "latency_ms", "duration_s"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    # Infeasible and failed trials report val_acc 0.0 to Tune; in a report it is "not measured".
    out.loc[~out["status"].isin(["ok", "pruned"]), "val_acc"] = math.nan
    return out


def ray_status(cfg: StudyConfig) -> dict[str, Any]:
    """Keyword arguments for ``search.report.StudyStatus`` of a Ray study (read-only; Ray need not run)."""
    df = ray_trials(cfg)
    meta = ray_study_info(cfg)
    by = {str(k): int(v) for k, v in df["status"].value_counts().items()}
    row = best_row(df) if len(df) else None
    best = None
    if row is not None:
        m = _row_metrics(row)
        best = {
            "trial": int(row["number"]),
            **{k: float(m.get(k, math.nan)) for k in ("val_acc", "macs", "macs_ratio", "params")},
        }
    seeds = sorted({str(s) for s in df["seed"].dropna() if str(s)}) if "seed" in df else []
    return {
        "name": cfg.name,
        "storage": f"ray: {ray_experiment_dir(cfg)}",
        "n_trials": int(meta.get("n_trials", cfg.study.n_trials)),
        "counted": sum(by.get(s, 0) for s in COUNTED),
        "by_state": by,
        "best": best,
        "objectives": list(meta.get("objectives", [o.spec for o in cfg.study.objectives])),
        "seeds": seeds,
    }


# ----------------------------------------------------------------------------- progress lines


def _trial_line(row: Mapping[str, Any]) -> str:
    from slimsearch.search.runner import fmt_count

    parts = [f"trial {int(row.get('number', -1)):>4}", f"{row.get('status', '?'):<10}"]
    if row.get("status") in ("ok", "pruned"):
        parts.append(f"val_acc {float(row.get('val_acc', 0.0)):.4f}")
    if row.get("macs") is not None and math.isfinite(float(row["macs"])):
        parts.append(f"MACs {fmt_count(float(row['macs']))} ({float(row.get('macs_ratio', math.nan)):.1%})")
    if row.get("wall_s") is not None:
        parts.append(f"{float(row['wall_s']):.1f}s")
    if row.get("seed"):
        parts.append(f"seed {row['seed']}")
    if row.get("reason") and row.get("status") != "ok":
        parts.append(f"- {str(row['reason'])[:120]}")
    return "  ".join(parts)


# The callback object is pickled into the experiment (tuner.pkl) and comes back on restore; it prints
# through this module-level logger so a resumed run logs to its own caller (None: silent).
_PROGRESS_LOG: Log | None = None


def _log_trial_complete(trial: Any) -> None:
    if _PROGRESS_LOG is not None:
        last = dict(trial.last_result or {})
        last["status"] = _trial_status("TERMINATED", last)
        _PROGRESS_LOG(_trial_line(last))


def _log_trial_error(trial: Any, retry: bool = False) -> None:
    """A trial's process died (or its code raised): retried with the same parameters, or given up."""
    if _PROGRESS_LOG is not None:
        n = (trial.config or {}).get("_number", "?")
        k = trial.run_metadata.num_failures
        why = _error_line(trial) or "?"
        then = f"retrying it ({k} of {trial.max_failures})" if retry else "a fresh trial takes its slot"
        _PROGRESS_LOG(f"trial {n:>4}  error       attempt {k}: {why}; {then}")


# ----------------------------------------------------------------------------- entry point


@dataclass
class RayRunSummary:
    """Same leading fields as ``search.runner.RunSummary``; ``by_state`` counts our statuses."""

    name: str
    counted: int
    n_trials: int
    by_state: dict[str, int]
    best: dict[str, Any] | None
    wall_s: float
    done: bool
    best_policy: Any = None  # core.policy.Policy of ``best``
    experiment_dir: Path | None = None
    results_csv: Path | None = None
    resumed: bool = False
    table: Any = field(default=None, repr=False)  # pandas DataFrame, one row per trial


def run_ray(
    cfg: StudyConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    n_trials: int | None = None,
    log: Log | None = None,
) -> RayRunSummary:
    """Create or resume ``cfg``'s Ray Tune experiment and run it to ``n_trials`` (default [study] n_trials).

    ``address``: None -> [evaluator] ray_address, else a private local Ray with [evaluator] workers CPUs;
    "auto" / "host:port" / "ray://host:port" joins that cluster (unreachable: SlimError within seconds).
    Concurrency is [evaluator] workers trials, each requesting ``search.placement.ray_trial_resources``
    ([evaluator] cpus_per_trial, gpus_per_trial; a trial on a GPU runs on ``cuda``). Every node must see the study's files
    (data, checkpoint / ``<workdir>/baseline.pt``, ``<workdir>/ray``) at the same absolute paths.
    """
    from slimsearch.search.context import build_study_context
    from slimsearch.search.runner import seed_policies, study_info

    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    if n_trials is not None:
        cfg = cfg.with_n_trials(n_trials)
    target = cfg.study.n_trials
    workers = cfg.evaluator.worker_count(0)  # "per-gpu": one trial per GPU of the cluster, known once connected
    address = address if address is not None else getattr(cfg.evaluator, "ray_address", None)
    if address is not None:
        check_reachable(address)  # before building anything
    from slimsearch.search.placement import local_gpus, ray_trial_device, ray_trial_resources

    ev = cfg.evaluator
    if address is None:  # a local Ray has this machine's GPUs: a request they cannot meet fails before any write
        ray_trial_resources(cfg.study.device, ev.cpus_per_trial, ev.gpus_per_trial, len(local_gpus(cfg.study.device)))
    # The driver never needs a GPU: it uses one only where it has one (a pre-trained baseline).
    driver_cfg = cfg.with_device("cpu" if cfg.study.device == "cpu" else "auto")
    sctx = build_study_context(driver_cfg, log=log)  # validates input; pre-trains and caches the baseline if asked
    sctx.latency_info(log)  # a latency bound's table: measured (or loaded) before any write or worker
    from slimsearch.spaces.describe import log_exclusions

    log_exclusions(sctx.space, log)  # once per run: which conv layers the search leaves alone, and why
    exp_dir = ray_experiment_dir(cfg)
    resumable = _resumable(exp_dir)
    meta = _read_meta(ray_meta_path(cfg)) if resumable else {}
    info = study_info(sctx)
    if meta.get("baseline_sha") not in (None, info["baseline_sha"]):
        raise SlimError(f"Ray study {cfg.name!r} was searched on a baseline with weights {meta['baseline_sha']}, this "
                        f"one has {info['baseline_sha']}; use a new [study] name")  # fmt: skip
    # A restored experiment keeps its trials: the target can grow, never shrink.
    _write_meta(cfg, max(target, int(meta.get("n_trials") or 0)), info)

    import ray
    from ray import tune

    started = connect(address, workers * int(ev.cpus_per_trial))
    _search_classes()
    snapshot_failed_trials()
    try:
        resources = ray_trial_resources(cfg.study.device, ev.cpus_per_trial, ev.gpus_per_trial,
                                        float(ray.cluster_resources().get("GPU", 0.0)))  # fmt: skip
        if ev.workers == "per-gpu":
            workers = ev.worker_count(int(ray.cluster_resources().get("GPU", 0.0)))
        trial_cfg = cfg.with_device(ray_trial_device(resources))  # Ray sets the trial's CUDA_VISIBLE_DEVICES
        trainable = tune.with_resources(tune.with_parameters(_trainable, study=trial_cfg), resources)
        resumed = resumable and tune.Tuner.can_restore(str(exp_dir))
        if resumed:
            done_before = sum(1 for t in _load_trials(exp_dir) if t.status in ("TERMINATED", "ERROR"))
            log(f"resuming Ray experiment {exp_dir}: {done_before} trials finished, target {_target(cfg, target)}")
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                param_space=sctx.space.ray_param_space(),
            )  # fmt: skip
        else:
            seeds = seed_policies(sctx)[:target]
            if seeds:
                log(f"{len(seeds)} seed policies first: {', '.join(label for label, _ in seeds)}")
            tuner = tune.Tuner(
                trainable,
                param_space=sctx.space.ray_param_space(),
                tune_config=tune.TuneConfig(
                    search_alg=make_search_alg(cfg, sctx.space, seeds, workers),
                    scheduler=make_scheduler(cfg),
                    num_samples=target,
                    reuse_actors=True,
                    time_budget_s=cfg.study.timeout,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=str(ray_storage_path(cfg)),
                    verbose=0,
                    callbacks=[_SEARCH_CLASSES["lines"]()],
                    failure_config=tune.FailureConfig(max_failures=cfg.study.max_retry),
                ),
            )
        where = f"Ray at {address}" if address else f"local Ray ({workers * int(ev.cpus_per_trial)} CPUs)"
        where += f", {resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial"
        log(f"study {cfg.name}: Ray Tune (OptunaSearch {cfg.study.sampler} + ASHA), {workers} concurrent trials, "
            f"{where}, experiment {exp_dir}")  # fmt: skip
        _fit_quietly(tuner, log if progress else None)
    finally:
        if started:
            ray.shutdown()
    return _summarise(cfg, exp_dir, t0, resumed, log)


def snapshot_failed_trials(controller_cls: type | None = None) -> None:
    """Ray Tune workaround (2.60): queue every failed trial for the next experiment snapshot.

    After a trial failure Tune may set the trial ERROR without re-serialising it: ``_schedule_trial_stop``
    returns before ``_mark_trial_to_checkpoint`` when the trial has no tracked actor any more, which happens
    when its worker process died. The snapshot then keeps the trial RUNNING, so ``status`` shows it running
    for ever and a restore runs it again although a fresh trial already took its slot. Idempotent.
    """
    if controller_cls is None:
        from ray.tune.execution.tune_controller import TuneController as controller_cls
    original = controller_cls._process_trial_failure
    if getattr(original, "_slim_marks", False) or not hasattr(controller_cls, "_mark_trial_to_checkpoint"):
        return

    def process_trial_failure(self: Any, trial: Any, exception: Any = None, **kw: Any) -> Any:
        try:
            return original(self, trial, exception=exception, **kw)
        finally:
            self._mark_trial_to_checkpoint(trial)

    process_trial_failure._slim_marks = True  # type: ignore[attr-defined]
    controller_cls._process_trial_failure = process_trial_failure


def _resumable(exp_dir: Path) -> bool:
    """Whether an earlier run left state to resume: ``tuner.pkl`` (all ``Tuner.can_restore`` checks) and an
    experiment snapshot. Tune writes ``tuner.pkl`` before its first snapshot; a driver killed in between
    leaves a directory ``Tuner.restore`` rejects ("No experiment snapshot file"), in which no trial finished:
    that one starts afresh."""
    return (exp_dir / "tuner.pkl").is_file() and any(exp_dir.glob("experiment_state-*.json"))


def _fit_quietly(tuner: Any, log: Log | None) -> Any:
    """``tuner.fit()`` with our trial lines instead of Ray's tables (the legacy reporter honours verbose=0;
    the new output engine prints its header regardless)."""
    global _PROGRESS_LOG
    old_env, old_log = os.environ.get("RAY_AIR_NEW_OUTPUT"), _PROGRESS_LOG
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    _PROGRESS_LOG = log
    try:
        return tuner.fit()
    finally:
        _PROGRESS_LOG = old_log
        if old_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old_env


def _target(cfg: StudyConfig, default: int) -> int:
    return int(_read_meta(ray_meta_path(cfg)).get("n_trials", default))


def _summarise(cfg: StudyConfig, exp_dir: Path, t0: float, resumed: bool, log: Log) -> RayRunSummary:
    df = trials_table(_load_trials(exp_dir))
    csv = ray_results_csv(cfg)
    tmp = csv.with_name(f".{csv.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    by = {str(k): int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
    counted = sum(by.get(s, 0) for s in COUNTED)
    target = _target(cfg, cfg.study.n_trials)
    row = best_row(df) if len(df) else None
    best, policy = None, None
    if row is not None:
        from slimsearch.core.policy import Policy

        best = _row_metrics(row)
        best["trial"] = best.get("number")
        policy = Policy.from_json(row["policy"])
    s = RayRunSummary(cfg.name, counted, target, by, best, time.perf_counter() - t0, counted >= target, policy,
                      exp_dir, csv, resumed, df)  # fmt: skip
    tail = f"; best val_acc {best['val_acc']:.4f} (trial {best['trial']})" if best else ""
    log(f"{'done' if s.done else 'stopped'}: {counted}/{target} trials in {s.wall_s:.1f}s{tail}; results {csv}")
    return s
