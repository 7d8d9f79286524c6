"""Reliability: numerical faults become FAILed trials (the study goes on), no layer loses every filter,
checkpoints and study files never run code, passwords never reach a log line, and PostgreSQL workers
share one study without duplicates or overshoot.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import trials_of, write_study
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.runner import is_counted, load_optuna_study, open_storage, run_study, tally
from slimsearch.search.study import load_study, mask_url

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("tmp_cwd")  # conftest: the test's temp folder, one torch thread


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base.update({"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "slimsearch", *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """``slimsearch ARGS`` in this process (the subprocess form is tests/test_bad_input.py's)."""
    from slimsearch.search.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["slimsearch", *args], code, out, err)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("slimsearch: error: "), res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- numerical faults


def test_nan_loss_in_every_trial_fails_them_and_the_study_still_reaches_n_trials(
    tmp_path: Path, baseline_ckpt: Path
) -> None:
    # A real study file: a fine-tune at lr 1e30 blows the loss up to inf/NaN within a few steps.
    path = write_study(tmp_path, baseline_ckpt, n_trials=3, constraint="",
                       evaluator='kind = "finetune"\nsteps = 4\nlr = 1e30')  # fmt: skip
    cfg = load_study(path)
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert summary.done and summary.counted == 3 and len(trials) == 3
    for t in trials:
        assert t.state == TrialState.FAIL and t.user_attrs["status"] == "fail" and is_counted(t)
        assert re.search(r"loss is (nan|inf|-inf)", t.user_attrs["reason"]), t.user_attrs["reason"]
        assert "policy" in t.user_attrs and t.user_attrs["macs"] > 0  # what was tried is still on record


def test_nan_loss_fails_one_trial_and_the_next_ones_complete(
    tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimsearch.evaluators.evaluate as ev

    real = ev.evaluate
    calls: list[str] = []

    def evaluate(ctx, cfg, policy, **kw):  # noqa: ANN001, ANN003, ANN202
        if len(calls) == 1:  # the second trial only: fine-tune with an absurd learning rate
            cfg = dataclasses.replace(cfg, kind="finetune", steps=4, lr=1e30)
        calls.append(cfg.kind)
        return real(ctx, cfg, policy, **kw)

    monkeypatch.setattr(ev, "evaluate", evaluate)
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=4, constraint=""))
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = sorted(trials_of(cfg), key=lambda t: t.number)
    assert calls == ["proxy", "finetune", "proxy", "proxy"]
    assert summary.done and summary.counted == 4
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "loss is" in trials[1].user_attrs["reason"] and "lower the learning rate" in trials[1].user_attrs["reason"]
    assert all(0.0 < t.values[0] <= 1.0 for t in trials if t.state == TrialState.COMPLETE)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 2048),
    rate=st.floats(-2.0, 3.0, allow_nan=False),
    clusters=st.none() | st.integers(-5, 5000),
    keep=st.none() | st.lists(st.integers(0, 4000), max_size=50),
)
def test_keep_count_is_always_between_1_and_n(n: int, rate: float, clusters: int | None, keep: list | None) -> None:
    # Even for values check() rejects: a layer can never be asked to lose every filter (or keep extra ones).
    lp = LayerPolicy(prune_rate=rate, clusters=clusters, keep=tuple(keep) if keep is not None else None)
    assert 1 <= lp.keep_count(n) <= n


