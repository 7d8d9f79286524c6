"""The CLI on the Ray Tune backend: run / status / report / export of a `backend = "ray"` study.

The end-to-end run starts a private local Ray (seconds on two cores): marked slow. The fast checks need
no Ray runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import write_ray_study as _write_study
from slimsearch.search.cli import main

pytestmark = pytest.mark.usefixtures("tmp_cwd")  # conftest: the test's temp folder, one torch thread


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ray_study_that_never_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write_study(tmp_path, "never")
    before = sorted(tmp_path.rglob("*"))
    for cmd in (["status"], ["report"], ["export", "--trial", "best"]):
        code, _, err = run_cli(capsys, cmd[0], str(p), *cmd[1:])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "no Ray results for study 'never'" in lines[0], err
        assert "slimsearch run" in lines[0]
    code, _, err = run_cli(capsys, "worker", str(p))
    assert code == 2 and "backend ray has no `slimsearch worker`" in err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_ray_run_status_report_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write_study(tmp_path, "rcli", n_trials=3)
    code, out, err = run_cli(capsys, "run", str(p), "--no-progress")
    assert code == 0, err
    assert "Ray Tune" in out and "done: 3/3 trials" in out and "2 seed policies first" in out

    code, out, err = run_cli(capsys, "status", str(p))
    assert code == 0, err
    assert "trials 3/3 done" in out and "(ray: " in out and "best trial" in out and "uniform#0" in out

    code, out, err = run_cli(capsys, "report", str(p), "--out", "rep")
    assert code == 0, err
    rep = tmp_path / "rep"
    trials = pd.read_csv(rep / "trials.csv")
    front = pd.read_csv(rep / "pareto.csv")
    assert sorted(trials["trial"]) == [0, 1, 2] and set(trials["status"]) <= {"ok", "infeasible"}
    seed0 = trials[trials["trial"] == 0].iloc[0]  # the uniform 0.0 seed (100 % MACs), fitted onto the 50 % bound
    assert seed0["status"] == "ok" and 0.4 < seed0["macs_ratio"] <= 0.5
    assert 1 <= len(front) and set(front["trial"]) <= set(trials[trials["status"] == "ok"]["trial"])
    pngs = sorted(rep.glob("*.png"))
    assert len(pngs) == 2 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)
    assert json.loads((rep / "study.json").read_text())["counted"] == 3
    assert "optuna-dashboard" not in out

    code, out, err = run_cli(capsys, "export", str(p), "--trial", "best", "--format", "torchscript,state")
    assert code == 0, err
    best = trials[trials["status"] == "ok"].sort_values(["val_acc", "macs"], ascending=[False, True]).iloc[0]
    exp = tmp_path / "runs" / "rcli" / "export" / f"trial-{int(best['trial'])}"
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["trial"] == int(best["trial"]) and metrics["search_val_acc"] == pytest.approx(best["val_acc"])
    assert metrics["rebuilt_val_acc"] == pytest.approx(metrics["search_val_acc"], abs=0.02)
    assert metrics["macs"] == best["macs"] and metrics["macs"] <= 0.5 * metrics["base_macs"]

    # The TorchScript runs with plain torch in a fresh process and has the exported MACs.
    script = "import sys, torch\nm = torch.jit.load(sys.argv[1])\nc = torch.load(sys.argv[2])\n" \
             "print(float((m(c['input']) - c['output']).abs().max()))\n"  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(exp / "model.torchscript.pt"), str(exp / "check.pt")],
                         cwd="/", env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and float(res.stdout) < 1e-5, res.stderr
    from slimsearch.core.cost import count_cost

    assert count_cost(torch.jit.load(str(exp / "model.torchscript.pt")), (1, 1, 8, 8)).macs == metrics["macs"]

    code, _, err = run_cli(capsys, "export", str(p), "--trial", "7")
    assert code == 2 and "--trial 7: no such trial" in err

    # --top-k: the two best feasible Ray trials, best first, each fine-tuned; the best after it is kept.
    code, out, err = run_cli(capsys, "export", str(p), "--top-k", "2", "--finetune-epochs", "0.2", "--out", "top")
    assert code == 0, err
    m = json.loads((tmp_path / "top" / "metrics.json").read_text())
    ok = trials[trials["status"] == "ok"].sort_values(["val_acc", "macs", "trial"], ascending=[False, True, True])
    assert [r["trial"] for r in m["top_k"]] == [int(t) for t in ok["trial"].head(2)]
    assert m["val_acc"] == max(r["val_acc"] for r in m["top_k"]) and m["trial"] in [r["trial"] for r in m["top_k"]]
