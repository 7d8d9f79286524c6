"""`slimsearch` end to end: exit codes, one-line errors that create nothing, status/report/export output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_study
from slimsearch.search.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("tmp_cwd")  # conftest: the test's temp folder, one torch thread


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files_under(p: Path) -> set[str]:
    return {str(f.relative_to(p)) for f in p.rglob("*")}


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimsearch: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda s: s.replace("n_trials = 4", "n_trials = = 4"), ("TOML syntax error", "line 4")),
        (lambda s: s.replace("n_trials = 4", "n_trial = 4"), ("unknown key 'n_trial'", "did you mean 'n_trials'")),
        (lambda s: s.replace('checkpoint = "', 'checkpoint = "/nonexistent'), ("[model] checkpoint", "not found")),
        (
            lambda s: s.replace('factory = "smallcnn"', 'factory = "resnet7"'),
            ("[model] factory", "unknown model 'resnet7'"),
        ),
        (lambda s: s.replace('dataset = "digits"', 'dataset = "cifar10"\nroot = "missing.tar.gz"'), ("[data] root",)),
        (lambda s: s.replace('name = "tiny"', 'name = "tiny"\nstorage = "mysql:/broken"'), ("[study] storage",)),
        (
            lambda s: s.replace('factory = "smallcnn"', 'factory = "resnet20"'),
            ("[model] checkpoint", "does not fit model CifarResNet"),
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(
    edit,
    needles,
    tmp_path: Path,
    baseline_ckpt: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = write_study(tmp_path, baseline_ckpt)
    p.write_text(edit(p.read_text()))
    before = files_under(tmp_path)
    code, _, err = run_cli(capsys, "run", str(p), "--no-progress")
    assert_one_line_error(code, err, *needles)
    assert files_under(tmp_path) == before  # no storage, no runs/ folder


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run")
    assert_one_line_error(code, err, "required: study")
    code, _, err = run_cli(capsys, "frobnicate")
    assert_one_line_error(code, err, "invalid choice")
    code, _, err = run_cli(capsys, "run", "x.toml", "--workers", "0")
    assert_one_line_error(code, err, "--workers")


def test_commands_on_a_study_that_never_ran(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_study(tmp_path, baseline_ckpt)
    before = files_under(tmp_path)
    for cmd in (["status"], ["report"], ["export", "--trial", "best"], ["worker"]):
        code, _, err = run_cli(capsys, cmd[0], str(p), *cmd[1:])
        assert_one_line_error(code, err, "no study storage", "slimsearch run")
    assert files_under(tmp_path) == before


def test_fast_end_to_end(tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_study(tmp_path, baseline_ckpt, n_trials=3, constraint="max_macs_ratio = 0.7",
                    seeds='strategies = ["uniform"]\nuniform_rates = [0.5]')  # fmt: skip
    code, out, err = run_cli(capsys, "run", str(p), "--no-progress")
    assert code == 0, err
    assert "trial    0  ok" in out and "seed uniform#0" in out and "done: 3/3 trials" in out
    assert "optuna-dashboard sqlite:///" in out

    code, out, _ = run_cli(capsys, "status", str(p))
    assert code == 0 and "trials 3/3 done" in out and "best trial" in out and "COMPLETE 3" in out
    code, out, _ = run_cli(capsys, "status", str(p), "--json")
    st = json.loads(out)
    assert code == 0 and (st["counted"], st["n_trials"], st["by_state"]) == (3, 3, {"COMPLETE": 3})
    assert st["seeds"] == ["uniform#0"] and st["objectives"] == ["val_acc:max"] and 0 < st["best"]["val_acc"] <= 1

    code, out, _ = run_cli(capsys, "report", str(p), "--out", "rep")
    assert code == 0 and "Pareto front" in out
    rep = tmp_path / "rep"
    for f in ("pareto.png", "trials.csv", "pareto.csv", "study.json"):
        assert (rep / f).is_file()
    pngs = sorted(rep.glob("*.png"))
    assert len(pngs) == 2 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000 for f in pngs)
    import pandas as pd

    trials = pd.read_csv(rep / "trials.csv")
    front = pd.read_csv(rep / "pareto.csv")
    assert len(trials) == 3 and 1 <= len(front) <= 3
    assert set(front["trial"]) <= set(trials[trials["status"] == "ok"]["trial"])

    code, out, err = run_cli(capsys, "report", str(p), "--trial", "99")
    assert_one_line_error(code, err, "--trial 99", "no such trial")

    code, out, err = run_cli(capsys, "export", str(p), "--trial", "best", "--format", "torchscript,state",
                             "--format", "torchscript-frozen")  # fmt: skip
    assert code == 0, err
    exp = next((tmp_path / "runs" / "tiny" / "export").iterdir())
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["rebuilt_val_acc"] == pytest.approx(metrics["search_val_acc"], abs=0.02)
    assert 0 < metrics["test_acc"] <= 1 and metrics["macs"] <= 0.7 * metrics["base_macs"]
    assert f"trial {metrics['trial']}:" in out and (exp / "model.pt").is_file()
    # measured on the frozen program (asked for), against the baseline's frozen program
    assert metrics["latency_program"] == "torchscript-frozen (contiguous)"
    assert metrics["speedup_batch1"] == pytest.approx(metrics["base_latency_ms_batch1"] / metrics["latency_ms_batch1"])
    assert metrics["export_speedup_batch1"] == pytest.approx(metrics["speedup_batch1"] * metrics["macs_ratio"])
    assert f"latency {metrics['latency_ms_batch1']:.2f} ms vs {metrics['base_latency_ms_batch1']:.2f} ms" in out

    # The TorchScript file runs with plain torch in a fresh process (no slimsearch on the path) ...
    script = (
        "import sys, torch\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "c = torch.load(sys.argv[2])\n"
        "y = m(c['input'])\n"
        "print(tuple(y.shape), float((y - c['output']).abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(exp / "model.torchscript.pt"), str(exp / "check.pt")],
                         cwd="/", env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    shape, diff = res.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 10)" and float(diff) < 1e-5
    # ... and has exactly the MACs its metrics claim.
    from slimsearch.core.cost import count_cost

    assert count_cost(torch.jit.load(str(exp / "model.torchscript.pt")), (1, 1, 8, 8)).macs == metrics["macs"]
    frozen = torch.jit.load(str(exp / "model.frozen.torchscript.pt"))  # BN folded: same MACs, same outputs
    assert count_cost(frozen, (1, 1, 8, 8)).macs == metrics["macs"] and not list(frozen.parameters())
    check = torch.load(exp / "check.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(frozen(check["input"]), check["output"], atol=1e-4, rtol=1e-5)


def test_export_rejects_failed_and_missing_trials(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_study(tmp_path, baseline_ckpt, n_trials=2, constraint="",
                    evaluator='kind = "finetune"\nsteps = 2\nlr = 1e30')  # fmt: skip
    assert run_cli(capsys, "run", str(p), "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "export", str(p), "--trial", "0")
    assert_one_line_error(code, err, "trial is FAIL", "loss")
    code, _, err = run_cli(capsys, "export", str(p), "--trial", "7")
    assert_one_line_error(code, err, "--trial 7: no such trial")
    code, _, err = run_cli(capsys, "export", str(p), "--trial", "best")
    assert_one_line_error(code, err, "no feasible COMPLETE trial")
    code, _, err = run_cli(capsys, "export", str(p), "--format", "tflite")
    assert_one_line_error(code, err, "unknown format 'tflite'")
    assert not (tmp_path / "runs" / "tiny" / "export").exists()


def test_export_top_k_fine_tunes_the_best_trials_and_keeps_the_best_on_val(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_study(tmp_path, baseline_ckpt, n_trials=5, evaluator='kind = "finetune"\nsteps = 2')
    assert run_cli(capsys, "run", str(p), "--no-progress")[0] == 0
    code, out, err = run_cli(capsys, "export", str(p), "--top-k", "3", "--finetune-epochs", "0.3", "--out", "top")
    assert code == 0, err
    m = json.loads((tmp_path / "top" / "metrics.json").read_text())
    ranked = m["top_k"]
    assert len(ranked) == 3 and "kept trial" in out
    searched = [r["search_val_acc"] for r in ranked]
    assert searched == sorted(searched, reverse=True)  # the search's best three, best first
    after = [r["val_acc"] for r in ranked]
    kept = next(r for r in ranked if r["trial"] == m["trial"])
    assert kept["val_acc"] == max(after) == m["val_acc"] and m["finetune_epochs"] == 0.3
    for r in ranked:  # the evaluator's model is rebuilt before each fine-tune
        assert r["rebuilt_val_acc"] == pytest.approx(r["search_val_acc"], abs=0.02)
    # The kept model is what a plain export of that trial with the same fine-tune gives.
    code, _, err = run_cli(capsys, "export", str(p), "--trial", str(m["trial"]), "--finetune-epochs", "0.3",
                           "--out", "one")  # fmt: skip
    assert code == 0, err
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["val_acc"] == m["val_acc"] and one["test_acc"] == m["test_acc"] and "top_k" not in one

    # [export] top_k: the default of `export` (trial best, with the study's fine-tune); a single trial, an
    # explicit --top-k or --finetune-epochs 0 override it; without a fine-tune it is a study-file error.
    text = p.read_text()
    p.write_text(text + "\n[export]\nfinetune_epochs = 0.3\ntop_k = 3\n")
    code, out, err = run_cli(capsys, "export", str(p), "--out", "study")
    assert code == 0, err
    st = json.loads((tmp_path / "study" / "metrics.json").read_text())
    assert st["top_k"] == ranked and st["trial"] == m["trial"] and st["val_acc"] == m["val_acc"]
    code, _, err = run_cli(capsys, "export", str(p), "--trial", str(m["trial"]), "--out", "study1")
    assert code == 0, err
    assert "top_k" not in json.loads((tmp_path / "study1" / "metrics.json").read_text())
    code, _, err = run_cli(capsys, "export", str(p), "--top-k", "2", "--out", "study2")
    assert code == 0, err
    assert [r["trial"] for r in json.loads((tmp_path / "study2" / "metrics.json").read_text())["top_k"]] == [
        r["trial"] for r in ranked[:2]
    ]
    code, _, err = run_cli(capsys, "export", str(p), "--finetune-epochs", "0", "--out", "study0")
    assert code == 0, err
    assert "top_k" not in json.loads((tmp_path / "study0" / "metrics.json").read_text())
    p.write_text(text + "\n[export]\ntop_k = 3\n")
    code, _, err = run_cli(capsys, "export", str(p), "--out", "bad0")
    assert_one_line_error(code, err, "[export] top_k", "finetune_epochs > 0")
    p.write_text(text)

    code, _, err = run_cli(capsys, "export", str(p), "--top-k", "2", "--out", "bad1")
    assert_one_line_error(code, err, "--top-k", "--finetune-epochs")
    code, _, err = run_cli(capsys, "export", str(p), "--top-k", "2", "--trial", "1", "--finetune-epochs", "0.1",
                           "--out", "bad2")  # fmt: skip
    assert_one_line_error(code, err, "--top-k", "--trial best")
    code, _, err = run_cli(capsys, "export", str(p), "--top-k", "0", "--out", "bad3")
    assert code == 2 and "--top-k" in err
    assert not any((tmp_path / d).exists() for d in ("bad0", "bad1", "bad2", "bad3"))


def test_cost_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "cost", "smallcnn")
    assert code == 0
    assert "input 1x1x8x8" in out and "(1,493,632 multiply-accumulates" in out and "2.987 M" in out
    assert "(65,834)" in out and "at batch 64" in out
    code, out, _ = run_cli(capsys, "cost", "resnet20", "--input-shape", "3,32,32")
    assert code == 0 and "40.551 M" in out and "(269,722)" in out
    code, _, err = run_cli(capsys, "cost", "resnet20", "--input-shape", "3,x")
    assert_one_line_error(code, err, "--input-shape")


def test_train_command_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "train", "smallcnn", "--data", "digits", "--epochs", "1", "--out", "ck/base.pt",
                             "--lr", "0.05")  # fmt: skip
    assert code == 0, err
    assert "val_acc" in out and "test_acc" in out
    from slimsearch.core.models import build_model, load_checkpoint

    load_checkpoint(build_model("smallcnn", 10, 1), tmp_path / "ck" / "base.pt")
    code, _, err = run_cli(
        capsys, "train", "smallcnn", "--data", "cifar10", "--root", "nope", "--epochs", "1", "--out", "x.pt"
    )
    assert_one_line_error(code, err, "--root")
