"""Optuna runner: create-or-resume a study in an RDB storage and evaluate trials until n_trials are done.

How n_trials is reached exactly, across worker processes, machines and restarts
--------------------------------------------------------------------------------
A trial *counts* when it was evaluated: COMPLETE (ok or infeasible), PRUNED, or FAIL with
``user_attrs["status"] == "fail"`` (the evaluator reported a failure: bad policy, NaN loss...).
Trials that never finished evaluating do not count: a killed or interrupted process leaves a FAIL
without a status, and such a trial is re-enqueued with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``, up to ``[study] max_retry`` times).

Work is handed out through *slots*: ``run`` enqueues the seed trials and then empty WAITING trials
until counted + running + waiting == n_trials. Every process (the driver, ``--workers`` processes,
``slimsearch worker`` on other machines) claims WAITING trials with the storage's atomic
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
import fcntl
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from slimsearch.core.errors import SlimError
from slimsearch.search.study import StudyConfig, mask_url, sqlite_path

WORKER_ATTR = "slimsearch:worker"
SEED_POLICY_ATTR = "seed_policy"  # user attr of an enqueued seed trial: the exact policy JSON to evaluate
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")
POLL_S = 1.0
FLAT_METRICS = ("val_acc", "macs", "flops", "params", "macs_ratio", "params_ratio", "latency_ms", "latency_pred_ms",
                "latency_ratio")  # fmt: skip

Log = Callable[[str], None]

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# tensorly clips an over-large SVD rank itself and says so once per layer: noise in a trial log.
warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quiet() -> contextlib.AbstractContextManager[None]:
    """Silence Optuna's ExperimentalWarnings (heartbeat, retry callback, group) wherever we touch them."""
    ctx = warnings.catch_warnings()

    class _Q(contextlib.AbstractContextManager):
        def __enter__(self) -> None:
            ctx.__enter__()
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

        def __exit__(self, *exc: object) -> None:
            ctx.__exit__(*exc)

    return _Q()


class Interrupted(BaseException):
    """SIGTERM / a vanished parent: stop after marking the current trial for retry.

    A BaseException (like KeyboardInterrupt), so the evaluator's catch-all does not turn it into a failed trial.
    """


# ----------------------------------------------------------------------------- storage and study


def _retry_callback(cfg: StudyConfig) -> Any:
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with _quiet():
        return cls(max_retry=cfg.study.max_retry)


def uses_ray(cfg: StudyConfig) -> bool:
    """Whether status/report/export read the study's Ray Tune results: backend "ray", or an Optuna-backend
    study that was only ever run on Ray (``run --ray-address``: Ray results exist, its SQLite file does not)."""
    if cfg.study.backend == "ray":
        return True
    from slimsearch.search.ray_runner import ray_meta_path

    return not storage_exists(cfg) and ray_meta_path(cfg).is_file()


def storage_exists(cfg: StudyConfig) -> bool:
    """False when the study's SQLite file does not exist yet (other backends: assume it does)."""
    p = sqlite_path(cfg.study.storage)
    return p is None or p.is_file()


def check_sqlite_target(cfg: StudyConfig) -> None:
    """A SQLite database file must be creatable (or be a file) without creating anything yet."""
    p = sqlite_path(cfg.study.storage)
    if p is None:
        return
    if p.exists():
        if not p.is_file():
            raise SlimError(f"storage {p} exists and is not a file")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SlimError(f"storage {p}: cannot create it ({parent} is not a writable folder)")


