"""Data safety through the real CLI (issue 20): what a command may write, replace or run.

The refusals (exit 2, one line, nothing written) are cases of ``tests/test_bad_input.py``; these tests cover what
must still work, and what must never appear on disk or run, while it does.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import BASE_STUDY, S, case_env


def _cli(d: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slimsearch", *argv], cwd=d, env=case_env(d), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _trials(d: Path, name: str = "bad") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{d / 'runs' / f'{name}.db'}").get_trials()


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "case"
    shutil.copytree(src, d)
    return d


def _run_two_workers_watching_configs(d: Path) -> tuple[int, str, str, set[str]]:
    """``slimsearch run`` with two workers in ``d``; the workdir is polled every 50 ms for worker-config files.
    Returns the exit code, stdout, stderr and the names of every such file seen."""
    proc = subprocess.Popen([sys.executable, "-m", "slimsearch", "run", S, "--no-progress", "--workers", "2",
                             "--threads", "1"], cwd=d, env=case_env(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    seen: set[str] = set()
    work, deadline = d / "runs" / "bad", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if work.is_dir():
            seen.update(p.name for p in work.iterdir() if p.name.startswith(".worker-config"))
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, seen


def test_export_replaces_only_its_own_export_and_uses_the_umask(
    prepared_study: Path,
    tmp_path: Path,
) -> None:
    d = _copy(prepared_study, tmp_path)
    first = _cli(d, "export", S, "--trial", "1", "--out", "out")
    assert first.returncode == 0, first.stderr
    files = sorted(p.name for p in (d / "out").iterdir())
    assert "manifest.json" in files and "model.torchscript.pt" in files
    mode = stat.S_IMODE((d / "out").stat().st_mode)
    assert mode == 0o777 & ~_umask(), oct(mode)  # mkdtemp's 0700 used to stay
    again = _cli(d, "export", S, "--trial", "1", "--out", "out", "--format", "state")
    assert again.returncode == 0, again.stderr  # an earlier export of this study is replaced as a whole
    assert sorted(p.name for p in (d / "out").iterdir()) == ["check.pt", "manifest.json", "metrics.json", "model.pt",
                                                            "policy.json"]  # fmt: skip
    assert not [p for p in d.iterdir() if p.name.startswith(".out.")]  # no temporary or moved-aside folder left
    empty = d / "empty"
    empty.mkdir()
    assert _cli(d, "export", S, "--trial", "1", "--out", "empty").returncode == 0  # an empty folder is fine


def test_resume_allows_n_trials_timeout_and_workers_and_stores_the_fingerprint(
    prepared_study: Path,
    tmp_path: Path,
) -> None:
    d = _copy(prepared_study, tmp_path)
    stale = d / "runs" / "bad" / ".worker-config-abc123.pkl"  # left by an older version's killed driver
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"postgresql://u:secret@host/db")
    text = (d / S).read_text().replace("n_trials = 2", "n_trials = 3\ntimeout = 600")
    (d / S).write_text(text.replace('kind = "proxy"', 'kind = "proxy"\nworkers = 1'))
    res = _cli(d, "run", S, "--no-progress", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert "resuming: 2/3" in res.stdout and "done: 3/3" in res.stdout
    assert not stale.exists()  # the plaintext storage URL is gone
    attrs = optuna.load_study(study_name="bad", storage=f"sqlite:///{d / 'runs' / 'bad.db'}").user_attrs
    fp = attrs["fingerprint"]
    assert "[space] criteria" in fp and "[constraint] max_macs_ratio" in fp and "baseline weights" in fp
    assert not any("n_trials" in k or "timeout" in k or "workers" in k for k in fp)
    assert "optuna-dashboard sqlite:///" in res.stdout


def test_a_huge_n_trials_enqueues_slots_in_bounded_batches(base_ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "case"
    d.mkdir()
    shutil.copy(base_ckpt, d / "base.pt")
    (d / S).write_text(BASE_STUDY.replace("n_trials = 3", "n_trials = 5000\ntimeout = 2"))
    res = _cli(d, "run", S, "--no-progress", "--threads", "1", timeout=240)
    assert res.returncode == 0, res.stderr
    trials = _trials(d)
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    assert 0 < waiting <= 32 and len(trials) < 200, (waiting, len(trials))  # main enqueued all 5000 up front


def test_workers_never_import_the_study_folder_and_keep_no_config_on_disk(
    base_ckpt: Path,
    tmp_path: Path,
) -> None:
    d = tmp_path / "case"
    d.mkdir()
    shutil.copy(base_ckpt, d / "base.pt")
    # A stray module named like one slimsearch imports; running it leaves a marker (and breaks the import).
    for mod in ("tomllib", "pandas"):
        (d / f"{mod}.py").write_text(f"import os\nopen('RAN-{mod}-' + str(os.getpid()), 'w').close()\n"
                                     f"raise SystemExit('stray {mod}.py ran')\n")  # fmt: skip
    # The user's own factory in the same folder must still be found, by the driver and by every worker.
    (d / "usermodels.py").write_text(
        "from slimsearch.core.models import build_model\n\n\n"
        "def small(num_classes=10, in_channels=1):\n    return build_model('smallcnn', num_classes, in_channels)\n"
    )
    (d / S).write_text(BASE_STUDY.replace("n_trials = 3", "n_trials = 4").replace('"smallcnn"', '"usermodels:small"'))
    returncode, out, err, seen = _run_two_workers_watching_configs(d)
    assert returncode == 0, err
    assert "done: 4/4" in out
    assert not list(d.glob("RAN-*")), "a module from the study folder ran"
    assert not seen, f"the worker config (storage URL, password) was on disk: {seen}"
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in _trials(d)) == 4


def test_a_multi_worker_run_never_writes_its_config_to_disk(base_ckpt: Path, tmp_path: Path) -> None:
    """The config (with the storage URL and its password) reaches the workers on stdin: no file appears in the
    workdir at any moment of a two-worker run (polled every 50 ms)."""
    d = tmp_path / "case"
    d.mkdir()
    shutil.copy(base_ckpt, d / "base.pt")
    (d / S).write_text(BASE_STUDY.replace("n_trials = 3", "n_trials = 2"))
    returncode, out, err, seen = _run_two_workers_watching_configs(d)
    assert returncode == 0 and "done: 2/2" in out, err
    assert not seen, f"the worker config (storage URL, password) was on disk: {seen}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check cannot be seen")
def test_workdir_in_a_read_only_folder_is_refused_before_the_database(base_ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "case"
    (d / "ro").mkdir(parents=True)
    shutil.copy(base_ckpt, d / "base.pt")
    (d / S).write_text(BASE_STUDY.replace('name = "bad"', 'name = "bad"\nworkdir = "ro/work"'))
    os.chmod(d / "ro", 0o555)
    try:
        res = _cli(d, "run", S, "--no-progress")
    finally:
        os.chmod(d / "ro", 0o755)
    assert res.returncode == 2 and "[study] workdir" in res.stderr and "Traceback" not in res.stderr
    assert not (d / "runs").exists()


def test_dashboard_hint_never_prints_a_password_and_says_how_to_supply_it() -> None:
    from slimsearch.search.storage_hint import dashboard_command

    pg = dashboard_command("postgresql://slim:s3cr%40t@db.example:5432/studies")
    assert "s3cr" not in pg and "***" not in pg
    assert pg.startswith("PGPASSWORD=") and "optuna-dashboard postgresql://slim@db.example:5432/studies" in pg
    assert dashboard_command("sqlite:////tmp/runs/x.db") == "optuna-dashboard sqlite:////tmp/runs/x.db"
    my = dashboard_command("mysql://u:hunter2@h/db")
    assert "hunter2" not in my and "mysql://u@h/db" in my


def test_fingerprint_names_the_differing_keys_and_skips_unknown_ones() -> None:
    import tomllib
    from slimsearch.core.errors import SlimError
    from slimsearch.search import fingerprint
    from slimsearch.search.study import study_from_dict

    raw = tomllib.loads(BASE_STUDY.replace('checkpoint = "base.pt"', "pretrain_epochs = 1"))
    a = fingerprint.config_fingerprint(study_from_dict(raw, "s.toml"))
    raw["space"]["criteria"] = ["l1", "fpgm"]
    raw["study"]["n_trials"] = 99
    raw["evaluator"]["workers"] = 4
    b = fingerprint.config_fingerprint(study_from_dict(raw, "s.toml"))
    assert fingerprint.differing(a, b) == ["[space] criteria"]
    fingerprint.check(None, b, "x", "s.toml")  # an older study without one: nothing to compare
    fingerprint.check({"[space] new_key_of_a_later_version": "1"}, b, "x", "s.toml")
    with pytest.raises(SlimError, match=r"\[space\] criteria .*new \[study\] name.*revert"):
        fingerprint.check(a, b, "x", "s.toml")


def test_ray_study_resumed_with_a_changed_study_file_is_refused_before_ray_starts(
    base_ckpt: Path,
    tmp_path: Path,
) -> None:
    """The Ray backend keeps the fingerprint in ``<name>-meta.json``; a resumable experiment (``tuner.pkl`` and a
    snapshot) with another study file's fingerprint is refused at once, before Ray or the data start."""
    import json

    from slimsearch.search import fingerprint
    from slimsearch.search.study import load_study

    d = tmp_path / "case"
    d.mkdir()
    shutil.copy(base_ckpt, d / "base.pt")
    (d / S).write_text(BASE_STUDY.replace('name = "bad"', 'name = "bad"\nbackend = "ray"'))
    cwd = os.getcwd()
    os.chdir(d)
    try:
        old = fingerprint.config_fingerprint(load_study(d / S))
    finally:
        os.chdir(cwd)
    exp = d / "runs" / "bad" / "ray" / "bad"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    (exp / "experiment_state-2026.json").write_text("{}")
    (exp.parent / "bad-meta.json").write_text(json.dumps({"study": "bad", "n_trials": 3, "fingerprint": old}))
    (d / S).write_text((d / S).read_text().replace("prune_rate = [0.0, 0.7]", "prune_rate = [0.0, 0.5]"))
    res = _cli(d, "run", S, "--no-progress", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "[space] prune_rate" in res.stderr and "new [study] name" in res.stderr
    assert not (d / "runs" / "bad" / "cache").exists() and not (d / ".cache").exists()
