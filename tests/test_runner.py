"""The Optuna runner on a real tiny study: smallcnn on digits, proxy evaluator, SQLite storage.

Counts, seeds, infeasible and failed trials, resume, crash recovery (stale heartbeats, dead
processes, SIGKILL) and several worker processes reaching exactly n_trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import trials_of, write_study
from optuna.trial import TrialState
from slimsearch.core.apply import apply_policy
from slimsearch.core.budget import policy_macs
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.context import build_study_context
from slimsearch.search.optuna_study import is_counted, load_optuna_study, make_sampler, record_from_trial, tally
from slimsearch.search.records import ranked
from slimsearch.search.runner import run_study
from slimsearch.search.slots import WORKER_ATTR, claim, reap_dead
from slimsearch.search.storage import open_storage
from slimsearch.search.study import load_study
from torch import nn

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("tmp_cwd")


def test_tiny_study_runs_exactly_n_trials_with_seeds_first(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=5,
                                 seeds='strategies = ["uniform"]\nuniform_rates = [0.3, 0.5]'))  # fmt: skip
    summary = run_study(cfg, progress=False, log=lambda s: None)
    assert summary.done and summary.counted == 5 and summary.n_trials == 5
    trials = trials_of(cfg)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # the seeds are the first two trials, with every searched rate at the seed's value
    assert [t.user_attrs.get("seed") for t in trials[:2]] == ["uniform#0", "uniform#1"]
    assert set(trials[0].params.values()) == {0.3} and set(trials[1].params.values()) == {0.5}
    assert "seed" not in trials[2].user_attrs and len(trials[2].params) == 4
    base = json.loads(json.dumps(load_optuna_study(cfg, open_storage(cfg)).user_attrs["slimsearch"]))["base"]
    assert base["macs"] == 1_493_632 and base["params"] == 65_834 and 0.5 < base["val_acc"] <= 1.0
    for t in trials:
        ua = t.user_attrs
        pol = Policy.from_json(ua["policy"])
        assert len(pol) == 4 and ua["policy_hash"] == pol.hash
        assert ua["status"] in ("ok", "infeasible")
        assert 0 < ua["macs"] <= base["macs"] and ua["metrics"]["macs"] == ua["macs"]
        assert ua["constraint"] == [pytest.approx(ua["macs"] - 0.7 * base["macs"])]
        if ua["status"] == "ok":
            assert 0.0 <= ua["val_acc"] <= 1.0 and t.value == ua["val_acc"]
            assert ua["macs"] <= 0.7 * base["macs"]
    # a uniform 50 % rate removes half the filters of every layer: MACs ~ 1/4 (first layer 1/2)
    assert trials[1].user_attrs["macs_ratio"] < 0.3


def test_infeasible_trial_recorded_without_training(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2, constraint='max_macs_ratio = 0.3\nfit = "none"',
                                 seeds='strategies = ["uniform"]\nuniform_rates = [0.0, 0.6]'))  # fmt: skip
    run_study(cfg, progress=False, log=lambda s: None)
    t0, t1 = trials_of(cfg)
    assert t0.state == TrialState.COMPLETE and t0.value == 0.0
    assert t0.user_attrs["status"] == "infeasible" and "exceed the bound" in t0.user_attrs["reason"]
    assert t0.user_attrs["macs"] == 1_493_632 and "val_acc" not in t0.user_attrs
    assert t0.user_attrs["constraint"][0] == pytest.approx(1_493_632 * 0.7)
    assert t0.user_attrs["metrics"]["train_s"] == 0.0
    assert t0.constraints and max(t0.constraints.values()) > 0  # what Optuna's samplers read
    assert t1.user_attrs["status"] == "ok" and t1.value > 0 and max(t1.constraints.values()) <= 0
    # optuna-dashboard: feasibility from the "constraints" system attr, the objective by its metric name
    assert t0.system_attrs["constraints"] == t0.user_attrs["constraint"] and t1.system_attrs["constraints"][0] <= 0
    assert load_optuna_study(cfg, open_storage(cfg, create=False)).metric_names == ["val_acc"]


def test_fit_scales_an_over_budget_policy_onto_the_bound(tmp_path: Path, baseline_ckpt: Path) -> None:
    # fit = "scale" (the default): the unpruned seed is pruned harder, every layer by one factor, until it fits;
    # the trial records and scores that fitted policy, and export rebuilds exactly it.
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2, constraint="max_macs_ratio = 0.3",
                                 seeds='strategies = ["uniform"]\nuniform_rates = [0.0, 0.6]'))  # fmt: skip
    assert cfg.constraint.fit == "scale"
    run_study(cfg, progress=False, log=lambda s: None)
    t0, t1 = trials_of(cfg)
    base = 1_493_632
    assert t0.user_attrs["status"] == "ok" and 0.25 * base < t0.user_attrs["macs"] <= 0.3 * base
    assert max(t0.constraints.values()) <= 0 and t0.value > 0 and t0.user_attrs["metrics"]["fit_s"] > 0
    pol = Policy.from_json(t0.user_attrs["policy"])
    rates = {lp.prune_rate for lp in pol.layers.values()}
    assert min(rates) > 0.3 and max(rates) <= 0.7  # every layer pruned, none past the space's largest rate
    sctx = build_study_context(cfg)
    assert (
        count_cost(apply_policy(sctx.model, pol, input_shape=sctx.input_shape), sctx.input_shape).macs
        == (t0.user_attrs["macs"])
    )
    assert sctx.fit(pol) == pol  # a fitted policy is its own fit: retries evaluate the same thing
    assert {lp.prune_rate for lp in Policy.from_json(t1.user_attrs["policy"]).layers.values()} == {0.6}  # untouched


def test_fill_prunes_an_under_budget_policy_less(tmp_path: Path, baseline_ckpt: Path) -> None:
    # fit = "fill": the 0.6 seed, well under the bound, gives filters back until it is within 2 % of it
    # (as close as smallcnn's channel grid allows); the over-budget seed is still scaled down.
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2,
                                 constraint='max_macs_ratio = 0.3\nfit = "fill"',
                                 seeds='strategies = ["uniform"]\nuniform_rates = [0.0, 0.6]'))  # fmt: skip
    run_study(cfg, progress=False, log=lambda s: None)
    t0, t1 = trials_of(cfg)
    bound = 0.3 * 1_493_632
    assert 0.9 * bound < t0.user_attrs["macs"] <= bound
    sctx = build_study_context(cfg)
    seed = sctx.space.uniform_policy(0.6)
    assert policy_macs(sctx.model, seed, sctx.input_shape) < 0.8 * bound
    assert 0.9 * bound < t1.user_attrs["macs"] <= bound and t1.user_attrs["status"] == "ok"
    rates = [lp.prune_rate for lp in Policy.from_json(t1.user_attrs["policy"]).layers.values()]
    assert max(rates) < 0.6 and min(rates) >= 0.0
    assert sctx.fit(Policy.from_json(t1.user_attrs["policy"])) == Policy.from_json(t1.user_attrs["policy"])


def test_fit_tolerance_lands_every_trial_within_it_and_needs_a_fit(tmp_path: Path, baseline_ckpt: Path) -> None:
    # [constraint] fit_tolerance = 0.01: after the one-factor fill, filters come back one at a time until the
    # trial is within 1 % under the bound (equal-MACs comparisons); the same seeds without it stop further under.
    seeds = 'strategies = ["uniform"]\nuniform_rates = [0.0, 0.6]'
    loose = load_study(write_study(tmp_path, baseline_ckpt, name="loose", n_trials=2, seeds=seeds,
                                   constraint='max_macs_ratio = 0.3\nfit = "fill"'))  # fmt: skip
    exact = load_study(write_study(tmp_path, baseline_ckpt, name="exact", n_trials=2, seeds=seeds,
                                   constraint='max_macs_ratio = 0.3\nfit = "fill"\nfit_tolerance = 0.01'))  # fmt: skip
    assert exact.constraint.fit_tolerance == 0.01 and loose.constraint.fit_tolerance is None
    bound = 0.3 * 1_493_632
    lctx = build_study_context(loose)
    before = [lctx.fit(lctx.space.uniform_policy(r)) for r in (0.0, 0.6)]
    sctx = build_study_context(exact)
    macs = [policy_macs(sctx.model, sctx.fit(sctx.space.uniform_policy(r)), sctx.input_shape) for r in (0.0, 0.6)]
    assert all(0.99 * bound <= m <= bound for m in macs)
    assert min(policy_macs(lctx.model, p, lctx.input_shape) for p in before) < 0.99 * bound
    run_study(exact, progress=False, log=lambda s: None)
    assert all(0.99 * bound <= t.user_attrs["macs"] <= bound for t in trials_of(exact))
    with pytest.raises(SlimError, match=r"\[constraint\] fit_tolerance: needs fit"):
        load_study(write_study(tmp_path, baseline_ckpt, name="none", constraint='max_macs_ratio = 0.3\nfit = "none"\n'
                               "fit_tolerance = 0.01"))  # fmt: skip


def test_the_fit_never_prunes_a_layer_listed_only_for_its_decomposition(tmp_path: Path) -> None:
    # coupled = false: the residual streams are outside the prune space, but a Tucker-2 second conv is listed
    # in the policy (rate 0). Scaling an over-bound sample down must prune the first convs only: the stream
    # (stem + every stage's second convs) keeps all its filters.
    import torch
    from slimsearch.core.data import load_synthetic, split_train_val
    from slimsearch.core.models import build_model
    from slimsearch.evaluators.context import build_context
    from slimsearch.search.context import StudyContext
    from slimsearch.search.study import study_from_dict
    from slimsearch.spaces.space import SearchSpace

    model, shape = build_model("resnet20").eval(), (1, 3, 32, 32)
    ckpt = tmp_path / "w.th"
    torch.save(model.state_dict(), ckpt)
    for tol in ([], [("fit_tolerance", 0.01)]):
        cfg = study_from_dict({"study": {"name": "s", "storage": f"sqlite:///{tmp_path}/s.db"},
                               "model": {"factory": "resnet20", "checkpoint": str(ckpt)},
                               "data": {"dataset": "synthetic"},
                               "constraint": {"max_macs_ratio": 0.5, "fit": "fill", **dict(tol)},
                               "space": {"coupled": False, "prune_rate": [0.0, 0.8],
                                         "decomposition": ["none", "tucker"]}}, tmp_path / "s.toml")  # fmt: skip
        splits = split_train_val(load_synthetic(n=40, size=32), 20, seed=0)
        base = count_cost(model, shape).macs
        ectx = build_context(model, splits, shape, max_macs=0.5 * base, score_baseline=False)
        space = SearchSpace.build(model, cfg.space, shape)
        sctx = StudyContext(cfg, model, splits, shape, ectx, space, ckpt, "x")
        stream = [n for n, m in model.named_modules() if n.endswith("conv2")] + ["conv1"]
        sampled = Policy({n: LayerPolicy(prune_rate=0.0) for n in model_first_convs(model)}
                         | {n: LayerPolicy(prune_rate=0.0, decomposition="tucker", rank_ratio=0.9)
                            for n in stream if n != "conv1"})  # fmt: skip
        fitted = sctx.fit(sampled)
        assert policy_macs(model, fitted, shape) <= 0.5 * base
        assert all(fitted[n].prune_rate == 0.0 for n in stream if n in fitted.layers)
        assert all(fitted[n].prune_rate > 0 for n in model_first_convs(model))


def model_first_convs(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith("conv1") and n != "conv1"]


def test_sqlite_storage_uses_write_ahead_log(tmp_path: Path, baseline_ckpt: Path) -> None:
    # Optuna commits every parameter separately: WAL + synchronous=NORMAL halves the storage time per trial.
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=1, constraint=""))
    storage = open_storage(cfg)
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    storage.engine.dispose()
    reader = open_storage(cfg, create=False)  # status/report open the same file the same way
    with reader.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    reader.engine.dispose()


def test_failed_trials_do_not_stop_the_study(tmp_path: Path, baseline_ckpt: Path) -> None:
    # An absurd learning rate makes every fine-tune diverge: each trial FAILs with the reason, the study goes on.
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=3, constraint="",
                                 evaluator='kind = "finetune"\nsteps = 3\nlr = 1e30'))  # fmt: skip
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert summary.done and len(trials) == 3 and summary.best is None
    for t in trials:
        assert t.state == TrialState.FAIL and is_counted(t)
        assert t.user_attrs["status"] == "fail" and "loss" in t.user_attrs["reason"]
        assert "policy" in t.user_attrs and t.user_attrs["macs"] > 0


def test_resume_continues_the_same_study(tmp_path: Path, baseline_ckpt: Path) -> None:
    path = write_study(tmp_path, baseline_ckpt, n_trials=3, seeds='strategies = ["uniform"]\nuniform_rates = [0.4]')
    cfg = load_study(path)
    run_study(cfg, progress=False, log=lambda s: None)
    first = {t.number: (t.params, t.values) for t in trials_of(cfg)}
    assert len(first) == 3
    summary = run_study(cfg.with_n_trials(5), progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert summary.counted == 5 and [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert {n: (t.params, t.values) for n, t in enumerate(trials[:3])} == first
    assert sum("seed" in t.user_attrs for t in trials) == 1  # seeds are not enqueued again
    # running a finished study again does nothing
    again = run_study(cfg.with_n_trials(5), progress=False, log=lambda s: None)
    assert again.counted == 5 and len(trials_of(cfg)) == 5


def test_multi_objective_nsga2(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=3, constraint="",
                                 study='sampler = "nsga2"\nobjectives = ["val_acc:max", "macs:min"]'))  # fmt: skip
    run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert len(trials) == 3
    for t in trials:
        assert t.state == TrialState.COMPLETE and len(t.values) == 2
        assert t.values == [t.user_attrs["val_acc"], t.user_attrs["macs"]]


def test_directions_must_match_an_existing_study(tmp_path: Path, baseline_ckpt: Path) -> None:
    from slimsearch.core.errors import SlimError

    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=1))
    run_study(cfg, progress=False, log=lambda s: None)
    cfg2 = load_study(
        write_study(tmp_path, baseline_ckpt, n_trials=1, study='objectives = ["val_acc:max", "macs:min"]')
    )
    with pytest.raises(SlimError, match="created with directions"):
        run_study(cfg2, progress=False, log=lambda s: None)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "cmaes", "local", "random"])
def test_samplers_are_seeded(sampler: str, tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, study=f'sampler = "{sampler}"'))
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(cfg, seed=7))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        draws.append([t.params["x"] for t in study.trials])
    assert draws[0] == draws[1]


def test_pruned_trial_is_recorded(tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slimsearch.evaluators.evaluate as ev

    real = ev.evaluate

    def pruning(ctx, cfg, policy, *, report=None, **kw):  # noqa: ANN001, ANN202
        res = real(ctx, cfg, policy, **kw)
        res.status, res.reason, res.intermediate = "pruned", "stopped by the pruner at step 5", [(5, 0.1)]
        return res

    monkeypatch.setattr(ev, "evaluate", pruning)
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2))
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert summary.counted == 2 and all(t.state == TrialState.PRUNED and is_counted(t) for t in trials)
    assert trials[0].user_attrs["intermediate"] == [[5, 0.1]]


def test_dead_process_and_stale_heartbeat_trials_are_retried(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=3))
    storage = open_storage(cfg)
    study = load_optuna_study(cfg, storage, create=True)
    study.enqueue_trial({"features.0.rate": 0.25})
    study.enqueue_trial({"features.0.rate": 0.5})
    # trial 0: claimed by a process that has died since
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tid = claim(study)
    study._storage.set_trial_system_attr(tid, WORKER_ATTR, {"host": os.uname().nodename, "pid": dead.pid, "trial": 0})
    assert reap_dead(study, cfg) == 1
    t = study.get_trials()
    assert t[0].state == TrialState.FAIL and not is_counted(t[0]) and "died" in t[0].user_attrs["reason"]
    retry = [x for x in t if x.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == {"features.0.rate": 0.25}
    # trial 1: claimed by this (live) process, but its heartbeat stops: failed after grace_period (2 s)
    tid = claim(study)
    assert tid is not None
    assert reap_dead(study, cfg) == 0
    time.sleep(3.2)
    reap_dead(study, cfg)
    t = study.get_trials()
    assert t[1].state == TrialState.FAIL
    assert any(x.system_attrs.get("failed_trial") == 1 and x.state == TrialState.WAITING for x in t)


def test_claim_is_exclusive(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt))
    study = load_optuna_study(cfg, open_storage(cfg), create=True)
    study.enqueue_trial({})
    study.enqueue_trial({})
    ids = [claim(study), claim(study), claim(study)]
    assert ids[0] != ids[1] and None not in ids[:2] and ids[2] is None
    assert tally(study.get_trials()).running == 2


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "slimsearch", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_worker_processes_reach_exactly_n_trials(tmp_path: Path, baseline_ckpt: Path) -> None:
    # Trials of about a second (a 150-step fine-tune): with instant proxy trials the first worker could finish all
    # eight before the second has imported torch, and "both workers evaluated" would be a race.
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=8, evaluator='kind = "finetune"\nsteps = 150'))
    summary = run_study(cfg, workers=2, progress=False, log=lambda s: None, threads=1)
    trials = trials_of(cfg)
    assert summary.done and summary.counted == 8
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    pids = {t.system_attrs[WORKER_ATTR]["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers evaluated, the driver only watched


@pytest.mark.slow
def test_sigkill_then_rerun_keeps_finished_trials(tmp_path: Path, baseline_ckpt: Path) -> None:
    # Slow trials (a fine-tune of seconds, not the ~0.3 s of 40 steps on a fast machine) so that a trial seen
    # running with its parameters sampled is still running when the kill lands.
    path = write_study(tmp_path, baseline_ckpt, n_trials=6, constraint="",
                       evaluator='kind = "finetune"\nsteps = 300')  # fmt: skip
    cfg = load_study(path)
    proc = _cli("run", str(path), "--no-progress", "--threads", "1", cwd=tmp_path)
    db = tmp_path / "runs" / "tiny.db"
    deadline = time.time() + 240
    done: list = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if db.exists():
            try:
                done = [t for t in trials_of(cfg) if t.state == TrialState.COMPLETE]
            except Exception:  # the study may not exist yet
                continue
            # Kill once a trial has sampled its policy: one killed between claim and sampling has no
            # parameters to retry with (its retry samples afresh), and would not test the retry below.
            running = [t for t in trials_of(cfg) if t.state == TrialState.RUNNING and t.params]
            if len(done) >= 2 and running:
                break
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = {t.number: (t.params, t.values, t.user_attrs["policy_hash"]) for t in trials_of(cfg)
              if t.state == TrialState.COMPLETE}  # fmt: skip
    assert len(before) >= 2
    rerun = _cli("run", str(path), "--no-progress", "--threads", "1", cwd=tmp_path)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out
    trials = trials_of(cfg)
    after = {t.number: (t.params, t.values, t.user_attrs["policy_hash"]) for t in trials
             if t.state == TrialState.COMPLETE}  # fmt: skip
    assert all(after[n] == v for n, v in before.items())
    assert sum(is_counted(t) for t in trials) == 6
    assert tally(trials).running == 0 and tally(trials).waiting == 0
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert any(t.params for t in failed)
    for t in failed:  # a trial killed mid-run is failed (not counted) and retried with the same parameters
        assert not is_counted(t)
        retry = [x for x in trials if x.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert not t.params or retry[0].params == t.params  # no parameters yet: the retry samples afresh


def test_lower_n_trials_leaves_extra_slots_alone(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2))
    study = load_optuna_study(cfg, open_storage(cfg), create=True)
    for _ in range(4):  # slots left by an earlier, larger n_trials
        study.enqueue_trial({})
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert summary.counted == 2 and sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert tally(trials).waiting == 2  # prepare_study's top-up saw 4 waiting >= 2 and added none


def test_ranked_orders_by_val_then_macs_and_collapses_repeated_policies() -> None:
    from optuna.distributions import FloatDistribution

    def trial(n: int, status: str, acc: float, macs: float, policy: str, state: TrialState = TrialState.COMPLETE,
              digest: str = ""):  # fmt: skip
        attrs = {"status": status, "val_acc": acc, "macs": macs, "policy": policy}
        t = optuna.trial.create_trial(state=state, value=acc if state == TrialState.COMPLETE else None,
                                      params={"x": 0.1}, distributions={"x": FloatDistribution(0, 1)},
                                      user_attrs={**attrs, **({"model_digest": digest} if digest else {})})  # fmt: skip
        t.number = n
        return t

    trials = [
        trial(0, "ok", 0.80, 50.0, "a"),
        trial(1, "ok", 0.90, 60.0, "b"),
        trial(2, "ok", 0.90, 40.0, "c"),  # ties with 1 on val: fewer MACs first
        trial(3, "ok", 0.90, 40.0, "c"),  # the same policy again (a cache hit): collapsed into trial 2
        trial(4, "infeasible", 0.99, 90.0, "d"),
        trial(5, "fail", 0.0, 0.0, "e"),
        trial(6, "ok", 0.95, 55.0, "f", TrialState.RUNNING),
    ]
    trials = [record_from_trial(t) for t in trials]
    assert [t.number for t in ranked(trials)] == [2, 1, 0]
    assert [t.number for t in ranked(trials, max_macs=55.0)] == [2, 0]
    assert ranked(trials, max_macs=10.0) == []
    # Distinct policies that built the same network (same digest) are one candidate; no digest: by policy.
    built = [trial(0, "ok", 0.9, 50.0, "a", digest="n1"), trial(1, "ok", 0.9, 50.0, "b", digest="n1"),
             trial(2, "ok", 0.8, 50.0, "c", digest="n2"), trial(3, "ok", 0.7, 50.0, "d")]  # fmt: skip
    assert [t.number for t in ranked([record_from_trial(t) for t in built])] == [0, 2, 3]


def test_global_seed_prunes_layers_unevenly_and_is_enqueued_first(tmp_path: Path, baseline_ckpt: Path) -> None:
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2, constraint="max_macs_ratio = 0.9",
                                 seeds='strategies = ["global"]\nglobal_fractions = [0.4]'))  # fmt: skip
    sctx = build_study_context(cfg)
    from slimsearch.search.seeding import global_seeds

    (seed,) = global_seeds(sctx, {"fractions": [0.4]})
    rates = {n: lp.prune_rate for n, lp in seed.layers.items()}
    assert len(set(rates.values())) > 1  # one global threshold, not one rate
    n_filters = {n: m.out_channels for n, m in sctx.model.named_modules() if n in rates}
    removed = sum(round(rates[n] * n_filters[n]) for n in rates)
    assert abs(removed - 0.4 * sum(n_filters.values())) <= len(rates)
    assert all(lp.criterion == "l2" for lp in seed.layers.values())
    run_study(cfg, progress=False, log=lambda s: None)
    first = trials_of(cfg)[0]
    assert first.user_attrs.get("seed") == "global#0" and first.user_attrs["status"] in ("ok", "infeasible")


def test_tp_global_seed_is_torch_prunings_allocation_at_the_bound(tmp_path: Path, baseline_ckpt: Path) -> None:
    """The ``tp_global`` seed keeps, in every searched layer, the filter count Torch-Pruning's global pruning
    keeps at the ratio bisected onto the MACs bound; our criterion picks the filters."""
    from slimsearch.core.apply import apply_policy
    from slimsearch.core.budget import bisect_budget
    from slimsearch.core.cost import count_cost
    from slimsearch.core.tp_prune import kept_filters, tp_prune
    from slimsearch.search.seeding import tp_global_seeds

    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=2, constraint="max_macs_ratio = 0.6",
                                 seeds='strategies = ["tp_global"]\ntp_global_criterion = "l1"'))  # fmt: skip
    sctx = build_study_context(cfg)
    (seed,) = tp_global_seeds(sctx, {"criterion": "l1"})
    assert seed.layers and all(lp.criterion == "l1" for lp in seed.layers.values())
    ours = apply_policy(sctx.model, seed, input_shape=sctx.input_shape)
    bound = sctx.eval_ctx.max_macs
    assert 0.85 * bound < count_cost(ours, sctx.input_shape).macs <= bound
    # Torch-Pruning's own ratio bisection onto the bound (as the strategy does) gives exactly these counts
    ratio, _ = bisect_budget(lambda x: count_cost(tp_prune(sctx.model, "tp_global", x, sctx.input_shape,
                             max_ratio=0.7), sctx.input_shape).macs, bound, hi=0.7, iters=10)  # fmt: skip
    tp_counts = kept_filters(tp_prune(sctx.model, "tp_global", ratio, sctx.input_shape, max_ratio=0.7))
    assert kept_filters(ours) == tp_counts
    assert len({round(lp.prune_rate, 2) for lp in seed.layers.values()}) > 1  # global: rates differ by layer
    (fixed,) = tp_global_seeds(sctx, {"ratios": [0.3]})  # an explicit ratio: no bisection
    assert kept_filters(apply_policy(sctx.model, fixed, input_shape=sctx.input_shape)) == kept_filters(
        tp_prune(sctx.model, "tp_global", 0.3, sctx.input_shape, max_ratio=0.7)
    )
    run_study(cfg, progress=False, log=lambda s: None)
    first = trials_of(cfg)[0]
    assert first.user_attrs.get("seed") == "tp_global#0" and first.user_attrs["status"] == "ok"