def engine_url(url: str) -> str:
    """``url`` with an installed DBAPI driver: SQLAlchemy >= 2.1 maps a bare ``postgresql://`` to psycopg
    (3), older versions to psycopg2; use whichever is importable (psycopg first). Other URLs unchanged."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "postgresql":
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return url  # the ImportError below names the missing driver


def open_storage(cfg: StudyConfig, *, create: bool = True) -> optuna.storages.RDBStorage:
    """The study's RDBStorage with heartbeat and retry of stale trials. ``create=False``: a missing
    SQLite file is a ``SlimError`` (status/report/export must not create one)."""
    url = cfg.study.storage
    shown = mask_url(url)
    p = sqlite_path(url)
    kwargs: dict[str, Any] = {}
    if p is not None:
        if not p.is_file():
            if not create:
                raise SlimError(f"no study storage at {p}; start the study with `slimsearch run {cfg.path}`")
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SlimError(f"storage {p}: cannot create its folder ({e.strerror or e})") from None
        kwargs = {"connect_args": {"timeout": 120}}  # seconds to wait for another process's write lock
    else:
        # An unreachable server must fail within seconds, not after the OS's TCP timeout (minutes).
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    s = cfg.study
    key = "heartbeat_stale_trial_callback"
    if "heartbeat_stale_trial_callback" not in optuna.storages.RDBStorage.__init__.__code__.co_varnames:
        key = "failed_trial_callback"  # optuna < 4.9
    # Processes initialising a fresh database at once race in Optuna's schema set-up ("table ... already
    # exists", UNIQUE alembic_version): SQLite creators (``run``) take the study's file lock; any other
    # opener that loses the race retries (the schema is complete by then). Readers never wait for the lock.
    try:
        with storage_lock(cfg) if p is not None and create else contextlib.nullcontext():
            for attempt in range(3):
                try:
                    with _quiet():
                        storage = optuna.storages.RDBStorage(
                            engine_url(url),
                            engine_kwargs=kwargs,
                            heartbeat_interval=s.heartbeat_interval,
                            grace_period=s.grace_period,
                            **{key: _retry_callback(cfg)},
                        )
                    if p is not None:
                        _sqlite_wal(storage.engine)
                    return storage
                except Exception as e:
                    racing = type(e).__name__ == "IntegrityError" or "already exists" in str(e)
                    if attempt == 2 or not racing:
                        raise
                    time.sleep(0.5)
    except ImportError as e:
        extra = " (pip install 'slimsearch[postgres]')" if url.startswith("postgres") else ""
        raise SlimError(f"storage {shown}: database driver missing: {e}{extra}") from None
    except Exception as e:  # connection refused, not a database, wrong credentials...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlimError(f"cannot open storage {shown}: {mask_url(first)[:300]}") from None


def _sqlite_wal(engine: Any) -> None:
    """Write-ahead log + ``synchronous=NORMAL`` on every later connection of an SQLite storage engine.

    Optuna commits each parameter and attribute separately; with SQLite's default rollback journal each
    commit is two fsyncs, which made storage the largest non-training cost of a proxy trial (0.61 s per
    50-parameter trial, 0.29 s with WAL; benchmarks/bench_throughput.py). WAL keeps committed transactions
    across a killed process (NORMAL only risks the last ones on power loss) and lets readers (status,
    report) run beside writers. It needs every process on one host, which a SQLite study already does
    (file locks); a database another process holds in rollback mode stays as it is.
    """
    import sqlite3

    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # another process holds it in rollback mode right now: keep that
            pass
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # the schema set-up's pooled connections predate the listener


def make_sampler(cfg: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The [study] sampler, seeded; TPE and NSGA-II get the MACs and latency constraints."""
    s = cfg.study
    # Optuna >= 5 reads constraints that the trial sets itself (Trial.set_constraint, see _record).
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
        from slimsearch.search.local_sampler import LocalSearchSampler

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
    """The bounds' violations of an evaluated trial, for the constraint-aware samplers: as the "constraint"
    user attr (Optuna < 5's ``constraints_func``) and, where Optuna has it, ``Trial.set_constraint``."""
    from slimsearch.evaluators.evaluate import violations

    names = bound_names(cfg)
    if not names:
        return
    cons = violations(metrics, names)
    trial.set_user_attr("constraint", list(cons.values()))
    if hasattr(trial, "set_constraint"):
        done = trial.storage.get_trial_system_attrs(trial._trial_id)
        for name, v in cons.items():
            if f"constraints:{name}" not in done:  # a retried trial keeps its first values
                trial.set_constraint(name, v)


