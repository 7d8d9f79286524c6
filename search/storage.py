"""The study's Optuna RDB storage: opening it (SQLite with WAL, PostgreSQL, MySQL), and the lock that serialises
claiming and enqueuing trial slots between processes (a file lock beside SQLite, an advisory lock on PostgreSQL)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from slimsearch.core.errors import SlimError
from slimsearch.search.study import StudyConfig, mask_url, sqlite_path

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
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


def _retry_callback(cfg: StudyConfig) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with _quiet():
        return cls(max_retry=cfg.study.max_retry)


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


def open_in_workdir(cfg: StudyConfig, storage: optuna.storages.RDBStorage | None) -> optuna.storages.RDBStorage:
    """Create the workdir, then open the storage (unless ``storage`` is already open): a folder the earlier checks
    could not foresee (e.g. under /proc) is refused before the database exists, and a database that cannot be
    created leaves no new workdir behind (the folders made here are removed again)."""
    workdir = cfg.study.workdir
    made = [p for p in (workdir, *workdir.parents) if not p.exists()]  # deepest first
    try:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimError(f"{cfg.path}: [study] workdir: cannot create {workdir} ({e.strerror or e})") from None
        return storage or open_storage(cfg)
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _empty_database(p: Path) -> bool:
    """Whether the SQLite file ``p`` is empty even once a ``run`` creating it is done: a creator makes the file
    (0 bytes) while it holds the study's file lock (``storage_lock``), so a reader waits for that lock (opened
    read-only: it creates nothing) before calling an empty file a user's mistake."""
    if p.stat().st_size:
        return False
    with contextlib.suppress(OSError), open(f"{p}.lock") as fh:  # no lock file: no creator ever ran
        fcntl.flock(fh, fcntl.LOCK_SH)
        fcntl.flock(fh, fcntl.LOCK_UN)
    return p.stat().st_size == 0


def engine_url(url: str) -> str:
    """``url`` with an installed DBAPI driver: SQLAlchemy >= 2.1 maps a bare ``postgresql://`` to psycopg
    (3), older versions to psycopg2; use whichever is importable (psycopg first). Other URLs unchanged."""
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
        if not create and p.is_file() and _empty_database(p):  # Optuna would write its tables into it
            raise SlimError(f"storage {p} is an empty file, not a study database; start the study with "
                            f"`slimsearch run {cfg.path}` (after removing it)")  # fmt: skip
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

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # another process holds it in rollback mode right now: keep that
            pass
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sa.event.listen(engine, "connect", on_connect)
    engine.dispose()  # the schema set-up's pooled connections predate the listener


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
