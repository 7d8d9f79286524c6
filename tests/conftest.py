"""Shared fixtures: the study tests' baseline and working folder, the bad-input and data-safety cases' checkpoint
and prepared study, caches kept out of the home folder (plain helpers are in helpers.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BASE_STUDY, S, case_env, make_baseline
from threadpoolctl import threadpool_limits

torch.set_num_threads(min(2, torch.get_num_threads()))
# OpenBLAS threads make tensorly's small SVDs far slower on a busy 2-core box than one thread.
threadpool_limits(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of the user's home during tests, shared across a session for speed."""
    if "SLIMSEARCH_CACHE" not in os.environ:
        monkeypatch.setenv("SLIMSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def baseline_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smallcnn trained briefly on digits (deterministic), shared by every study test of the session."""
    return make_baseline(tmp_path_factory)


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in the test's own temp folder, with one torch thread (the study tests' setting)."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained, seeded) smallcnn state dict: bad-input cases never get as far as training."""
    from slimsearch.core.models import build_model

    p = tmp_path_factory.mktemp("bad_input_ckpt") / "base.pt"
    torch.manual_seed(0)
    torch.save(build_model("smallcnn", 10, 1).state_dict(), p)
    return p


@pytest.fixture(scope="session")
def prepared_study(tmp_path_factory: pytest.TempPathFactory, base_ckpt: Path) -> Path:
    """A folder with a 2-trial study: trial 0 enqueued with a learning rate that makes the loss NaN
    (FAIL, with its reason), trial 1 a normal COMPLETE one."""
    d = tmp_path_factory.mktemp("bad_input_prepared")
    shutil.copy(base_ckpt, d / "base.pt")
    (d / S).write_text(BASE_STUDY.replace("n_trials = 3", "n_trials = 2"))
    code = (
        "import torch, slimsearch.evaluators.evaluate as ev\n"
        "from slimsearch.search.study import load_study\n"
        "from slimsearch.search.runner import run_study\n"
        "orig = ev.evaluate\n"
        "def evaluate(ctx, cfg, policy, **kw):\n"
        "    global orig\n"
        "    if evaluate.calls == 0:  # first trial: a fine-tune with an absurd learning rate -> NaN loss\n"
        "        import dataclasses\n"
        "        cfg = dataclasses.replace(cfg, kind='finetune', steps=5, lr=1e30)\n"
        "    evaluate.calls += 1\n"
        "    return orig(ctx, cfg, policy, **kw)\n"
        "evaluate.calls = 0\n"
        "ev.evaluate = evaluate\n"
        "torch.set_num_threads(1)\n"
        "s = run_study(load_study('study.toml'), workers=1, progress=False, log=lambda s: None)\n"
        "assert s.counted == 2, s\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=d, env=case_env(d), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return d
