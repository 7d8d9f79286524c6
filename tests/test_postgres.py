"""Studies on a real PostgreSQL server: run to n_trials, resume larger, `slimsearch worker` processes joining,
and passwords never shown. Needs $SLIMSEARCH_PG_URL (CI: ``.ci/start-postgres`` on loopback); skips without.

Every test uses its own study name and deletes its study afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from helpers import write_study
from optuna.trial import TrialState
from slimsearch.search.cli import main
from slimsearch.search.runner import WORKER_ATTR, engine_url, is_counted, run_study
from slimsearch.search.study import load_study

PG_URL = os.environ.get("SLIMSEARCH_PG_URL", "")
REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(
        not PG_URL, reason="SLIMSEARCH_PG_URL is not set (a PostgreSQL URL; .ci/start-postgres starts a local server)"
    ),
    pytest.mark.usefixtures("tmp_cwd"),
]


@pytest.fixture
def study_name() -> Iterator[str]:
    """A study name no other test (or earlier run) uses; the study is deleted afterwards."""
    name = f"pgtest-{uuid.uuid4().hex[:10]}"
    yield name
    storage = optuna.storages.RDBStorage(engine_url(PG_URL))
    if name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    storage.engine.dispose()


def _pg_study(tmp: Path, ckpt: Path, name: str, *, url: str = PG_URL, **kw) -> Path:  # noqa: ANN003
    return write_study(tmp, ckpt, name=name, study=f'storage = "{url}"\n' + kw.pop("study", ""), **kw)


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(engine_url(url))
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{password}@{host}"


def test_run_to_n_trials_then_resume_larger(tmp_path: Path, baseline_ckpt: Path, study_name: str) -> None:
    cfg = load_study(_pg_study(tmp_path, baseline_ckpt, study_name, n_trials=3,
                               seeds='strategies = ["uniform"]\nuniform_rates = [0.5]'))  # fmt: skip
    s = run_study(cfg, progress=False, log=lambda s: None)
    assert s.done and s.counted == 3
    first = _trials(PG_URL, study_name)
    assert [t.number for t in first] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in first)
    assert first[0].user_attrs["seed"] == "uniform#0" and not (tmp_path / "runs" / f"{study_name}.db").exists()

    s2 = run_study(cfg.with_n_trials(5), progress=False, log=lambda s: None)
    assert s2.done and s2.counted == 5 and s2.n_trials == 5
    after = _trials(PG_URL, study_name)
    assert [t.number for t in after] == [0, 1, 2, 3, 4] and all(is_counted(t) for t in after)
    for a, b in zip(first, after[:3], strict=True):  # the first three were kept, not re-evaluated
        assert (a.values, a.datetime_complete, a.user_attrs["policy_hash"]) == (
            b.values, b.datetime_complete, b.user_attrs["policy_hash"])  # fmt: skip


def test_password_is_never_shown(
    tmp_path: Path, baseline_ckpt: Path, study_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "s3cret-Pw0rd"
    url = _with_password(PG_URL, secret)  # the loopback test server trusts its user: any password connects
    p = _pg_study(tmp_path, baseline_ckpt, study_name, url=url, n_trials=2)
    outputs = []
    for argv in (["run", str(p), "--no-progress"], ["status", str(p)], ["report", str(p), "--out", "rep"]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        outputs.append(out + err)
    text = "\n".join(outputs)
    assert secret not in text and ":***@" in text and "trials 2/2 done" in text
    assert secret not in (tmp_path / "rep" / "study.json").read_text()

    # A connection error names the masked URL only.
    bad = _with_password(PG_URL, secret).rsplit("@", 1)[0] + "@127.0.0.1:9/nodb"
    p2 = _pg_study(tmp_path, baseline_ckpt, f"{study_name}-x", url=bad, n_trials=1)
    code = main(["status", str(p2)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "cannot open storage" in err
    assert secret not in err and ":***@127.0.0.1:9" in err


@pytest.mark.slow
def test_worker_processes_join_a_run_and_reach_exactly_n_trials(
    tmp_path: Path, baseline_ckpt: Path, study_name: str
) -> None:
    n = 10
    evaluator = 'kind = "finetune"\nsteps = 20\nlr = 0.01'
    # The driver stops claiming new trials after 1 s ([study] timeout), so most trials are left to the workers
    # (their study file is the same study without the timeout).
    driver_file = _pg_study(tmp_path, baseline_ckpt, study_name, n_trials=n, evaluator=evaluator, study="timeout = 1")
    worker_dir = tmp_path / "w"
    worker_dir.mkdir()
    worker_file = _pg_study(worker_dir, baseline_ckpt, study_name, n_trials=n, evaluator=evaluator)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "slimsearch", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    driver = cli("run", str(driver_file), "--no-progress")
    storage = optuna.storages.RDBStorage(engine_url(PG_URL))
    try:
        for _ in range(600):  # the study exists once the driver has validated input and built the context
            if study_name in optuna.get_all_study_names(storage) or driver.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        storage.engine.dispose()
    workers = [cli("worker", str(worker_file), "--threads", "1") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in (driver, *workers)]
    assert [p.returncode for p in (driver, *workers)] == [0, 0, 0], "\n".join(outs)
    ran = [int(o.rsplit("worker done: ", 1)[1].split()[0]) for o in outs[1:]]

    trials = _trials(PG_URL, study_name)
    assert sorted(t.number for t in trials) == list(range(n))  # exactly n trials, unique numbers
    assert all(t.state == TrialState.COMPLETE and is_counted(t) for t in trials)
    by = [t.system_attrs[WORKER_ATTR] for t in trials]
    assert all(w["trial"] == t.number for w, t in zip(by, trials, strict=True))
    driver_ran = n - sum(ran)
    assert sum(ran) >= 1 and 1 <= driver_ran < n  # the workers really joined
    assert len({w["pid"] for w in by}) == 1 + sum(1 for r in ran if r)
    assert f"{n}/{n} trials" not in outs[0] and "stopped:" in outs[0]
