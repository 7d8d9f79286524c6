"""Optuna runner: create-or-resume a study in an RDB storage and evaluate trials until n_trials are done.

How n_trials is reached exactly, across worker processes, machines and restarts
--------------------------------------------------------------------------------
A trial *counts* when it was evaluated: COMPLETE (ok or infeasible), PRUNED, or FAIL with
``user_attrs["status"] == "fail"`` (the evaluator reported a failure: bad policy, NaN loss...).
Trials that never finished evaluating do not count: a killed or interrupted process leaves a FAIL
without a status, and such a trial is re-enqueued with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``, up to ``[study] max_retry`` times).

Work is handed out through *slots*: ``run`` enqueues the seed trials and then empty WAITING trials
toward counted + running + waiting == n_trials, at most ``search.slots.SLOT_BATCH`` waiting at a time (an
idle process tops the queue up again, so a huge n_trials never writes a huge queue). Every process (the driver,
``--workers`` processes, ``slimsearch worker`` on other machines) claims WAITING trials with the storage's atomic
WAITING -> RUNNING transition and evaluates them; it never creates trials beyond the slots, so the
study ends with exactly n_trials counted trials. SQLite's transactions do not make that
transition atomic between processes, so for SQLite claims also take a file lock (``<db>.lock``);
PostgreSQL and MySQL claim with ``SELECT ... FOR UPDATE``, and on PostgreSQL claim + top-up also hold
an advisory lock (``storage_lock``), so concurrent top-ups never enqueue a slot twice. When a slot is
lost (an internal error, a trial whose retries are exhausted), the next idle process tops the queue up again.

Seeds: each seed policy is enqueued with its parameters (projected onto the search space: what the
sampler sees) and its exact policy JSON in ``user_attrs["seed_policy"]``, which is what the trial
evaluates and records (GA keep indices, MTD's explicit ranks and ABSHPC's cluster counts survive).

Crash safety: every running trial has a heartbeat (``[study] heartbeat_interval``); a trial whose
heartbeat is older than ``grace_period`` is failed and retried by whichever process looks next.
A trial whose process is known dead (same host, pid gone) is failed and retried at once, so
rerunning the same command after a crash continues immediately.

Samplers (all seeded): tpe (multivariate, constant liar for parallel workers; honours the MACs
constraint through ``constraints_func``), nsga2 (``constraints_func`` too), cmaes (float
parameters only, categorical ones go to its independent sampler; no constraint support, so
infeasible trials only score val_acc 0.0), local (``search.local_sampler``: mutations of the best
finished trials, feasible first; for refining the seeds in a space too large for TPE), random.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.evaluate import EvalResult, one_line
from slimsearch.search import fingerprint
from slimsearch.search.context import StudyContext, build_study_context, study_info
from slimsearch.search.display import Display
from slimsearch.search.optuna_study import (
    check_resume,
    is_counted,
    load_optuna_study,
    make_sampler,
    record_constraints,
    record_from_trial,
    tally,
    target_trials,
)
from slimsearch.search.paths import check_writable_dir
from slimsearch.search.placement import Placement, local_gpus, plan_workers, worker_env
from slimsearch.search.records import RunSummary, best_summary, fmt_count
from slimsearch.search.seeding import generate_seeds
from slimsearch.search.slots import WORKER_ATTR, Heartbeat, claim, pid_alive, reap_dead, top_up
from slimsearch.search.storage import (
    _retry_callback,
    check_sqlite_target,
    engine_url,
    open_in_workdir,
    open_storage,
    storage_exists,
    storage_lock,
)
from slimsearch.search.study import StudyConfig, mask_url, sqlite_path
from slimsearch.search.trial import Fitted, evaluate_trial, fit_trial, objective_values, trial_attrs
from slimsearch.search.worker_launch import remove_stale_configs, start_worker

# Kept importable from here: the storage and slot helpers scripts and tests have always taken from the runner.
__all__ = ["WORKER_ATTR", "claim", "engine_url", "is_counted", "load_optuna_study", "open_storage", "prepare_study",
           "run_study", "run_worker", "storage_lock", "tally", "top_up", "trial_loop"]  # fmt: skip

SEED_POLICY_ATTR = "seed_policy"  # user attr of an enqueued seed trial: the exact policy JSON to evaluate
POLL_S = 1.0

Log = Callable[[str], None]

# tensorly clips an over-large SVD rank itself and says so once per layer: noise in a trial log.
warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)


class Interrupted(BaseException):
    """SIGTERM / a vanished parent: stop after marking the current trial for retry.

    A BaseException (like KeyboardInterrupt), so the evaluator's catch-all does not turn it into a failed trial.
    """


# ----------------------------------------------------------------------------- one trial


def trial_policy(trial: optuna.Trial, sctx: StudyContext) -> Policy:
    """The policy a trial evaluates: the space's suggestion (always asked, so the sampler records the
    parameters), replaced by the exact seed policy when the trial was enqueued with one. ``run_trial``
    then fits it under the MACs bound (``StudyContext.fit``)."""
    policy = sctx.space.suggest(trial)
    exact = trial.user_attrs.get(SEED_POLICY_ATTR)
    if isinstance(exact, str) and exact:
        policy = Policy.from_json(exact, where=f"trial {trial.number} {SEED_POLICY_ATTR}")
    return policy


def _record(trial: optuna.Trial, cfg: StudyConfig, fitted: Fitted, res: EvalResult) -> None:
    """The trial core's record as user attrs (status last: it marks the trial evaluated), constraints first."""
    record_constraints(trial, cfg, res.metrics)
    for k, v in trial_attrs(fitted, res).items():
        trial.set_user_attr(k, v)


