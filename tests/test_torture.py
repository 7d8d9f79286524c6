"""Crash torture: SIGKILL the driver or one of its workers at random moments, ten times, restarting the
driver whenever it was the one killed; the study must still end with exactly n_trials counted trials,
every trial that was COMPLETE at any point unchanged, nothing left RUNNING, a best trial that exports to
TorchScript loadable by plain torch, and no process left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_baseline, write_study
from optuna.trial import TrialState
from slimsearch.core.errors import SlimError
from slimsearch.search.runner import is_counted, load_optuna_study, open_storage, tally
from slimsearch.search.study import load_study
from torture_util import alive_in_group, children, plain_torch_output_shape

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 24
KILLS = 10
MAX_RETRY = 5


def complete_trials(cfg) -> dict[int, tuple]:  # noqa: ANN001
    try:
        study = load_optuna_study(cfg, open_storage(cfg, create=False))
    except SlimError:  # killed before it created the study
        return {}
    return {t.number: (t.params, t.values, t.user_attrs.get("policy_hash")) for t in study.get_trials()
            if t.state == TrialState.COMPLETE}  # fmt: skip


def progress(cfg) -> tuple[bool, float]:  # noqa: ANN001
    """(a trial is running now, median seconds of the trials completed so far; 1.0 before any)."""
    try:
        study = load_optuna_study(cfg, open_storage(cfg, create=False))
    except SlimError:
        return False, 1.0
    trials = study.get_trials(deepcopy=False)
    done = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete)  # fmt: skip
    return tally(trials).running > 0, done[len(done) // 2] if done else 1.0


@pytest.mark.slow
def test_random_sigkills_of_driver_and_workers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = make_baseline(tmp_path_factory)
    path = write_study(
        tmp_path, ckpt, name="torture", n_trials=N_TRIALS, constraint="max_macs_ratio = 0.8",
        study=f"n_startup_trials = 6\nmax_retry = {MAX_RETRY}",
        seeds='strategies = ["uniform"]\nuniform_rates = [0.3, 0.5]',
        evaluator='kind = "finetune"\nsteps = 40\nlr = 0.02\nkd = true',
    )  # fmt: skip
    cfg = load_study(path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "slimsearch", "run", str(path), "--workers", "2", "--threads", "1", "--no-progress"]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed in finally
    rng = random.Random(20240607)
    groups: list[int] = []
    seen: dict[int, tuple] = {}  # every trial ever seen COMPLETE -> (params, values, policy hash)
    kills: list[str] = []

    def start() -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        groups.append(p.pid)  # own session: its process group id is its pid, and its workers share it
        return p

    def record() -> None:
        now = complete_trials(cfg)
        for n, v in seen.items():  # a COMPLETE trial never changes or disappears
            assert now.get(n) == v, f"trial {n} changed after a kill: {v} -> {now.get(n)}"
        seen.update(now)

    driver = start()
    worker_kills_since_start = 0
    try:
        while len(kills) < KILLS:
            # Kill moments: mostly while trials are running, sometimes while the driver still starts up.
            # The pause is a random fraction of a trial's measured duration, so that all the kills land
            # before the study ends however fast this machine runs a trial.
            wait_for_trials = rng.random() < 0.8
            until = time.time() + 90
            running, trial_s = progress(cfg)
            while wait_for_trials and not running and driver.poll() is None and time.time() < until:
                time.sleep(0.2)
                running, trial_s = progress(cfg)
            time.sleep(rng.uniform(0.1, 1.0) * trial_s)
            if driver.poll() is not None:
                break  # the study finished before all kills happened (asserted below)
            workers = children(driver.pid)
            # The driver restarts a crashed worker at most 3 x workers times per run: kill it instead then.
            hit_worker = workers and rng.random() < 0.5 and worker_kills_since_start < 5
            if hit_worker:
                victim = rng.choice(workers)
                os.kill(victim, signal.SIGKILL)
                worker_kills_since_start += 1
                kills.append(f"worker {victim}")
                until = time.time() + 30  # let the driver notice and replace it before the next kill
                while (
                    driver.poll() is None
                    and time.time() < until
                    and (victim in (now := children(driver.pid)) or len(now) < len(workers))
                ):
                    time.sleep(0.1)
                record()
            else:
                os.kill(driver.pid, signal.SIGKILL)
                driver.wait()
                kills.append(f"driver {driver.pid}")
                record()
                driver = start()  # its orphaned workers notice within a second and stop (trial -> retry)
                worker_kills_since_start = 0
        rc = driver.wait(timeout=240)
        assert rc == 0, (tmp_path / "driver.log").read_text()[-3000:]
        record()
    finally:
        for g in groups:
            if alive_in_group(g):
                os.killpg(g, signal.SIGKILL)
        log.close()

    assert len(kills) == KILLS, f"the study finished after only {kills}"
    assert any(k.startswith("worker") for k in kills) and any(k.startswith("driver") for k in kills)
    assert "restarting it" in (tmp_path / "driver.log").read_text()  # a killed worker is replaced
    study = load_optuna_study(cfg, open_storage(cfg, create=False))
    trials = study.get_trials()
    tl = tally(trials)
    assert tl.counted == N_TRIALS and tl.running == 0, tl
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    killed = [t for t in trials if t.state == TrialState.FAIL and not is_counted(t)]
    assert killed, f"no kill landed during a trial: {kills}"  # else this test tortured nothing
    print(f"kills: {kills}; trials {len(trials)} ({tl.by_state}); interrupted: {[t.number for t in killed]}")
    # Each trial that never finished evaluating (killed) was re-enqueued once with the same parameters,
    # until its chain of retries reached max_retry. (Optuna's "failed_trial" names the first trial of
    # the chain; the trial a retry directly replaces is the last of its "retry_history".)
    for t in killed:
        retry = [x for x in trials if x.system_attrs.get("retry_history", [None])[-1] == t.number]
        assert len(retry) == (len(t.system_attrs.get("retry_history", [])) < MAX_RETRY), (t.number, len(retry))
        # A worker killed while suggesting leaves the parameters it had stored (Optuna persists each suggest);
        # the retry fixes those and samples the rest, so it keeps every parameter of the killed trial.
        assert all(t.params.items() <= r.params.items() for r in retry), (t.number, t.params, [r.params for r in retry])

    # Export the best trial; the TorchScript file loads and runs with plain torch in a fresh process.
    out = tmp_path / "export"
    res = subprocess.run([*cmd[:3], "export", str(path), "--trial", "best", "--format", "torchscript",
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert plain_torch_output_shape(out / "model.torchscript.pt") == "(2, 10)"
    assert not any(alive_in_group(g) for g in groups)
