"""Shared fixtures: where ../shared lives, and skipping cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLIMSEARCH_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# OpenBLAS threads make tensorly's small SVDs far slower on a busy 2-core box than one thread.
threadpool_limits(1)


def shared_path(*parts: str) -> Path:
    """Path under ../shared (or $SLIMSEARCH_SHARED); skips the test when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (set SLIMSEARCH_SHARED to the shared folder with data/ and models/)")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of the user's home during tests, shared across a session for speed."""
    if "SLIMSEARCH_CACHE" not in os.environ:
        monkeypatch.setenv("SLIMSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