def run_trial(study: optuna.Study, trial_id: int, sctx: StudyContext, cfg: StudyConfig) -> FrozenTrial:
    """Evaluate one claimed (RUNNING) trial with the trial core and tell Optuna the outcome.

    Evaluator failures -> FAIL with a reason (the study goes on); Ctrl-C / SIGTERM -> FAIL and
    re-enqueued for retry, then re-raised; anything else (a bug) -> FAIL with status "error", re-raised.
    """
    storage = study._storage
    trial = optuna.trial.Trial(study, trial_id)
    hb = Heartbeat(storage, trial_id, cfg.study.heartbeat_interval)
    try:
        fitted = fit_trial(sctx, trial_policy(trial, sctx))
        report = None
        if not cfg.multi_objective and not isinstance(study.pruner, optuna.pruners.NopPruner):

            def report(step: int, acc: float) -> bool:
                trial.report(acc, step)
                return trial.should_prune()

        res = evaluate_trial(sctx, cfg, fitted, report)
        _record(trial, cfg, fitted, res)
        if res.status == "pruned":
            return study.tell(trial, state=TrialState.PRUNED)
        if res.status == "fail":
            return study.tell(trial, state=TrialState.FAIL)
        return study.tell(trial, objective_values(cfg, res.metrics))
    except (KeyboardInterrupt, Interrupted):
        trial.set_user_attr("reason", "interrupted")
        ft = study.tell(trial, state=TrialState.FAIL)
        _retry_callback(cfg)(study, ft)
        raise
    except Exception as e:
        trial.set_user_attr("reason", f"internal error: {one_line(e)}")
        trial.set_user_attr("status", "error")
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        hb.stop()


# ----------------------------------------------------------------------------- the claim loop


@dataclass
class LoopResult:
    ran: int = 0
    done: bool = False


def trial_loop(
    study: optuna.Study,
    sctx: StudyContext,
    cfg: StudyConfig,
    *,
    deadline: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    poll_s: float = POLL_S,
) -> LoopResult:
    """Claim and evaluate trials until the study has its n_trials counted trials (or a stop)."""
    out = LoopResult()
    while not should_stop() and (deadline is None or time.time() < deadline):
        target = target_trials(study, cfg.study.n_trials)
        tid = None
        with storage_lock(cfg):
            reap_dead(study, cfg)
            busy = tally(study.get_trials(deepcopy=False))
            # Slots left over from a larger earlier n_trials are not claimed once the target is covered.
            if busy.counted + busy.running < target:
                tid = claim(study)
                if tid is None and top_up(study, target):
                    tid = claim(study)
        if tid is not None:
            ft = run_trial(study, tid, sctx, cfg)
            out.ran += 1
            if on_trial is not None:
                on_trial(ft)
            continue
        t = tally(study.get_trials(deepcopy=False))
        if t.counted >= target:
            out.done = True
            break
        time.sleep(poll_s)  # others are evaluating the last trials; one may come back for retry
    return out