def _pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    ev = cfg.evaluator
    if cfg.study.pruner == "median" and not cfg.multi_objective and ev.kind == "finetune" and ev.eval_every > 0:
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


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
        return study
    if not create:
        raise SlimError(f"study {cfg.name!r} not found in {mask_url(cfg.study.storage)}; start it with "
                        f"`slimsearch run {cfg.path}`")  # fmt: skip
    return optuna.create_study(
        storage=storage, study_name=cfg.name, directions=directions, sampler=sampler, pruner=_pruner(cfg),
        load_if_exists=True,
    )  # fmt: skip


@contextlib.contextmanager
def storage_lock(cfg: StudyConfig) -> Iterator[None]:
    """Exclusive lock for claim/enqueue: a file lock beside a SQLite database, a session advisory lock
    on PostgreSQL (released by the server if the holder dies); no-op elsewhere."""
    p = sqlite_path(cfg.study.storage)
    if p is None:
        if cfg.study.storage.startswith("postgresql"):
            with _pg_advisory_lock(cfg):
                yield
            return
        yield
        return
    with open(f"{p}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_advisory_lock(cfg: StudyConfig) -> Iterator[None]:
    """``pg_advisory_lock`` keyed by the study name, on a connection of its own (NullPool: closing it
    really closes it, so the lock can never outlive this block). Without it, workers topping up the
    queue at the same moment enqueue the missing slots several times over (Optuna row-locks a claim,
    but nothing serialises "count, then enqueue")."""
    import hashlib

    import sqlalchemy as sa

    key = int.from_bytes(hashlib.sha256(f"slimsearch:{cfg.name}".encode()).digest()[:8], "big", signed=True)
    eng = sa.create_engine(engine_url(cfg.study.storage), poolclass=sa.pool.NullPool,
                           connect_args={"connect_timeout": 10})  # fmt: skip
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a dead connection has released the lock already
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        eng.dispose()


# ----------------------------------------------------------------------------- trial bookkeeping


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead(study: optuna.Study, cfg: StudyConfig) -> int:
    """Fail (and retry) RUNNING trials whose heartbeat is stale or whose process on this host is gone."""
    with _quiet():
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    storage = study._storage
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.system_attrs.get(WORKER_ATTR)
        # The retry of a trial copies its system attrs: trust the record only for the trial it names.
        if not isinstance(w, dict) or w.get("trial") != t.number or w.get("host") != host:
            continue
        if _pid_alive(int(w.get("pid", -1))):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(t._trial_id, "reason", f"process {w.get('pid')} died")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                _retry_callback(cfg)(study, storage.get_trial(t._trial_id))
                n += 1
    return n


def top_up(study: optuna.Study, target: int) -> int:
    """Enqueue empty trials until counted + running + waiting == target; returns how many."""
    t = tally(study.get_trials(deepcopy=False))
    missing = target - (t.counted + t.running + t.waiting)
    for _ in range(max(0, missing)):
        study.enqueue_trial({})
    return max(0, missing)


def claim(study: optuna.Study) -> int | None:
    """Atomically move one WAITING trial (lowest number first) to RUNNING; its id, or None.

    The first heartbeat and this process's identity are recorded at once, so a claimed trial whose
    process dies before evaluating it is still found by ``reap_dead``.
    """
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.record_heartbeat(t._trial_id)
        storage.set_trial_system_attr(
            t._trial_id, WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "trial": t.number}
        )
        return t._trial_id
    return None


class _Heartbeat:
    """Record the trial's heartbeat every ``interval`` seconds in a daemon thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._stop = threading.Event()
        storage.record_heartbeat(trial_id)

        def beat() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(Exception):  # a missed beat is retried next interval
                    storage.record_heartbeat(trial_id)

        self._thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- one trial


def objective_values(cfg: StudyConfig, metrics: dict[str, float]) -> list[float]:
    """Objective values from a result's metrics; missing ones (infeasible: no val_acc) get the worst."""
    out = []
    for o in cfg.study.objectives:
        v = metrics.get(o.metric)
        if v is None or not math.isfinite(v):
            v = 0.0 if o.metric == "val_acc" else (math.inf if o.direction == "minimize" else -math.inf)
        out.append(float(v))
    return out


