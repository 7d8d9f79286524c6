"""Crash torture for the Ray Tune backend: SIGKILL Ray trial workers and the driver (``slimsearch run``) at
random moments, ten times, restarting the driver whenever it was the one killed (``Tuner.restore``).

The study must end with exactly n_trials evaluated trials, every trial ever seen finished unchanged, nothing
left RUNNING or PENDING, a best trial that exports to TorchScript loadable by plain torch, and no trial
worker left behind. The fast tests check the runner pieces the torture relies on without a Ray runtime.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_baseline, write_study
from slimsearch.search.study import load_study
from torture_util import kill_session, plain_torch_output_shape, session_processes

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 24  # long enough that 10 kills land before the study ends (kill_plan's delays scale with a trial)
TRIAL_S = 3.0  # training time of one full trial: Tune's snapshot period (~10 s) must not outlast the study
KILLS = 10  # 2 of the driver (the first one right after Tune wrote tuner.pkl), 8 of trial workers
TRIAL_ACTOR = "ray::ImplicitFunc"  # process title of a function trainable's actor; ".train" while it runs a trial


# ----------------------------------------------------------------------------- fast checks (no Ray runtime)


def _tiny_cfg(tmp: Path):  # noqa: ANN202
    from helpers import write_ray_study as _write_study

    return load_study(_write_study(tmp, "slots"))


def test_errored_trials_get_fresh_slots_up_to_n_trials(tmp_path: Path) -> None:
    """A trial Tune gives up on (ERROR) is replaced by a fresh one, at most n_trials times; the count of
    replacements survives a restore, and a larger n_trials on restore keeps them."""
    from optuna.trial import TrialState
    from slimsearch.core.models import build_model
    from slimsearch.search.ray_runner import _write_meta, make_search_alg
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    cfg = _tiny_cfg(tmp_path)
    space = SearchSpace.build(build_model("smallcnn", 10, 1), SpaceConfig(), (1, 1, 8, 8))
    _write_meta(cfg, 3, {})
    gen = make_search_alg(cfg, space, [], workers=2)
    gen.searcher.set_search_properties(None, None, space.ray_param_space())
    gen._total_samples = 3  # what Tuner sets from num_samples
    assert gen.searcher.suggest("t0")["_number"] == 0 and gen.searcher.suggest("t1")["_number"] == 1
    gen._counter = 3  # three trials created: the generator is done
    assert gen.is_finished()
    gen.on_trial_complete("t0", error=True)
    assert not gen.is_finished() and (gen._total_samples, gen.errors) == (4, 1)
    ot = gen.searcher.searcher._ot_study.get_trials(deepcopy=False)
    assert ot[0].state == TrialState.FAIL  # the sampler learns nothing from the lost trial
    gen.on_trial_complete("t1", {"status": "ok", "val_acc": 0.5})  # a normal end changes no total
    assert gen._total_samples == 4
    for i in range(4):  # errors beyond n_trials (3) get no more slots
        gen.on_trial_complete(f"gone{i}", error=True)
    assert (gen._total_samples, gen.errors) == (6, 5)

    state = gen.get_state()
    again = make_search_alg(cfg, space, [], workers=2)
    again.set_state(state)
    assert (again._total_samples, again.errors) == (6, 5)
    _write_meta(cfg, 10, {})  # resumed with a larger n_trials: 10 + the 5 replacements now allowed
    again.set_state(state)
    assert again._total_samples == 15 and not again.is_finished()


def test_trial_status_of_errored_and_interrupted_trials() -> None:
    from slimsearch.search.ray_results import _trial_status

    partial = {"status": "partial", "val_acc": 0.3, "step": 10}
    assert _trial_status("ERROR", partial) == "error"  # was "running" forever
    assert _trial_status("ERROR", {"status": "ok", "val_acc": 0.9}) == "error"  # replaced: not counted twice
    assert _trial_status("ERROR", {}) == "error"
    assert _trial_status("RUNNING", partial) == "running" and _trial_status("PENDING", partial) == "running"
    assert _trial_status("TERMINATED", partial) == "pruned"
    assert _trial_status("TERMINATED", {"status": "infeasible"}) == "infeasible"
    assert _trial_status("PENDING", {}) == "pending"


def test_errored_trial_row_and_its_reason(tmp_path: Path) -> None:
    """An ERROR trial (Tune keeps its message only in an error file) is a row with status "error" and the
    latest failure as reason; reading it used to raise AttributeError (``Trial.error_msg`` does not exist)."""
    from types import SimpleNamespace

    from slimsearch.search.ray_results import _error_line, trials_table

    died = "The actor died unexpectedly before finishing this task."
    f = tmp_path / "error.txt"
    f.write_text("Failure # 1 (occurred at 2026-01-01_00-00-00)\nTraceback (most recent call last):\n  x\n"
                 "ValueError: boom\nFailure # 2 (occurred at 2026-01-01_00-00-09)\n"
                 f"{died}\n\tclass_name: ImplicitFunc\n\tpid: 123\n")  # fmt: skip
    assert _error_line(SimpleNamespace(error_file=str(f))) == died  # the latest failure, not the first
    f.write_text(f.read_text().split("Failure # 2")[0])
    assert _error_line(SimpleNamespace(error_file=str(f))) == "ValueError: boom"

    class NoRay:  # outside the driver: Trial.error_file asserts that Ray is initialised
        path = str(tmp_path)
        run_metadata = SimpleNamespace(error_filename="error.txt")

        @property
        def error_file(self) -> str:
            raise AssertionError("Ray must be initialized to get the session dir.")

    assert _error_line(NoRay()) == "ValueError: boom"
    assert _error_line(SimpleNamespace(error_file=None)) == "" == _error_line(SimpleNamespace())
    assert _error_line(SimpleNamespace(error_file=str(tmp_path / "gone.txt"))) == ""
    trial = SimpleNamespace(trial_id="a1", status="ERROR", config={"_number": 3, "x": 0.5}, error_file=str(f),
                            last_result={"status": "partial", "val_acc": 0.2, "step": 10, "number": 3})  # fmt: skip
    row = trials_table([trial]).iloc[0]
    assert (row["number"], row["status"], row["ray_status"], row["config/x"]) == (3, "error", "ERROR", 0.5)
    assert row["reason"] == "trial error: ValueError: boom"


def test_failed_trials_are_queued_for_the_experiment_snapshot() -> None:
    """The Ray Tune workaround: after ``_process_trial_failure`` (also when it raises) the trial is marked for
    the next snapshot, once per call however often the patch is applied; Tune's own controller is patched."""
    from slimsearch.search.ray_runner import snapshot_failed_trials

    class Controller:
        def __init__(self) -> None:
            self.marked: list[str] = []

        def _mark_trial_to_checkpoint(self, trial: str) -> None:
            self.marked.append(trial)

        def _process_trial_failure(self, trial: str, exception: object = None) -> str:
            if exception == "boom":
                raise RuntimeError("boom")
            return f"handled {trial}"

    snapshot_failed_trials(Controller)
    snapshot_failed_trials(Controller)
    c = Controller()
    assert c._process_trial_failure("t1", exception=ValueError()) == "handled t1" and c.marked == ["t1"]
    with pytest.raises(RuntimeError):
        c._process_trial_failure("t2", "boom")
    assert c.marked == ["t1", "t2"]
    from ray.tune.execution.tune_controller import TuneController

    snapshot_failed_trials()
    assert TuneController._process_trial_failure._slim_marks


