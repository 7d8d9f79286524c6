"""What a Ray Tune run prints: one line per finished trial (``records.trial_line``) and one per trial error,
instead of Ray's own tables. The callback that calls these (``ray_runner.TrialLines``) is pickled into the
experiment and comes back on restore, so it prints through a module-level logger that ``fit_quietly`` sets
for the run in progress."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from slimsearch.search.ray_results import _error_line, _trial_status, record_from_row
from slimsearch.search.records import trial_line

Log = Callable[[str], None]


# The callback object is pickled into the experiment (tuner.pkl) and comes back on restore; it prints
# through this module-level logger so a resumed run logs to its own caller (None: silent).
_PROGRESS_LOG: Log | None = None


def _log_trial_complete(trial: Any) -> None:
    if _PROGRESS_LOG is not None:
        last = dict(trial.last_result or {})
        last["status"] = _trial_status("TERMINATED", last)
        _PROGRESS_LOG(trial_line(record_from_row(last)))


def _log_trial_error(trial: Any, retry: bool = False) -> None:
    """A trial's process died (or its code raised): retried with the same parameters, or given up."""
    if _PROGRESS_LOG is not None:
        n = (trial.config or {}).get("_number", "?")
        k = trial.run_metadata.num_failures
        why = _error_line(trial) or "?"
        then = f"retrying it ({k} of {trial.max_failures})" if retry else "a fresh trial takes its slot"
        _PROGRESS_LOG(f"trial {n:>4}  error       attempt {k}: {why}; {then}")


def fit_quietly(tuner: Any, log: Log | None) -> Any:
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
