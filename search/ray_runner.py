"""Ray Tune backend: the study's search space through ``OptunaSearch``, ASHA on the intermediate val_acc.

One Ray Tune experiment per study, stored under ``<workdir>/ray/<study name>`` (``RunConfig.storage_path``
= ``<workdir>/ray``; an absolute path, so every node of a cluster on a shared filesystem writes the same
place). Running again continues it with ``Tuner.restore``: finished trials are kept, unfinished ones are
restarted from scratch with their parameters (there are no checkpoints: a trial is a short evaluation), and a
larger ``n_trials`` adds trials to the same experiment (see ``SlotGenerator``).

A trial whose worker process dies is retried with the same parameters up to ``[study] max_retry`` times
(``FailureConfig(max_failures)``); after that it is ERROR, does not count, and a fresh trial takes its slot
(at most n_trials such replacements), so a run still ends with n_trials evaluated trials. ERROR trials are
not restarted on resume: their slots were already refilled.

What a trial reports to Tune, and the files next to the experiment: ``search.ray_results``. The one module of
search/ that imports Ray; ``search.backend.RayBackend`` imports it only when a Ray study is run or read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray._private.services import canonicalize_bootstrap_address  # no public equivalent
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.evaluate import EvalResult, one_line, violations
from slimsearch.search import fingerprint
from slimsearch.search.context import StudyContext, build_study_context, study_info
from slimsearch.search.legacy_names import legacy_module_names
from slimsearch.search.optuna_study import bound_names, make_sampler, store_constraints
from slimsearch.search.placement import local_gpus, ray_trial_device, ray_trial_resources
from slimsearch.search.ray_progress import _log_trial_complete, _log_trial_error, fit_quietly
from slimsearch.search.ray_results import (
    COUNTED,
    _first_line,
    _host_port,
    _read_meta,
    _resumable,
    _target,
    _write_meta,
    check_workdir,
    fidelity,
    final_result,
    ray_experiment_dir,
    ray_meta_path,
    ray_results_csv,
    ray_storage_path,
    read_results_csv,
    records_from_table,
    trial_dirname,
    trials_table,
)
from slimsearch.search.records import RunSummary, best, best_summary
from slimsearch.search.seeding import generate_seeds
from slimsearch.search.study import StudyConfig
from slimsearch.search.trial import Fitted, evaluate_trial, fit_trial
from slimsearch.spaces.describe import log_exclusions
from slimsearch.spaces.space import SearchSpace

Log = Callable[[str], None]

CONNECT_TIMEOUT_S = 5.0

# (study file, study name) -> StudyContext, per Ray worker process: trials reusing the actor reuse it.
_CONTEXTS: dict[tuple[str, str], StudyContext] = {}


# ----------------------------------------------------------------------------- connecting


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with a ``SlimError`` when nothing listens at ``address`` (``ray.init`` would retry for minutes).

    "auto" is resolved through Ray's own lookup (RAY_ADDRESS, then the last cluster started on this machine).
    """
    target = address
    if address == "auto":
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


def _worker_context(cfg: StudyConfig) -> StudyContext:
    """The study context of this worker process, built once (baseline must be cached by the driver)."""
    key = (str(cfg.path), cfg.name)
    sctx = _CONTEXTS.get(key)
    if sctx is None:
        sctx = build_study_context(cfg, allow_pretrain=False)
        sctx.eval_ctx.cache = ResultCache(cfg.study.workdir / "cache")  # shared with the Optuna backend
        _CONTEXTS[key] = sctx
    return sctx


def _trainable(config: dict[str, Any], study: StudyConfig) -> None:
    """Ray Tune function trainable: params -> the trial core (fit, evaluate) -> ``tune.report``."""
    torch.set_num_threads(int(study.evaluator.cpus_per_trial))  # the CPUs the trial requested
    extra = {"number": int(config.get("_number", -1)), "seed": str(config.get("_seed", "")),
             "node_id": ray.get_runtime_context().get_node_id()}  # fmt: skip
    fitted: Fitted | None = None
    try:
        sctx = _worker_context(study)
        fitted = fit_trial(sctx, sctx.space.policy_from_params(config))
        extra["fit_s"] = fitted.fit_s
    except Exception as e:  # e.g. a worker that cannot see the data or the baseline: a failed trial
        res = EvalResult("fail", {}, f"worker: {one_line(e)}")
        tune.report(final_result(study, res, None, extra))
        return
    max_t, _, inter = fidelity(study)
    report = None
    if inter:

        def report(step: int, acc: float) -> bool:
            if step < max_t:  # the final result carries the last step (ASHA stops a trial at max_t)
                tune.report({"val_acc": float(acc), "step": int(step), "status": "partial", **extra})
            return False  # ASHA stops a trial itself: the next tune.report ends its thread

    res = evaluate_trial(sctx, study, fitted, report)
    tune.report(final_result(study, res, fitted.policy, extra))


