"""The Optuna study of a study file: sampler, pruner, constraints, metric names, loading/creating it, and
reading its trials as ``TrialRecord``s (what counts toward n_trials, the tally by state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from slimsearch.core.errors import SlimError
from slimsearch.evaluators.evaluate import violations
from slimsearch.search import fingerprint
from slimsearch.search.local_sampler import LocalSearchSampler
from slimsearch.search.records import FLAT_METRICS, TrialRecord
from slimsearch.search.storage import _quiet
from slimsearch.search.study import StudyConfig, mask_url

HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")
CONSTRAINTS_KEY = "constraints"  # system attr the samplers' constraints_func fills and optuna-dashboard reads


def make_sampler(cfg: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The [study] sampler, seeded; TPE and NSGA-II get the MACs and latency constraints."""
    s = cfg.study
    # Optuna >= 5 reads the constraints that record_constraints stores with the trial.
    cons = constraints_func if bound_names(cfg) and not HAS_SET_CONSTRAINT else None
    if s.sampler == "tpe":
        with _quiet():
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=s.n_startup_trials, multivariate=True, group=True,
                constant_liar=True, constraints_func=cons,
            )  # fmt: skip
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size, constraints_func=cons)
    if s.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise SlimError(
                f"{cfg.path}: [study] sampler cmaes needs the 'cmaes' package (pip install cmaes)"
            ) from None
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )  # fmt: skip
    if s.sampler == "local":
        return LocalSearchSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def constraints_func(trial: FrozenTrial) -> Sequence[float]:
    """Optuna constraints: [MACs - max_MACs, latency - max latency] as bounded (<= 0 feasible), from the trial's
    user_attrs."""
    return tuple(trial.user_attrs.get("constraint", (0.0,)))


def bound_names(cfg: StudyConfig) -> tuple[str, ...]:
    """The study's bounds, in constraint order: "macs", "latency" (``evaluators.evaluate.violations``)."""
    c = cfg.constraint
    macs = c.max_macs is not None or c.max_macs_ratio is not None
    return ("macs",) * macs + ("latency",) * (c.max_latency_ratio is not None)


def record_constraints(trial: optuna.Trial, cfg: StudyConfig, metrics: Mapping[str, float]) -> None:
    """The bounds' violations of an evaluated trial (<= 0 feasible), for the constraint-aware samplers and
    optuna-dashboard's feasibility: the "constraint" user attr (read by ``constraints_func``) and the
    ``constraints`` system attr, stored as Optuna's ``constraints_func`` stores it (a retry keeps the first)."""
    names = bound_names(cfg)
    if not names:
        return
    values = list(violations(metrics, names).values())
    trial.set_user_attr("constraint", values)
    store_constraints(trial.storage, trial._trial_id, values)


def store_constraints(storage: optuna.storages.BaseStorage, trial_id: int, values: Sequence[float]) -> None:
    """``values`` as the trial's ``constraints`` system attr, unless it has some already (a retried trial)."""
    if CONSTRAINTS_KEY not in storage.get_trial_system_attrs(trial_id):
        storage.set_trial_system_attr(trial_id, CONSTRAINTS_KEY, [float(v) for v in values])


def _pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    ev = cfg.evaluator
    if cfg.study.pruner == "median" and not cfg.multi_objective and ev.kind == "finetune" and ev.eval_every > 0:
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def _name_metrics(study: optuna.Study, cfg: StudyConfig) -> None:
    """The objectives by their metric names (optuna-dashboard shows val_acc, not Value)."""
    with _quiet():
        study.set_metric_names([o.metric for o in cfg.study.objectives])


def load_optuna_study(cfg: StudyConfig, storage: Any, *, seed: int | None = None, create: bool = False) -> optuna.Study:
    """Open (or with ``create`` create) the Optuna study; objectives must match an existing study's."""
    directions = [o.direction for o in cfg.study.objectives]
    sampler = make_sampler(cfg, cfg.study.seed if seed is None else seed)
    names = optuna.get_all_study_names(storage)
    if cfg.name in names:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=_pruner(cfg))
        have = [d.name.lower() for d in study.directions]
        if have != directions:
            raise SlimError(
                f"{cfg.path}: study {cfg.name!r} in {mask_url(cfg.study.storage)} was created with directions "
                f"{have}, but [study] objectives give {directions}; use a new [study] name"
            )
        if create and study.metric_names is None:
            _name_metrics(study, cfg)
        return study
    if not create:
        raise SlimError(f"study {cfg.name!r} not found in {mask_url(cfg.study.storage)}; start it with "
                        f"`slimsearch run {cfg.path}`")  # fmt: skip
    study = optuna.create_study(
        storage=storage, study_name=cfg.name, directions=directions, sampler=sampler, pruner=_pruner(cfg),
        load_if_exists=True,
    )  # fmt: skip
    _name_metrics(study, cfg)
    return study


def check_resume(cfg: StudyConfig, storage: optuna.storages.BaseStorage | None) -> None:
    """Before anything is built or written: an existing study must have been run with the same objectives and
    the same trial-defining keys of the study file (``search.fingerprint``). ``storage`` None: none yet."""
    if storage is None:
        return
    with _quiet():
        names = optuna.get_all_study_names(storage)
    if cfg.name in names:
        fingerprint.check_config(load_optuna_study(cfg, storage).user_attrs.get(fingerprint.ATTR), cfg)


def is_counted(t: FrozenTrial) -> bool:
    """Whether a trial counts toward n_trials (see the module docstring)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get("status") == "fail"


def target_trials(study: optuna.Study, default: int) -> int:
    return int(study.user_attrs.get("n_trials", default))


@dataclass
class Tally:
    counted: int
    running: int
    waiting: int
    by_state: dict[str, int] = field(default_factory=dict)


def tally(trials: Sequence[FrozenTrial]) -> Tally:
    by: dict[str, int] = {}
    for t in trials:
        by[t.state.name] = by.get(t.state.name, 0) + 1
    return Tally(sum(is_counted(t) for t in trials), by.get("RUNNING", 0), by.get("WAITING", 0), by)


def record_from_trial(t: FrozenTrial) -> TrialRecord:
    """An Optuna trial as the backends' common ``TrialRecord`` (metrics from its user attrs)."""
    ua = t.user_attrs
    metrics = {k: float(v) for k, v in ua.get("metrics", {}).items() if isinstance(v, (int, float))}
    metrics.update({k: float(ua[k]) for k in FLAT_METRICS if isinstance(ua.get(k), (int, float))})
    dur = None
    if t.datetime_complete and t.datetime_start:
        dur = (t.datetime_complete - t.datetime_start).total_seconds()
    return TrialRecord(
        number=t.number, state=t.state.name, status=ua.get("status", ""), counted=is_counted(t), metrics=metrics,
        policy=ua.get("policy", ""), policy_summary=ua.get("policy_summary", ""), seed=ua.get("seed", ""),
        reason=ua.get("reason", ""), duration_s=dur, model_digest=ua.get("model_digest", ""),
        cached=bool(ua.get("cached")), policy_hash=ua.get("policy_hash", ""),
    )  # fmt: skip
