"""Helpers shared by the test modules: where ../shared lives, the small study files and baseline the study tests
run on, reading a study's trials back. Plain functions (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import builtins
import os
import re
from pathlib import Path

import optuna
import pytest
import torch
from slimsearch.core.data import load_splits
from slimsearch.core.models import build_model
from slimsearch.core.train import FinetuneConfig, finetune, recalibrate_bn
from slimsearch.search.optuna_study import load_optuna_study
from slimsearch.search.storage import open_storage
from slimsearch.search.study import StudyConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLIMSEARCH_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared (or $SLIMSEARCH_SHARED); skips the test when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (set SLIMSEARCH_SHARED to the shared folder with data/ and models/)")
    return p


def make_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train (once per session) and save the smallcnn digits baseline; return its path."""
    path = tmp_path_factory.getbasetemp() / "baseline" / "smallcnn_digits.pt"
    if path.is_file():  # made by another test module in this session
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    splits = load_splits("digits", None, 200, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        finetune(model, splits.train, FinetuneConfig(epochs=3, lr=0.05, batch_size=128, seed=0))
    recalibrate_bn(model, splits.train, num_batches=10, batch_size=128)
    torch.save(model.state_dict(), path)
    return path


def write_study(
    tmp: Path, ckpt: Path, *, name: str = "tiny", n_trials: int = 4, study: str = "", seeds: str = "",
    constraint: str = "max_macs_ratio = 0.7", evaluator: str = "", space: str = "",
) -> Path:  # fmt: skip
    """A small study file in ``tmp`` (storage and workdir under tmp/runs)."""
    p = tmp / f"{name}.toml"
    p.write_text(f"""
[study]
name = "{name}"
n_trials = {n_trials}
heartbeat_interval = 1
grace_period = 2
{study}

[model]
factory = "smallcnn"
checkpoint = "{ckpt}"

[data]
dataset = "digits"
val_size = 200

[constraint]
{constraint}

[space]
prune_rate = [0.0, 0.7]
rate_step = 0.05
{space}

[seeds]
{seeds}

[evaluator]
{"" if "kind =" in evaluator else 'kind = "proxy"'}
bn_batches = 2
batch_size = 64
{evaluator}
""")
    return p


def trials_of(cfg: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    return load_optuna_study(cfg, open_storage(cfg, create=False)).get_trials()


def smallcnn_checkpoint(tmp: Path) -> Path:
    """An untrained SmallCNN (digits-shaped, seed 0) checkpoint in ``tmp``, written once."""
    ckpt = tmp / "smallcnn.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), ckpt)
    return ckpt


def write_ray_study(tmp: Path, name: str, *, n_trials: int = 4, workers: int = 2, constraint: str = "") -> Path:
    """A tiny study: untrained SmallCNN checkpoint (instant), digits, proxy, MACs <= 50 %, seeds 0.0 and 0.6."""
    ckpt = smallcnn_checkpoint(tmp)
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[study]
name = "{name}"
workdir = "{tmp / "runs" / name}"
storage = "sqlite:///{tmp / "runs" / name}.db"
n_trials = {n_trials}
backend = "ray"
seed = 0

[model]
factory = "smallcnn"
checkpoint = "{ckpt}"

[data]
dataset = "digits"

[constraint]
max_macs_ratio = 0.5
{constraint}

[space]
prune_rate = [0.0, 0.8]

[seeds]
strategies = ["uniform"]
uniform_rates = [0.0, 0.6]

[evaluator]
kind = "proxy"
bn_batches = 2
workers = {workers}
""")
    return path


# ----------------------------------------------------------------------------- bad-input / data-safety cases

# The study file of tests/test_bad_input.py and tests/test_data_safety.py (a case folder holds it as S).
BASE_STUDY = """\
[study]
name = "bad"
n_trials = 3
heartbeat_interval = 1
grace_period = 2

[model]
factory = "smallcnn"
checkpoint = "base.pt"

[data]
dataset = "digits"
val_size = 200

[constraint]
max_macs_ratio = 0.7

[space]
prune_rate = [0.0, 0.7]
rate_step = 0.05

[evaluator]
kind = "proxy"
bn_batches = 2
batch_size = 64
"""
S = "study.toml"


def case_env(d: Path) -> dict[str, str]:
    """The environment of a CLI subprocess run in case folder ``d``: this checkout first, caches inside ``d``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSEARCH_")}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONDONTWRITEBYTECODE="1",  # the case's own modules must not grow a __pycache__
        SLIMSEARCH_CACHE=str(d / ".cache"),  # inside the snapshot: caches count as writes too
        OMP_NUM_THREADS="1",
        COLUMNS="200",
    )
    return env


def cost_numbers(out: str) -> tuple[int, int, str]:
    """(MACs, params, input shape) from ``slimsearch cost``'s printed report."""
    macs = int(re.search(r"\(([\d,]+) multiply-accumulates", out).group(1).replace(",", ""))
    params = int(re.search(r"params .*\(([\d,]+)\)", out).group(1).replace(",", ""))
    return macs, params, re.search(r"input (\S+)", out).group(1)


def block_import(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` (and its submodules) raise ImportError, as when an optional extra is missing."""
    real = builtins.__import__

    def blocked(name: str, *args: object, **kw: object) -> object:
        if name.split(".")[0] == package:
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", blocked)
