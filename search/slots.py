"""Trial slots of an Optuna study shared by many processes: claiming a WAITING trial atomically, topping the
queue up toward n_trials (at most ``SLOT_BATCH`` waiting at a time), failing (for retry) trials whose process died, and the running trial's heartbeat.
See ``search.runner``'s docstring for how these add up to exactly n_trials counted trials."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import optuna
from optuna.trial import TrialState
from slimsearch.search.optuna_study import tally
from slimsearch.search.storage import _quiet, _retry_callback
from slimsearch.search.study import StudyConfig

WORKER_ATTR = "slimsearch:worker"
SLOT_BATCH = 32  # most empty WAITING slots enqueued ahead of the workers (``top_up``)


def pid_alive(pid: int) -> bool:
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
        if pid_alive(int(w.get("pid", -1))):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(t._trial_id, "reason", f"process {w.get('pid')} died")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                _retry_callback(cfg)(study, storage.get_trial(t._trial_id))
                n += 1
    return n


def top_up(study: optuna.Study, target: int, batch: int = SLOT_BATCH) -> int:
    """Enqueue empty trials toward counted + running + waiting == target, but at most ``batch`` waiting at a
    time (slots are made as they are claimed: a huge n_trials never writes a huge queue); returns how many."""
    t = tally(study.get_trials(deepcopy=False))
    missing = min(target - (t.counted + t.running + t.waiting), batch - t.waiting)
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


class Heartbeat:
    """Record the trial's heartbeat every ``interval`` seconds in a daemon thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float) -> None:
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