# ----------------------------------------------------------------------------- preparing a study


def prepare_study(
    cfg: StudyConfig, sctx: StudyContext, storage: optuna.storages.BaseStorage, *, log: Log = print
) -> optuna.Study:
    """Create or resume the study; record its info; enqueue seeds once; top up the trial slots."""
    with storage_lock(cfg):
        study = load_optuna_study(cfg, storage, create=True)
        info = study_info(sctx)
        old_sha = study.user_attrs.get("slimsearch", {}).get("baseline_sha")
        if old_sha is not None and old_sha != info["baseline_sha"]:
            raise SlimError(
                f"study {cfg.name!r} was searched on a baseline with weights {old_sha}, this one has "
                f"{info['baseline_sha']} (checkpoint or pre-trained baseline changed); use a new [study] name"
            )
        fp = fingerprint.of_study(cfg, sctx)  # a changed study file is refused (run checked its keys already)
        fingerprint.check_config(study.user_attrs.get(fingerprint.ATTR), cfg, fp)
        study.set_user_attr(fingerprint.ATTR, fp)
        study.set_user_attr("slimsearch", info)
        study.set_user_attr("n_trials", cfg.study.n_trials)
        study.set_user_attr("objectives", [o.spec for o in cfg.study.objectives])
        if "seeds_enqueued" not in study.user_attrs:
            seeds = generate_seeds(sctx, log=log)
            if len(seeds) > cfg.study.n_trials:
                log(f"warning: {len(seeds)} seed policies but n_trials = {cfg.study.n_trials}; "
                    f"enqueuing the first {cfg.study.n_trials}")  # fmt: skip
                seeds = seeds[: cfg.study.n_trials]
            for label, pol in seeds:
                # The params (projected onto the space) are what the sampler sees; the trial evaluates the
                # exact policy (GA keep indices, MTD's explicit ranks, ABSHPC cluster counts...).
                params = sctx.space.params_from_policy(pol, strict=False)
                study.enqueue_trial(params, user_attrs={"seed": label, SEED_POLICY_ATTR: pol.to_json()})
            study.set_user_attr("seeds_enqueued", [label for label, _ in seeds])
            if seeds:
                log(f"enqueued {len(seeds)} seed trials: {', '.join(label for label, _ in seeds)}")
        reap_dead(study, cfg)
        top_up(study, cfg.study.n_trials)
    return study


# ----------------------------------------------------------------------------- entry points


def _summary(study: optuna.Study, cfg: StudyConfig, t0: float, done: bool) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    tl = tally(trials)
    best = best_summary([record_from_trial(t) for t in trials])
    return RunSummary(cfg.name, tl.counted, target_trials(study, cfg.study.n_trials), tl.by_state, best,
                      time.perf_counter() - t0, done)  # fmt: skip


def _process_seed(cfg: StudyConfig, study: optuna.Study, index: int) -> int:
    """Sampler seed: distinct per worker and per restart (a restarted random sampler must not replay)."""
    return (cfg.study.seed * 1_000_003 + 7919 * index + len(study.get_trials(deepcopy=False))) % (2**31)