def test_policies_removing_every_filter_are_rejected() -> None:
    from slimsearch.core.apply import apply_policy

    model = build_model("smallcnn", 10, 1).eval()
    bad = {
        '{"criterion": "mask", "keep": []}': "at least one",
        '{"prune_rate": 1.0}': "prune_rate must be in [0, 1)",
        '{"clusters": 0, "criterion": "hpc"}': "clusters must be a positive integer",
        '{"prune_rate": -0.5}': "prune_rate must be in [0, 1)",
    }
    for layer, needle in bad.items():
        pol = Policy.from_json('{"layers": {"features.3": ' + layer + "}}")
        with pytest.raises(SlimError, match=re.escape(needle)):
            pol.validate(model)
        with pytest.raises(SlimError, match=re.escape(needle)):
            apply_policy(model, pol, input_shape=(1, 1, 8, 8))
    # The largest rate the space allows keeps at least one filter, and the model still runs.
    out = apply_policy(model, Policy({"features.3": LayerPolicy(prune_rate=0.999)}), input_shape=(1, 1, 8, 8))
    assert out.features[3].out_channels == 1 and out(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_decomposition_that_does_not_converge_fails_the_trial(
    tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimsearch.core.decompose as dec
    import tensorly as tl

    monkeypatch.setenv("SLIMSEARCH_CACHE", str(tmp_path / "fresh-cache"))  # no cached factors to fall back on
    calls: list[int] = []

    def diverging_parafac(tensor, rank, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(rank)
        factors = [np.full((n, rank), np.nan) for n in np.shape(tensor)]
        return tl.cp_tensor.CPTensor((np.ones(rank), factors)), [float("nan")]

    monkeypatch.setattr(dec, "parafac", diverging_parafac)
    path = write_study(tmp_path, baseline_ckpt, n_trials=3, constraint="",
                       space='decomposition = ["cp"]\nrank_ratio = [0.3, 0.6]')  # fmt: skip
    cfg = load_study(path)
    summary = run_study(cfg, progress=False, log=lambda s: None)
    trials = trials_of(cfg)
    assert calls, "parafac was never called"
    assert summary.done and summary.counted == 3 and len(trials) == 3
    for t in trials:
        assert t.state == TrialState.FAIL and t.user_attrs["status"] == "fail"
        reason = t.user_attrs["reason"]
        assert "decomposition" in reason and "did not converge" in reason, reason


# ----------------------------------------------------------------------------- safe loading


class _RunsCode:
    """Unpickling this runs ``exec`` on a snippet that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    sd = build_model("smallcnn", 10, 1).state_dict()
    torch.save({"state_dict": sd, "extra": _RunsCode(marker)}, evil)
    # Control: an unsafe load of this file does run the code.
    res = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and marker.exists(), res.stderr
    marker.unlink()

    path = write_study(tmp_path, baseline_ckpt)
    path.write_text(path.read_text().replace(str(baseline_ckpt), str(evil)))
    err = assert_one_line_error(main(capsys, "run", str(path), "--no-progress"), "[model] checkpoint", "evil.pt")
    assert "safe" in err
    assert_one_line_error(main(capsys, "cost", "smallcnn", "--checkpoint", str(evil)), "evil.pt", "safe")
    # and through a subprocess, as a user runs it
    assert_one_line_error(cli("cost", "smallcnn", "--checkpoint", str(evil), cwd=tmp_path), "evil.pt", "safe")
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


MARKER_MODULE = """\
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text(__name__)


def make(num_classes=10, in_channels=1):
    from slimsearch.core.models import build_model

    return build_model("smallcnn", num_classes, in_channels)
"""


def test_only_an_explicit_factory_is_ever_imported(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "slim_marker.py").write_text(MARKER_MODULE)
    marker = mod_dir / "IMPORTED"
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.delitem(sys.modules, "slim_marker", raising=False)

    # Module-path-looking strings in every other place a string goes: valid ones run, invalid ones are rejected.
    path = write_study(tmp_path, baseline_ckpt, name="slim_marker", n_trials=1, study='workdir = "slim_marker.make"')
    text = path.read_text() + '\n[export]\nout = "slim_marker:make"\n'
    path.write_text(text)
    res = main(capsys, "run", str(path), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    res = main(capsys, "status", str(path))
    assert res.returncode == 0 and "trials 1/1 done" in res.stdout, res.stdout + res.stderr
    rejected = [
        ('dataset = "digits"', 'dataset = "slim_marker:load"', "[data] dataset"),
        (
            '[study]\nname = "slim_marker"',
            '[study]\nname = "slim_marker"\nsampler = "slim_marker:Sampler"',
            "[study] sampler",
        ),
        ('kind = "proxy"', 'kind = "slim_marker:Evaluator"', "[evaluator] kind"),
        ("rate_step = 0.05", 'rate_step = 0.05\ncriteria = ["slim_marker:crit"]', "[space] criteria"),
        ("[seeds]", '[seeds]\nstrategies = ["slim_marker:make"]', "[seeds] strategies"),
        ('out = "slim_marker:make"', 'formats = ["slim_marker:export"]', "[export] formats"),
    ]
    for old, new, needle in rejected:
        assert old in text, old
        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace(old, new, 1))
        assert_one_line_error(main(capsys, "run", str(bad), "--no-progress"), needle)
    assert not marker.exists() and "slim_marker" not in sys.modules, (
        "a study string other than the factory was imported"
    )

    # Control: the explicit factory is imported (so the marker would have shown any other import).
    res = main(capsys, "cost", "slim_marker:make", "--input-shape", "1,8,8")
    assert res.returncode == 0, res.stderr
    assert marker.read_text() == "slim_marker" and "slim_marker" in sys.modules


SECRETS = ("S3cretPW", "p%40ss%2Fw0rd", "p@ss/w0rd")


@pytest.mark.parametrize(
    "url", ["postgresql://slim:S3cretPW@127.0.0.1:1/db", "postgresql+psycopg2://slim:p%40ss%2Fw0rd@127.0.0.1:1/db"]
)
def test_passwords_never_appear_in_output(
    url: str, tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, baseline_ckpt, study=f'storage = "{url}"')
    for cmd in (["run", "--no-progress"], ["status"], ["report"], ["export"], ["worker"]):
        res = main(capsys, cmd[0], str(path), *cmd[1:])
        err = assert_one_line_error(res, "***")
        assert not any(s in res.stdout + res.stderr for s in SECRETS), err
    # The same study on SQLite: every command succeeds, and the URL is shown as it is (nothing to mask).
    path.write_text(path.read_text().replace(f'storage = "{url}"', "").replace("n_trials = 4", "n_trials = 1"))
    for cmd in (["run", "--no-progress"], ["status"], ["report", "--out", "rep"]):
        res = main(capsys, cmd[0], str(path), *cmd[1:])
        assert res.returncode == 0, res.stderr
        assert "***" not in res.stdout + res.stderr
    assert "sqlite:///" in (tmp_path / "rep" / "study.json").read_text()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://bob:S3cretPW@db:5432/x", "S3cretPW"),
        ("postgresql://bob:p@ss/w:rd@db/x", "ss/w:rd"),  # raw '@', '/', ':' inside the password
        ("mysql+pymysql://root:a:b:c@h/x?charset=utf8", "a:b:c"),
        ("error at 'postgresql://u:Zz9@h/db': refused; see postgresql://v:Yy8@h2/db2", "Zz9"),
    ],
)
def test_mask_url_hides_the_whole_password(url: str, secret: str) -> None:
    masked = mask_url(url)
    assert secret not in masked and "***@" in masked
    assert "Yy8" not in masked


@pytest.mark.slow
def test_live_postgresql_logs_and_reports_are_masked(tmp_path: Path, baseline_ckpt: Path) -> None:
    base = pg_url_or_skip()
    from sqlalchemy.engine import make_url

    u = make_url(base)
    if u.password:
        pytest.skip("the server URL already has a password; this test adds a fake one a trust login ignores")
    url = u.set(password="S3cretPW").render_as_string(hide_password=False)
    if not _connects(url):
        pytest.skip("the PostgreSQL server checks passwords; a fake one cannot be used here")
    name = f"mask_{uuid.uuid4().hex[:8]}"
    path = write_study(tmp_path, baseline_ckpt, name=name, n_trials=1, study=f'storage = "{url}"')
    try:
        for cmd in (["run", "--no-progress"], ["status"], ["report", "--out", "rep"]):
            res = cli(cmd[0], str(path), *cmd[1:], cwd=tmp_path)
            assert res.returncode == 0, res.stderr
            assert "S3cretPW" not in res.stdout + res.stderr
            # The URL is shown masked, or (the dashboard hint) without its password and how to supply it.
            assert (
                "slim:***@" in res.stdout or "PGPASSWORD=<password> optuna-dashboard postgresql://slim@" in res.stdout
            )
        for f in (tmp_path / "rep").iterdir():
            assert b"S3cretPW" not in f.read_bytes(), f
    finally:
        _drop_study(url, name)


# ----------------------------------------------------------------------------- PostgreSQL concurrency


def pg_url_or_skip() -> str:
    url = os.environ.get("SLIMSEARCH_PG_URL")
    if not url:
        pytest.skip("set SLIMSEARCH_PG_URL (e.g. postgresql://slim@127.0.0.1:54329/slimsearch) to run PostgreSQL tests")
    return url


def _connects(url: str) -> bool:
    import sqlalchemy as sa
    from slimsearch.search.runner import engine_url

    try:
        eng = sa.create_engine(engine_url(url), connect_args={"connect_timeout": 5})
        with eng.connect():
            return True
    except Exception:
        return False


def _drop_study(url: str, name: str) -> None:
    from slimsearch.search.runner import engine_url

    try:
        optuna.delete_study(study_name=name, storage=engine_url(url))
    except Exception:  # noqa: S110 - best-effort cleanup of a shared database
        pass


@pytest.mark.slow
def test_four_workers_on_postgresql_reach_exactly_n_trials(tmp_path: Path, baseline_ckpt: Path) -> None:
    url = pg_url_or_skip()
    name = f"pgconc_{uuid.uuid4().hex[:8]}"
    path = write_study(tmp_path, baseline_ckpt, name=name, n_trials=40, constraint="max_macs_ratio = 0.6",
                       study=f'storage = "{url}"\nsampler = "random"')  # fmt: skip
    cfg = load_study(path)
    # The driver prepares the study (baseline info, seeds, slots) with a small target; then the target is
    # raised in the storage, as `run --n-trials 40` elsewhere would, so the four workers must top the
    # queue up concurrently: the racy part (claims alone are already row-locked by Optuna).
    run_study(cfg.with_n_trials(2), progress=False, log=lambda s: None)
    study = load_optuna_study(cfg, open_storage(cfg))
    study.set_user_attr("n_trials", 40)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen([sys.executable, "-m", "slimsearch", "worker", str(path), "--threads", "1"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(4)
        ]  # fmt: skip
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(outs)
        trials = study.get_trials()
        numbers = [t.number for t in trials]
        counted = [t for t in trials if is_counted(t)]
        assert len(counted) == 40, tally(trials)
        assert len(numbers) == len(set(numbers))
        tl = tally(trials)
        assert tl.running == 0 and tl.waiting == 0 and len(trials) == 40, tl  # no overshoot, no stray slots
        for t in counted:
            assert t.state == TrialState.COMPLETE
            assert Policy.from_json(t.user_attrs["policy"]).hash == t.user_attrs["policy_hash"]
            assert t.user_attrs["macs"] > 0 and "metrics" in t.user_attrs
            assert t.user_attrs["status"] == "infeasible" or 0 < t.user_attrs["val_acc"] <= 1
        ran = [int(m) for o in outs for m in re.findall(r"worker done: (\d+) trials evaluated", o)]
        assert sum(ran) == 38 and sum(r > 0 for r in ran) >= 2, outs
    finally:
        _drop_study(url, name)


RACE = """\
import sys, time
import optuna
from types import SimpleNamespace
from optuna.trial import TrialState
from slimsearch.search.runner import claim, engine_url, storage_lock, tally, top_up

url, name, start = engine_url(sys.argv[1]), sys.argv[2], float(sys.argv[3])
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name=name, storage=url)
cfg = SimpleNamespace(name=name, study=SimpleNamespace(storage=url))
mine = []
while time.time() < start:  # every process starts topping up and claiming at the same instant
    time.sleep(0.001)
while True:  # trial_loop's claim step, with the evaluation replaced by an instant result
    with storage_lock(cfg):
        busy = tally(study.get_trials(deepcopy=False))
        if busy.counted + busy.running >= 40:
            break
        tid = claim(study)
        if tid is None and top_up(study, 40):
            tid = claim(study)
    if tid is not None:
        study._storage.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])
        mine.append(tid)
