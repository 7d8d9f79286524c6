"""benchmarks/gpu_check.sh at toy scale on the CPU (--device cpu --tiny), and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slimsearch.core.data import load_cifar_pickle

from benchmarks.gpu_check import write_cifar_pickles

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)  # fmt: skip


def test_synthetic_cifar_pickles_load_as_cifar10(tmp_path: Path) -> None:
    folder = write_cifar_pickles(tmp_path, n_train=50, n_test=20)
    train, test = load_cifar_pickle(folder)
    assert (len(train), len(test)) == (50, 20)
    assert train.x.shape[1:] == (3, 32, 32) and train.x.dtype == torch.uint8 and train.num_classes == 10
    assert sorted(set(train.y.tolist())) == list(range(10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_cuda_check_without_cuda_exits_2(tmp_path: Path) -> None:
    r = _run(["--device", "cuda", "--workdir", str(tmp_path / "w"), "--wheels", str(tmp_path / "none")], 300)
    assert r.returncode == 2, r.stderr
    assert "CUDA is not available on this machine" in r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_tiny_cpu_check_runs_every_step_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    r = _run(["--device", "cpu", "--tiny", "--workdir", str(tmp_path / "w"), "--out", str(out)], 1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["device"] == "cpu" and rep["tiny"] and rep["gpu"] is None
    assert rep["quickstart"]["rc"] == 0 and rep["quickstart"]["trials"] == 3
    r20 = rep["resnet20"]
    assert r20["rc"] == 0 and r20["trials"] == 3 and r20["ok_trials"] >= 1 and r20["workers"] == 2
    assert r20["s_per_trial_median"] > 0 and r20["trials_per_h"] > 0
    assert r20["median_split_s"]["train_s"] > 0
    assert rep["export"]["rc"] == 0 and rep["export"]["finetune_steps"] >= 1 and 0 < rep["export"]["macs_ratio"] <= 0.5
    assert (tmp_path / "w" / "export" / "model.torchscript.pt").is_file()