# ----------------------------------------------------------------------------- search algorithm
# Its classes are pickled into the experiment (``tuner.pkl``) by reference: module and name must stay
# importable as ``slimsearch.search.ray_runner.<name>`` (``legacy_module_names`` maps pre-rename names).


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
            values = list(violations(result, self.bounds).values())
            ot_trial.set_user_attr("constraint", values)  # read by constraints_func (optuna < 5)
            store_constraints(self._ot_study._storage, ot_trial._trial_id, values)  # samplers, optuna-dashboard
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
    """One line per finished trial and per trial error (``search.ray_progress``)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _log_trial_complete(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _log_trial_error(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _log_trial_error(trial, retry=True)


def make_search_alg(
    cfg: StudyConfig, space: SearchSpace, seeds: list[tuple[str, Policy]], workers: int
) -> SlotGenerator:
    """SlotGenerator(ConcurrencyLimiter(SlimOptunaSearch)) for ``Tuner(param_space=space.ray_param_space())``.

    The sampler is the study's (``search.optuna_study.make_sampler``: seeded TPE / NSGA-II / CMA-ES / random);
    seed policies are ``points_to_evaluate`` (complete points: every parameter of the Ray space).
    """
    objectives = cfg.study.objectives
    metric: str | list[str] = [o.metric for o in objectives]
    mode: str | list[str] = ["max" if o.direction == "maximize" else "min" for o in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    points = [space.params_from_policy(p, strict=False, complete=True) for _, p in seeds]
    # The space itself reaches the searcher through Tuner(param_space=...) (set_search_properties).
    searcher = SlimOptunaSearch(
        metric=metric,
        mode=mode,
        points_to_evaluate=points or None,
        sampler=make_sampler(cfg, cfg.study.seed),
        seed_labels=tuple(label for label, _ in seeds),
        bounds=bound_names(cfg),
    )
    return SlotGenerator(ConcurrencyLimiter(searcher, max_concurrent=workers), str(ray_meta_path(cfg)))


def make_scheduler(cfg: StudyConfig) -> ASHAScheduler:
    """ASHA on val_acc (max) with ``time_attr="step"`` (fine-tune steps)."""
    max_t, grace, _ = fidelity(cfg)
    return ASHAScheduler(time_attr="step", metric="val_acc", mode="max", max_t=max_t, grace_period=grace)


# ----------------------------------------------------------------------------- results


def _load_trials(exp_dir: Path) -> list[Any]:
    """The experiment's trials from its state file (no Ray runtime needed)."""
    # Trials that never reported (a crash right after they started) make it warn once per load: not news.
    lg = logging.getLogger("ray.tune.analysis.experiment_analysis")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        return list(ExperimentAnalysis(str(exp_dir)).trials)
    finally:
        lg.setLevel(old)


def ray_trials(cfg: StudyConfig) -> pd.DataFrame:
    """The study's trial table, for ``status`` / ``report`` / ``export`` (``RayBackend.records``).

    Read from the experiment directory when it exists (current even while a run is going on or after a
    crash; Ray need not be running), else from the CSV written at the end of the last run.
    """
    exp = ray_experiment_dir(cfg)
    if exp.is_dir():
        try:
            return trials_table(_load_trials(exp))
        except Exception:  # a half-written state: fall back to the last complete CSV
            pass
    df = read_results_csv(cfg)
    if df is not None:
        return df
    raise SlimError(f"no Ray results for study {cfg.name!r} under {ray_storage_path(cfg)}; "
                    f"start it with `slimsearch run {cfg.path}`")  # fmt: skip


# ----------------------------------------------------------------------------- entry point