print(len(mine))
"""


@pytest.mark.slow
def test_concurrent_top_up_and_claim_on_postgresql_never_overshoot(tmp_path: Path) -> None:
    from slimsearch.search.runner import engine_url

    url = pg_url_or_skip()
    name = f"pgrace_{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=engine_url(url))
    try:
        start = str(time.time() + 6)  # after every interpreter has started
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [subprocess.Popen([sys.executable, "-c", RACE, url, name, start], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        trials = optuna.load_study(study_name=name, storage=engine_url(url)).get_trials()
        assert len(trials) == 40 and all(t.state == TrialState.COMPLETE for t in trials)
        assert sorted(t.number for t in trials) == list(range(40))
        assert sum(int(o.strip()) for o, _ in outs) == 40
    finally:
        _drop_study(url, name)


OPENER = """\
import os, sys, time
from types import SimpleNamespace
from slimsearch.search.runner import open_storage

role, db, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
study = SimpleNamespace(name="init", storage=f"sqlite:///{db}", heartbeat_interval=10, grace_period=None, max_retry=2)
while time.time() < start:
    time.sleep(0.0005)
while role == "reader" and not os.path.exists(db):  # open the moment the creator has made the file
    time.sleep(0.0002)
open_storage(SimpleNamespace(study=study, path="x.toml"), create=role == "creator")
print("ok")
"""


@pytest.mark.slow
def test_opening_a_database_while_it_is_being_created(tmp_path: Path) -> None:
    # Several `slimsearch run` creating the file, or `status` reading while `run` creates it, raced in Optuna's
    # schema set-up ("table already exists", UNIQUE alembic_version) and failed; found by tests/test_torture.py.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in range(3):
        db, start = tmp_path / f"s{k}.db", str(time.time() + 4)
        roles = ["creator"] * 3 + ["reader"] * 3  # plain Optuna fails here in most rounds
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, r, str(db), start], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in roles]  # fmt: skip
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 and o.strip().endswith("ok") for p, o in zip(procs, outs, strict=True)), outs