def test_resumable_needs_an_experiment_snapshot(tmp_path: Path) -> None:
    """A driver killed after Tune wrote tuner.pkl but before its first snapshot: start afresh, because
    ``Tuner.restore`` would fail on every later run ("No experiment snapshot file")."""
    from slimsearch.search.ray_runner import _resumable

    assert not _resumable(tmp_path)
    (tmp_path / "tuner.pkl").write_bytes(b"x")
    assert not _resumable(tmp_path)
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert _resumable(tmp_path)


# ----------------------------------------------------------------------------- the torture


def _finished_trials(exp_dir: Path) -> dict[str, str] | None:
    """trial id -> its recorded outcome (our columns and parameters, as JSON) of every finished trial in the
    experiment's newest snapshot; None while there is no snapshot. Retries a snapshot caught mid-copy."""
    from slimsearch.search.ray_runner import _load_trials, trials_table

    if not any(exp_dir.glob("experiment_state-*.json")):
        return None
    for attempt in range(20):
        try:
            df = trials_table(_load_trials(exp_dir))
            break
        except Exception:
            if attempt == 19:
                raise
            time.sleep(0.25)
    keep = ["number", "ray_status", "status", "val_acc", "macs", "params", "policy_hash", "policy", "reason"]
    keep += [c for c in df.columns if c.startswith("config/")]
    out = {}
    for _, row in df[df["ray_status"].isin(["TERMINATED", "ERROR"])].iterrows():
        vals = {k: (None if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in keep}
        out[str(row["trial_id"])] = json.dumps(vals, sort_keys=True, default=str)
    return out


def median_trial_s(exp_dir: Path, default: float = 2.0) -> float:
    """Median run time (Tune's ``time_total_s``) of the finished trials in the newest snapshot; ``default``
    before there is one."""
    from slimsearch.search.ray_runner import _load_trials, trials_table

    if not any(exp_dir.glob("experiment_state-*.json")):
        return default
    try:
        df = trials_table(_load_trials(exp_dir))
    except Exception:  # a snapshot caught mid-copy: the next kill measures again
        return default
    done = df[df["ray_status"] == "TERMINATED"].get("time_total_s")
    return float(done.median()) if done is not None and done.notna().any() else default


def steps_for(seconds: float, batch_size: int = 64) -> int:
    """Fine-tune steps that take about ``seconds`` on this machine (one thread, as a trial worker runs), a
    multiple of 3 (three ASHA rungs), at least 60. Fixed step counts made the study outrun the kills on a fast
    machine: it finished while the test still waited for Tune's first snapshot to kill the driver."""
    from slimsearch.core.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(batch_size, 1, 8, 8), torch.randint(0, 10, (batch_size,))
        for i in range(25):
            if i == 5:  # after warm-up
                t = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        step_s = (time.perf_counter() - t) / 20
    finally:
        torch.set_num_threads(threads)
    return max(60, 3 * round(seconds / step_s / 3))


def kill_plan(seed: int) -> list[tuple[str, float, float]]:
    """(what, delay as a fraction of a trial's measured run time, which victim in [0, 1)) for each kill,
    drawn up front so that the schedule does not depend on how many workers happen to be alive, and scaled
    by the trials' run time so that every kill lands before the study ends however fast this machine is.
    The driver dies twice: once right after Tune wrote tuner.pkl (before its first snapshot) and once mid-run,
    after a trial finished. Workers die while they run a trial: building their study context or evaluating."""
    rng = random.Random(seed)
    plan = [("worker", rng.uniform(0.1, 0.9), rng.random()) for _ in range(KILLS - 2)]
    plan.insert(rng.randint(2, len(plan) - 2), ("driver", rng.uniform(0.1, 1.0), 0.0))
    return [("driver-early", 0.0, 0.0), *plan]


@pytest.mark.slow
def test_random_sigkills_of_ray_workers_and_driver(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimsearch.search.backend import RayBackend
    from slimsearch.search.ray_runner import COUNTED, ray_experiment_dir, ray_trials
    from slimsearch.search.report import study_status, trials_frame

    monkeypatch.chdir(tmp_path)
    ckpt = make_baseline(tmp_path_factory)
    steps = steps_for(TRIAL_S)
    path = write_study(
        tmp_path, ckpt, name="rtorture", n_trials=N_TRIALS, study='backend = "ray"\nseed = 0\nmax_retry = 2',
        seeds='strategies = ["uniform"]\nuniform_rates = [0.3, 0.5]',
        evaluator=f'kind = "finetune"\nsteps = {steps}\neval_every = {steps // 3}\nlr = 0.02\nworkers = 2',
    )  # fmt: skip
    cfg = load_study(path)
    exp = ray_experiment_dir(cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "slimsearch", "run", str(path)]  # with progress: one line per trial event
    log_path = tmp_path / "driver.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    sessions: list[int] = []  # every driver's pid = its session id
    seen: dict[str, str] = {}  # every trial ever seen finished -> its outcome
    kills: list[str] = []
    finished_before_driver_kill = 0

    def start() -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(p.pid)
        return p

    def actors(p: subprocess.Popen, running: bool = False) -> list[int]:
        title = f"{TRIAL_ACTOR}.train" if running else TRIAL_ACTOR
        return sorted(pid for pid, c in session_processes(p.pid).items() if c.startswith(title))

    def wait_for(cond, timeout: float, every: float = 0.1) -> bool:  # noqa: ANN001
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return True
            time.sleep(every)
        return False

    def record() -> int:
        now = _finished_trials(exp) or {}
        for tid, v in seen.items():  # a finished trial never changes or disappears
            assert now.get(tid) == v, f"trial {tid} changed after kills {kills}: {v} -> {now.get(tid)}"
        seen.update(now)
        return len(now)

    t0 = time.time()
    driver = start()
    try:
        for what, delay, which in kill_plan(20240611):
            if what == "driver-early":  # between tuner.pkl and the first snapshot, if the timing allows
                wait_for(lambda d=driver: (exp / "tuner.pkl").is_file() or d.poll() is not None, 300)
            else:
                wait_for(lambda d=driver: actors(d, running=True) or d.poll() is not None, 300)
                if what == "driver":  # some finished trials first, so that a restore has something to keep
                    wait_for(lambda d=driver: record() >= 1 or d.poll() is not None, 120, every=1.0)
                time.sleep(delay * median_trial_s(exp))
            if driver.poll() is not None:
                break  # the study finished before all kills happened (asserted below)
            if what == "worker":
                live = actors(driver, running=True)
                if not live:  # between trials right now: try again in a moment
                    wait_for(lambda d=driver: actors(d, running=True) or d.poll() is not None, 60)
                    live = actors(driver, running=True)
                if not live:
                    break
                victim = live[int(which * len(live))]
                os.kill(victim, signal.SIGKILL)
                kills.append(f"worker {victim} at {time.time() - t0:.0f}s")
                record()
            else:
                os.kill(driver.pid, signal.SIGKILL)
                driver.wait()
                kills.append(f"{what} {driver.pid} at {time.time() - t0:.0f}s")
                # Ray's processes share the driver's fate: its trial workers stop within seconds.
                assert wait_for(lambda d=driver: not actors(d), 30), (
                    f"trial workers outlive the driver: {actors(driver)}"
                )
                finished_before_driver_kill = max(finished_before_driver_kill, record())
                driver = start()
        rc = driver.wait(timeout=600)
        text = log_path.read_text()
        assert rc == 0, f"{kills}\n{text[-4000:]}"
        record()
        wall = time.time() - t0
        # A driver that ends normally leaves nothing running in its session.
        assert wait_for(lambda: not session_processes(driver.pid), 30), session_processes(driver.pid)
    finally:
        for s in sessions:  # a killed driver leaves Ray's dashboard / runtime-env agents behind for a while
            kill_session(s)
        log.close()

    print(f"kills: {kills}; run {wall:.0f}s, {steps} steps a trial")
    assert len(kills) == KILLS, f"the study finished after only {kills}"
    assert f"done: {N_TRIALS}/{N_TRIALS} trials" in text, text[-2000:]
    assert "resuming Ray experiment" in text  # the mid-run driver kill: the experiment was restored
    assert finished_before_driver_kill >= 1  # ... with finished trials to keep (checked unchanged by record)
    assert "retrying it (1 of 2)" in text, text[-4000:]  # a killed worker's trial was retried

    df = ray_trials(cfg)
    print(df[["number", "trial_id", "ray_status", "status", "val_acc"]].to_string())
    assert set(df["ray_status"]) <= {"TERMINATED", "ERROR"}  # nothing RUNNING / PENDING
    assert df["status"].isin(COUNTED).sum() == N_TRIALS  # exactly n_trials evaluated
    errored = df[df["ray_status"] == "ERROR"]
    assert (errored["status"] == "error").all() and len(df) == N_TRIALS + len(errored)  # each replaced once
    assert sorted(df["number"]) == list(range(len(df)))  # Optuna numbers: no gaps, no duplicates
    assert set(seen) == set(df["trial_id"])
    st = study_status(cfg)
    assert st.counted == N_TRIALS and not {"running", "pending"} & set(st.by_state), st
    assert not trials_frame(RayBackend(cfg).records())["state"].isin(["RUNNING", "WAITING"]).any()

    # Export the best trial; the TorchScript file loads and runs with plain torch in a fresh process.
    out = tmp_path / "export"
    res = subprocess.run([*cmd[:3], "export", str(path), "--trial", "best", "--format", "torchscript",
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert plain_torch_output_shape(out / "model.torchscript.pt") == "(2, 10)"
    assert int(json.loads((out / "metrics.json").read_text())["trial"]) == int(st.best["trial"])
    assert not any(session_processes(s) for s in sessions)