def _record(trial: optuna.Trial, cfg: StudyConfig, policy: Any, res: Any, fit_s: float = 0.0) -> None:
    attrs: dict[str, Any] = {
        "policy": policy.to_json(),
        "policy_hash": policy.hash,
        "policy_summary": policy.summary(),
        "metrics": {**{k: float(v) for k, v in res.metrics.items()}, "fit_s": fit_s},
        "reason": res.reason,
        "cached": bool(res.cached),
    }
    if getattr(res, "model_digest", ""):
        attrs["model_digest"] = res.model_digest
    attrs.update({k: float(res.metrics[k]) for k in FLAT_METRICS if k in res.metrics})
    if res.intermediate:
        attrs["intermediate"] = [[int(s), float(a)] for s, a in res.intermediate]
    record_constraints(trial, cfg, res.metrics)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", res.status)  # last: marks the trial as evaluated


def trial_policy(trial: optuna.Trial, sctx: Any) -> Any:
    """The policy a trial evaluates: the space's suggestion (always asked, so the sampler records the
    parameters), replaced by the exact seed policy when the trial was enqueued with one. ``run_trial``
    then fits it under the MACs bound (``StudyContext.fit``)."""
    from slimsearch.core.policy import Policy

    policy = sctx.space.suggest(trial)
    exact = trial.user_attrs.get(SEED_POLICY_ATTR)
    if isinstance(exact, str) and exact:
        policy = Policy.from_json(exact, where=f"trial {trial.number} {SEED_POLICY_ATTR}")
    return policy


def run_trial(study: optuna.Study, trial_id: int, sctx: Any, cfg: StudyConfig) -> FrozenTrial:
    """Evaluate one claimed (RUNNING) trial and tell Optuna the outcome.

    Evaluator failures -> FAIL with a reason (the study goes on); Ctrl-C / SIGTERM -> FAIL and
    re-enqueued for retry, then re-raised; anything else (a bug) -> FAIL with status "error", re-raised.
    """
    from slimsearch.evaluators.evaluate import evaluate

    storage = study._storage
    trial = optuna.trial.Trial(study, trial_id)
    hb = _Heartbeat(storage, trial_id, cfg.study.heartbeat_interval)
    try:
        policy = trial_policy(trial, sctx)
        t_fit = time.perf_counter()
        policy = sctx.fit(policy)
        fit_s = time.perf_counter() - t_fit
        report = None
        if not cfg.multi_objective and not isinstance(study.pruner, optuna.pruners.NopPruner):

            def report(step: int, acc: float) -> bool:
                trial.report(acc, step)
                return trial.should_prune()

        res = evaluate(sctx.eval_ctx, cfg.evaluator, policy, report=report)
        _record(trial, cfg, policy, res, fit_s)
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
        from slimsearch.evaluators.evaluate import one_line

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
    sctx: Any,
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


def study_info(sctx: Any) -> dict[str, Any]:
    """What status/report need without rebuilding the model: baseline cost, bound, layer shapes."""
    from slimsearch.spaces.describe import exclusions

    e, excluded = sctx.eval_ctx, exclusions(sctx.space)
    return {
        "base": {
            "macs": int(e.base.macs),
            "params": int(e.base.params),
            "val_acc": e.base_val_acc,
            "input_shape": list(sctx.input_shape),
        },  # fmt: skip
        "max_macs": e.max_macs,
        "latency": sctx.latency_info(),
        "layers": [
            {
                "name": i.name,
                "out_channels": int(i.out_channels),
                "prunable": bool(i.prunable),
                "decomposable": bool(i.decomposable),
                "excluded": excluded.get(i.name),  # why the search leaves it alone (None: searched)
            }  # fmt: skip
            for i in sctx.space.all_layers
        ],
        "model": sctx.cfg.model.factory,
        "dataset": sctx.cfg.data.dataset,
        "baseline_sha": sctx.baseline_sha,
    }


def seed_policies(sctx: Any, log: Log | None = None) -> list[tuple[str, Any]]:
    """(label, Policy) for every [seeds] strategy, in order (methods within [seeds] budget evaluator calls)."""
    from slimsearch.search.seeding import generate_seeds

    return generate_seeds(sctx, log=log)


