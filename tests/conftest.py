"""Shared fixtures: the study tests' baseline and working folder, caches kept out of the home folder (plain helpers
are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_baseline
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