def _with_sampler(study: optuna.Study, cfg: StudyConfig, index: int) -> optuna.Study:
    study.sampler = make_sampler(cfg, _process_seed(cfg, study, index))
    return study


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` in the main thread, so the running trial is marked for retry."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_study(
    cfg: StudyConfig,
    *,
    workers: int | None = None,
    progress: bool = True,
    log: Log | None = None,
    threads: int | None = None,
) -> RunSummary:
    """Create or resume ``cfg``'s study and run it to n_trials counted trials.

    ``workers`` (default [evaluator] workers): 1 evaluates in this process; N > 1 starts N
    ``slimsearch worker`` processes on the same storage and shows their progress. ``threads``: torch
    threads per evaluating process (default: the cores divided among the workers; small models run
    faster on one thread, and oversubscribed cores slow everything down). The Optuna backend's ``run``
    (``search.backend``); a Ray study runs through ``search.ray_runner.run_ray``.
    """
    # Workers across GPUs (round-robin, or one per GPU); cuda without CUDA is an error before anything is written.
    plan = plan_workers(cfg.study.device, workers or cfg.evaluator.workers, local_gpus(cfg.study.device))
    workers = len(plan)
    console = Console(highlight=False, soft_wrap=True)
    log = log or (lambda s: console.print(s, markup=False))
    t0 = time.perf_counter()
    # Storage problems are reported before anything is written (or a baseline trained).
    check_writable_dir(cfg.study.workdir, f"{cfg.path}: [study] workdir")
    storage = None if sqlite_path(cfg.study.storage) and not storage_exists(cfg) else open_storage(cfg)
    check_sqlite_target(cfg)
    check_resume(cfg, storage)  # a changed study file is refused before anything is built
    sctx = build_study_context(cfg, log=log)
    sctx.latency_info(log)  # a latency bound's table: measured (or loaded) before any write or worker
    from slimsearch.spaces.describe import log_exclusions

    log_exclusions(sctx.space, log)  # once per run: which conv layers the search leaves alone, and why
    storage = open_in_workdir(cfg, storage)  # the workdir first; a storage that cannot be created leaves none
    _attach_cache(sctx, cfg)
    study = prepare_study(cfg, sctx, storage, log=log)
    remove_stale_configs(cfg.study.workdir)  # older versions' config files, with the storage password
    base = sctx.eval_ctx
    log(f"study {cfg.name}: {cfg.study.sampler} sampler, objectives {', '.join(o.spec for o in cfg.study.objectives)}, "
        f"storage {mask_url(cfg.study.storage)}")  # fmt: skip
    bound = f", bound {fmt_count(base.max_macs)} MACs" if base.max_macs else ""
    if base.max_latency_ratio is not None:
        lat = study.user_attrs["slimsearch"]["latency"]
        bound += f", predicted latency <= {lat['bound_ms']:.2f} ms at batch {lat['batch']} ({lat['max_ratio']:.0%})"
    acc = f", val_acc {base.base_val_acc:.4f}" if base.base_val_acc is not None else ""
    log(f"baseline {cfg.model.factory}: {fmt_count(base.base.macs)} MACs, {fmt_count(base.base.params)} params{acc}"
        f"{bound}; {len(sctx.space.params)} search parameters over {len(sctx.space.layers)} layers")  # fmt: skip
    trials = study.get_trials(deepcopy=False)
    tl = tally(trials)
    if tl.counted:
        log(f"resuming: {tl.counted}/{target_trials(study, cfg.study.n_trials)} trials already done")
    deadline = time.time() + cfg.study.timeout if cfg.study.timeout else None
    with Display(target_trials(study, cfg.study.n_trials), tl.counted, progress) as disp:
        disp.seen.update(t.number for t in trials if t.state.is_finished())
        if workers == 1:
            if threads:
                torch.set_num_threads(threads)
            _with_sampler(study, cfg, 0)
            with _sigterm_interrupts():
                res = trial_loop(
                    study, sctx, cfg, deadline=deadline,
                    on_trial=lambda ft: disp.update(study.get_trials(deepcopy=False), target_trials(study, cfg.study.n_trials)),
                )  # fmt: skip
            done = res.done
        else:
            done = _drive_workers(cfg, study, workers, deadline, disp, threads, plan)
        disp.update(study.get_trials(deepcopy=False), target_trials(study, cfg.study.n_trials))
    summary = _summary(study, cfg, t0, done)
    best = summary.best
    tail = f"; best val_acc {best['val_acc']:.4f} (trial {best['trial']})" if best else ""
    log(f"{'done' if done else 'stopped'}: {summary.counted}/{summary.n_trials} trials in {summary.wall_s:.1f}s{tail}")
    return summary


def _attach_cache(sctx: StudyContext, cfg: StudyConfig) -> None:
    """Results persist under <workdir>/cache (shared by the workers); created only once input is valid."""
    sctx.eval_ctx.cache = ResultCache(cfg.study.workdir / "cache")


def _drive_workers(cfg: StudyConfig, study: optuna.Study, workers: int, deadline: float | None, disp: Display,
                   threads: int | None = None, plan: Sequence[Placement] = ()) -> bool:  # fmt: skip
    """Start ``workers`` worker processes, show progress until the study is done, restart crashed ones.
    ``plan``: each worker's ``search.placement.Placement`` (its device and GPU)."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ)
    # The folder holding the ``slimsearch`` package (the repository or site-packages), never the package's own
    # folder: that would put its ``core``/``search`` first on the workers' path, over a user's packages so named.
    import slimsearch

    root = str(Path(slimsearch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    plan = list(plan) or [Placement(i + 1, cfg.study.device) for i in range(workers)]
    envs = [worker_env(env, p) for p in plan]  # CUDA_VISIBLE_DEVICES set before the worker imports torch

    def start(i: int) -> subprocess.Popen:
        return start_worker(cfg, i + 1, threads, envs[i], plan[i].device)  # its config on stdin, never a file

    procs: dict[int, subprocess.Popen] = {}
    restarts, max_restarts = 0, 3 * workers
    done = False
    try:
        for i in range(workers):
            procs[i] = start(i)
        while True:
            trials = study.get_trials(deepcopy=False)
            target = target_trials(study, cfg.study.n_trials)
            disp.update(trials, target)
            if sum(is_counted(t) for t in trials) >= target:
                done = True
            if deadline is not None and time.time() >= deadline:
                break
            for i, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[i]
                if rc != 0 and not done:
                    restarts += 1
                    if restarts > max_restarts:
                        raise RuntimeError(
                            f"worker processes keep failing (last exit code {rc}); see their errors above"
                        )
                    disp.console.print(f"worker {i + 1} exited with code {rc}; restarting it", markup=False)
                    procs[i] = start(i)
            if not procs:
                break
            time.sleep(POLL_S)
        trials = study.get_trials(deepcopy=False)
        return sum(is_counted(t) for t in trials) >= target_trials(study, cfg.study.n_trials)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _watch_parent(parent_pid: int) -> None:
    """Daemon thread: when the driver that started us is gone, SIGTERM ourselves (trial -> retry)."""

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != parent_pid and not pid_alive(parent_pid):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(
    cfg: StudyConfig, *, parent_pid: int | None = None, worker_index: int | None = None, threads: int | None = None,
    log: Log | None = None,
) -> int:  # fmt: skip
    """Join an existing study (``slimsearch worker``): evaluate trials until it is done; trials run.

    The study must have been started by ``slimsearch run`` (which trains/caches the baseline and
    enqueues the trial slots); this works from any machine that reaches the storage URL.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    if threads:
        torch.set_num_threads(threads)
    if parent_pid:
        _watch_parent(parent_pid)
    storage = open_storage(cfg, create=False)
    study = load_optuna_study(cfg, storage)
    fingerprint.check_config(study.user_attrs.get(fingerprint.ATTR), cfg)  # a changed study file: refused
    sctx = build_study_context(cfg, allow_pretrain=False)
    want = study.user_attrs.get("slimsearch", {}).get("baseline_sha")
    if want is not None and want != sctx.baseline_sha:
        raise SlimError(
            f"this worker's baseline ({sctx.baseline_path}) differs from the study's (weights {want}); copy the "
            "driver's checkpoint / baseline.pt to this machine"
        )
    _attach_cache(sctx, cfg)
    index = worker_index if worker_index is not None else 1000 + os.getpid() % 100_000
    _with_sampler(study, cfg, index)
    deadline = time.time() + cfg.study.timeout if cfg.study.timeout else None
    with _sigterm_interrupts():
        try:
            res = trial_loop(study, sctx, cfg, deadline=deadline)
        except (Interrupted, KeyboardInterrupt):
            if parent_pid or isinstance(sys.exc_info()[1], Interrupted):
                return 0  # the driver (or whoever sent SIGTERM) reports; the trial is queued for retry
            raise
    return res.ran