def prepare_study(cfg: StudyConfig, sctx: Any, storage: Any, *, log: Log = print) -> optuna.Study:
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
        study.set_user_attr("slimsearch", info)
        study.set_user_attr("n_trials", cfg.study.n_trials)
        study.set_user_attr("objectives", [o.spec for o in cfg.study.objectives])
        if "seeds_enqueued" not in study.user_attrs:
            seeds = seed_policies(sctx, log=log)
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


# ----------------------------------------------------------------------------- progress display


def fmt_count(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def trial_line(t: FrozenTrial) -> str:
    """One human line per finished trial."""
    ua = t.user_attrs
    status = ua.get("status") or ("interrupted" if t.state == TrialState.FAIL else t.state.name.lower())
    parts = [f"trial {t.number:>4}", f"{status:<10}"]
    if "val_acc" in ua:
        parts.append(f"val_acc {ua['val_acc']:.4f}")
    if "macs" in ua:
        parts.append(f"MACs {fmt_count(ua['macs'])} ({ua.get('macs_ratio', float('nan')):.1%})")
    if "params" in ua:
        parts.append(f"params {fmt_count(ua['params'])}")
    if "latency_ms" in ua:
        parts.append(f"{ua['latency_ms']:.2f} ms")
    wall = ua.get("metrics", {}).get("wall_s")
    if wall is not None:
        parts.append(f"{wall:.1f}s" + (" (cached)" if ua.get("cached") else ""))
    if "seed" in ua:
        parts.append(f"seed {ua['seed']}")
    if ua.get("reason") and status != "ok":
        parts.append(f"- {ua['reason'][:120]}")
    return "  ".join(parts)


def ranked_feasible(trials: Sequence[FrozenTrial], max_macs: float | None = None) -> list[FrozenTrial]:
    """COMPLETE trials within the study's bounds (and ``max_macs``), best first: val_acc, then fewer MACs,
    then the earlier trial; one trial per distinct network (``model_digest``; the policy where a trial has
    none): cached repeats, re-drawn policies and policies that build the same network collapse."""
    ok = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "ok"]
    if max_macs is not None:
        ok = [t for t in ok if t.user_attrs.get("macs", float("inf")) <= max_macs]
    ok.sort(key=lambda t: (-t.user_attrs.get("val_acc", 0.0), t.user_attrs.get("macs", 0.0), t.number))
    seen: set[str] = set()
    out = []
    for t in ok:
        key = t.user_attrs.get("model_digest") or t.user_attrs.get("policy", f"#{t.number}")
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def best_feasible(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """Highest val_acc among COMPLETE trials that satisfy the study's bounds (``ranked_feasible``'s first)."""
    return next(iter(ranked_feasible(trials)), None)


class _Display:
    """rich progress bar (trials done/total, best so far, ETA) plus one line per finished trial."""

    def __init__(self, total: int, done: int, progress: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(highlight=False, soft_wrap=True)
        self.seen: set[int] = set()
        self.prog = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not (progress and self.console.is_terminal),
        )  # fmt: skip
        self.task = self.prog.add_task("trials", total=total, completed=done, best="-")

    def __enter__(self) -> _Display:
        self.prog.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prog.__exit__(*exc)

    def update(self, trials: Sequence[FrozenTrial], total: int) -> None:
        for t in sorted(trials, key=lambda t: t.number):
            if t.number in self.seen or not t.state.is_finished():
                continue
            self.seen.add(t.number)
            self.console.print(trial_line(t), markup=False)
        best = best_feasible(trials)
        label = f"{best.user_attrs['val_acc']:.4f} (#{best.number})" if best else "-"
        self.prog.update(self.task, total=total, completed=sum(is_counted(t) for t in trials), best=label)


# ----------------------------------------------------------------------------- entry points


@dataclass
class RunSummary:
    name: str
    counted: int
    n_trials: int
    by_state: dict[str, int]
    best: dict[str, Any] | None
    wall_s: float
    done: bool


def _summary(study: optuna.Study, cfg: StudyConfig, t0: float, done: bool) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    tl = tally(trials)
    b = best_feasible(trials)
    best = None if b is None else {"trial": b.number, **{k: b.user_attrs.get(k) for k in ("val_acc", "macs", "params")}}
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
    faster on one thread, and oversubscribed cores slow everything down). Backend "ray" dispatches
    to ``search.ray_runner.run_ray``.
    """
    if cfg.study.backend == "ray":
        from slimsearch.search.ray_runner import run_ray  # another module's job; imported only when asked for

        return run_ray(cfg, progress=progress, log=log)  # type: ignore[return-value]
    from slimsearch.search.context import build_study_context
    from slimsearch.search.placement import local_gpus, plan_workers

    # Workers across GPUs (round-robin, or one per GPU); cuda without CUDA is an error before anything is written.
    plan = plan_workers(cfg.study.device, workers or cfg.evaluator.workers, local_gpus(cfg.study.device))
    workers = len(plan)
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    log = log or (lambda s: console.print(s, markup=False))
    t0 = time.perf_counter()
    # Storage problems are reported before anything is written (or a baseline trained).
    storage = None if sqlite_path(cfg.study.storage) else open_storage(cfg)
    check_sqlite_target(cfg)
    sctx = build_study_context(cfg, log=log)
    sctx.latency_info(log)  # a latency bound's table: measured (or loaded) before any write or worker
    from slimsearch.spaces.describe import log_exclusions

    log_exclusions(sctx.space, log)  # once per run: which conv layers the search leaves alone, and why
    storage = storage or open_storage(cfg)
    _attach_cache(sctx, cfg)
    study = prepare_study(cfg, sctx, storage, log=log)
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
    with _Display(target_trials(study, cfg.study.n_trials), tl.counted, progress) as disp:
        disp.seen.update(t.number for t in trials if t.state.is_finished())
        if workers == 1:
            import torch

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


def _attach_cache(sctx: Any, cfg: StudyConfig) -> None:
    """Results persist under <workdir>/cache (shared by the workers); created only once input is valid."""
    from slimsearch.evaluators.cache import ResultCache

    sctx.eval_ctx.cache = ResultCache(cfg.study.workdir / "cache")


def _worker_cmd(cfg_file: Path, cfg: StudyConfig, index: int, threads: int, device: str | None = None) -> list[str]:
    return [sys.executable, "-m", "slimsearch", "worker", str(cfg.path), "--config-pickle", str(cfg_file),
            "--parent-pid", str(os.getpid()), "--worker-index", str(index), "--threads", str(threads),
            *(["--device", device] if device else [])]  # fmt: skip


def _drive_workers(cfg: StudyConfig, study: optuna.Study, workers: int, deadline: float | None, disp: _Display,
                   threads: int | None = None, plan: Sequence[Any] = ()) -> bool:  # fmt: skip
    """Start ``workers`` worker processes, show progress until the study is done, restart crashed ones.
    ``plan``: each worker's ``search.placement.Placement`` (its device and GPU)."""
    cfg.study.workdir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".worker-config-", suffix=".pkl", dir=cfg.study.workdir)
    cfg_file = Path(name)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(cfg, fh)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ)
    # The folder holding the ``slimsearch`` package (the repository or site-packages), never the package's own
    # folder: that would put its ``core``/``search`` first on the workers' path, over a user's packages so named.
    import slimsearch

    root = str(Path(slimsearch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    from slimsearch.search.placement import Placement, worker_env

    plan = list(plan) or [Placement(i + 1, cfg.study.device) for i in range(workers)]
    envs = [worker_env(env, p) for p in plan]  # CUDA_VISIBLE_DEVICES set before the worker imports torch

    def start(i: int) -> subprocess.Popen:
        return subprocess.Popen(_worker_cmd(cfg_file, cfg, i + 1, threads, plan[i].device), env=envs[i])

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
        cfg_file.unlink(missing_ok=True)


def _watch_parent(parent_pid: int) -> None:
    """Daemon thread: when the driver that started us is gone, SIGTERM ourselves (trial -> retry)."""

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != parent_pid and not _pid_alive(parent_pid):
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
    import torch
    from slimsearch.search.context import build_study_context

    log = log or (lambda s: print(s, file=sys.stderr))
    if threads:
        torch.set_num_threads(threads)
    if parent_pid:
        _watch_parent(parent_pid)
    storage = open_storage(cfg, create=False)
    study = load_optuna_study(cfg, storage)
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