def run_ray(
    cfg: StudyConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    n_trials: int | None = None,
    log: Log | None = None,
) -> RunSummary:
    """Create or resume ``cfg``'s Ray Tune experiment and run it to ``n_trials`` (default [study] n_trials).

    ``address``: None -> [evaluator] ray_address, else a private local Ray with [evaluator] workers CPUs;
    "auto" / "host:port" / "ray://host:port" joins that cluster (unreachable: SlimError within seconds).
    Concurrency is [evaluator] workers trials, each requesting ``search.placement.ray_trial_resources``
    ([evaluator] cpus_per_trial, gpus_per_trial; a trial on a GPU runs on ``cuda``). Every node must see the study's files
    (data, checkpoint / ``<workdir>/baseline.pt``, ``<workdir>/ray``) at the same absolute paths.
    """
    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    if n_trials is not None:
        cfg = cfg.with_n_trials(n_trials)
    target = cfg.study.n_trials
    workers = cfg.evaluator.worker_count(0)  # "per-gpu": one trial per GPU of the cluster, known once connected
    address = address if address is not None else getattr(cfg.evaluator, "ray_address", None)
    check_workdir(cfg)  # writable, and a changed study file is refused before anything is built
    if address is not None:
        check_reachable(address)  # before building anything
    ev = cfg.evaluator
    if address is None:  # a local Ray has this machine's GPUs: a request they cannot meet fails before any write
        ray_trial_resources(cfg.study.device, ev.cpus_per_trial, ev.gpus_per_trial, len(local_gpus(cfg.study.device)))
    # The driver never needs a GPU: it uses one only where it has one (a pre-trained baseline).
    driver_cfg = cfg.with_device("cpu" if cfg.study.device == "cpu" else "auto")
    sctx = build_study_context(driver_cfg, log=log)  # validates input; pre-trains and caches the baseline if asked
    sctx.latency_info(log)  # a latency bound's table: measured (or loaded) before any write or worker
    log_exclusions(sctx.space, log)  # once per run: which conv layers the search leaves alone, and why
    exp_dir = ray_experiment_dir(cfg)
    resumable = _resumable(exp_dir)
    meta = _read_meta(ray_meta_path(cfg)) if resumable else {}
    info = study_info(sctx)
    info[fingerprint.ATTR] = fingerprint.of_study(cfg, sctx)
    fingerprint.check_config(meta.get(fingerprint.ATTR), cfg, info[fingerprint.ATTR])
    if meta.get("baseline_sha") not in (None, info["baseline_sha"]):
        raise SlimError(f"Ray study {cfg.name!r} was searched on a baseline with weights {meta['baseline_sha']}, this "
                        f"one has {info['baseline_sha']}; use a new [study] name")  # fmt: skip
    # A restored experiment keeps its trials: the target can grow, never shrink.
    _write_meta(cfg, max(target, int(meta.get("n_trials") or 0)), info)

    started = connect(address, workers * int(ev.cpus_per_trial))
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
            with legacy_module_names():  # experiments started before the package rename pickled old names
                tuner = tune.Tuner.restore(
                    str(exp_dir), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                    param_space=sctx.space.ray_param_space(),
                )  # fmt: skip
        else:
            seeds = generate_seeds(sctx)[:target]
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
                    callbacks=[TrialLines()],
                    failure_config=tune.FailureConfig(max_failures=cfg.study.max_retry),
                ),
            )
        where = f"Ray at {address}" if address else f"local Ray ({workers * int(ev.cpus_per_trial)} CPUs)"
        where += f", {resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial"
        log(f"study {cfg.name}: Ray Tune (OptunaSearch {cfg.study.sampler} + ASHA), {workers} concurrent trials, "
            f"{where}, experiment {exp_dir}")  # fmt: skip
        with legacy_module_names() if resumed else contextlib.nullcontext():
            fit_quietly(tuner, log if progress else None)
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


def _summarise(cfg: StudyConfig, exp_dir: Path, t0: float, resumed: bool, log: Log) -> RunSummary:
    df = trials_table(_load_trials(exp_dir))
    csv = ray_results_csv(cfg)
    tmp = csv.with_name(f".{csv.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    records = records_from_table(df)
    by = {str(k): int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
    counted = sum(by.get(s, 0) for s in COUNTED)
    target = _target(cfg, cfg.study.n_trials)
    top = best(records)
    summary = best_summary(records)
    policy = Policy.from_json(top.policy) if top is not None else None
    s = RunSummary(cfg.name, counted, target, by, summary, time.perf_counter() - t0, counted >= target, policy,
                   exp_dir, csv, resumed, df)  # fmt: skip
    tail = f"; best val_acc {summary['val_acc']:.4f} (trial {summary['trial']})" if summary else ""
    log(f"{'done' if s.done else 'stopped'}: {counted}/{target} trials in {s.wall_s:.1f}s{tail}; results {csv}")
    return s
