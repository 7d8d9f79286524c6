"""The GPU check (run by benchmarks/gpu_check.sh): the commands a user runs, on ``--device``, timed.

1. the quickstart (``slimsearch run studies/quickstart.toml``, its 2 workers sharing the device);
2. a 12-trial ResNet-20 study on CIFAR-10-sized data (finetune evaluator, 50 KD steps at batch 128, 2 local
   workers on one GPU, ``[evaluator] amp``);
3. ``slimsearch export`` of its best trial with a 1-epoch final fine-tune.

It writes a JSON (default benchmarks/results/gpu_check.json): trials per hour, seconds per trial, the GPU's name.
The ResNet-20 data are CIFAR-10-shaped synthetic class patterns written as CIFAR-10 python pickles (50 000 train,
10 000 test; the speed of a trial does not depend on the pixels) and the baseline is pre-trained for
``--pretrain-epochs``, so the check needs nothing from ../shared. ``--tiny`` shrinks everything to toy scale
(what the CPU test runs). Every step is a ``python -m slimsearch`` subprocess, so it checks the installed CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="toy scale (minutes on a CPU): what the test runs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default: benchmarks/results/gpu_check.json; tiny: in the work folder)")  # fmt: skip
    p.add_argument(
        "--amp", default=None, help="[evaluator] amp of the ResNet-20 study (default: bf16 on cuda, off on cpu)"
    )
    p.add_argument("--workers", type=int, default=2, help="local workers of the ResNet-20 study (default 2)")
    p.add_argument("--n-trials", type=int, default=None, help="ResNet-20 trials (default 12; tiny 3)")
    p.add_argument(
        "--pretrain-epochs", type=float, default=None, help="ResNet-20 baseline epochs (default 1; tiny 0.2)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_cifar_pickles(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-10-format python pickles (data_batch_1..5, test_batch, batches.meta) of synthetic class patterns."""
    import numpy as np
    import torch
    from slimsearch.core.data import CIFAR10_CLASSES, load_synthetic

    ds = load_synthetic(n=n_train + n_test, num_classes=10, size=32, channels=3, seed=seed, noise=0.25)
    x = ds.x.reshape(len(ds), -1).numpy()
    y = ds.y.numpy().astype(int)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(torch.arange(n_train).numpy(), 5)
    for i, idx in enumerate(parts, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": np.ascontiguousarray(x[idx]), "labels": y[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.ascontiguousarray(x[n_train:]), "labels": y[n_train:].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return folder


def quickstart_study(work: Path, tiny: bool) -> Path:
    """studies/quickstart.toml with its storage and workdir in ``work`` (and toy-sized when ``tiny``)."""
    text = (REPO / "studies" / "quickstart.toml").read_text()
    where = f'storage = "sqlite:///{work}/quickstart.db"\nworkdir = "{work}/quickstart"\n'
    text = text.replace("[study]\n", f"[study]\n{where}", 1)
    if tiny:
        text = re.sub(r"(?m)^pretrain_epochs = \d+", "pretrain_epochs = 2", text)
        text = re.sub(r"(?m)^steps = \d+", "steps = 5", text)
    path = work / "quickstart.toml"
    path.write_text(text)
    return path


def resnet20_study(work: Path, data: Path, a: argparse.Namespace, amp: str) -> Path:
    """The 12-trial ResNet-20 study: finetune evaluator, 50 KD steps at batch 128, ``a.workers`` local workers."""
    tiny = a.tiny
    steps, batch, val = (5, 32, 200) if tiny else (50, 128, 5000)
    pre = a.pretrain_epochs if a.pretrain_epochs is not None else (0.2 if tiny else 1.0)
    path = work / "resnet20_check.toml"
    path.write_text(f"""
[study]
name = "resnet20_check"
storage = "sqlite:///{work}/resnet20_check.db"
workdir = "{work}/resnet20_check"
n_trials = {a.n_trials or (3 if tiny else 12)}
n_startup_trials = 4
seed = 0

[model]
factory = "resnet20"
pretrain_epochs = {pre}
pretrain_lr = 0.05

[data]
dataset = "cifar10"
root = "{data}"
val_size = {val}

[constraint]
max_macs_ratio = 0.5
fit = "fill"

[space]
coupled = false
prune_rate = [0.0, 0.8]
rate_step = 0.05
criteria = ["l1", "fpgm"]
decomposition = ["none", "tucker"]
rank_ratio = [0.3, 0.9]

[evaluator]
kind = "finetune"
steps = {steps}
batch_size = {batch}
lr = 0.01
kd = true
amp = "{amp}"
workers = {a.workers}

[export]
formats = ["torchscript"]
finetune_batch_size = {batch}
kd = true
""")
    return path


def slimsearch(args: list[str], label: str) -> dict[str, Any]:
    """Run ``python -m slimsearch ARGS``; its wall time and exit code (its output goes to ours)."""
    log(f"{label}: slimsearch {' '.join(args)}")
    t = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "slimsearch", *args], check=False).returncode
    wall = time.perf_counter() - t
    log(f"{label}: exit {rc} in {wall:.1f} s")
    return {"rc": rc, "wall_s": round(wall, 2)}


def trial_times(study_file: Path) -> dict[str, Any]:
    """Seconds per trial (each trial's own start-to-end, and the evaluator's split of it) and trials per hour
    (trials over the span from the first trial's start to the last one's end) from the study's storage."""
    import optuna
    from slimsearch.search.runner import load_optuna_study, open_storage
    from slimsearch.search.study import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_study(study_file)
    trials = [t for t in load_optuna_study(cfg, open_storage(cfg, create=False)).get_trials() if t.state.is_finished()]
    done = [t for t in trials if t.datetime_start and t.datetime_complete]
    if not done:
        return {"trials": 0}
    dur = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    metrics = [t.user_attrs.get("metrics", {}) for t in done]
    split = {k: statistics.median(m.get(k, 0.0) for m in metrics) for k in ("apply_s", "cost_s", "train_s", "eval_s")}
    ok = [t.user_attrs.get("val_acc") for t in done if t.user_attrs.get("status") == "ok"]
    return {
        "trials": len(done),
        "states": {s: sum(t.state.name == s for t in done) for s in sorted({t.state.name for t in done})},
        "ok_trials": len(ok),
        "s_per_trial_median": round(statistics.median(dur), 3),
        "s_per_trial_mean": round(statistics.fmean(dur), 3),
        "search_span_s": round(span, 2),
        "trials_per_h": round(len(done) / span * 3600, 1) if span > 0 else None,
        "median_split_s": {k: round(v, 3) for k, v in split.items()},
        "best_val_acc": max(ok) if ok else None,
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    cuda = a.device != "cpu"
    if cuda and not torch.cuda.is_available():
        print(f"error: --device {a.device}: CUDA is not available on this machine", file=sys.stderr)
        return 2
    amp = a.amp or ("bf16" if cuda else "off")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    a.out = a.out or (work / "gpu_check_tiny.json" if a.tiny else REPO / "benchmarks" / "results" / "gpu_check.json")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.sh",
        "device": a.device,
        "tiny": a.tiny,
        "gpu": torch.cuda.get_device_name(torch.device(a.device)) if cuda else None,
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "amp": amp,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(f"device {a.device} ({report['gpu'] or 'CPU'}), work folder {work}")

    quick = quickstart_study(work, a.tiny)
    report["quickstart"] = slimsearch(["run", str(quick), "--device", a.device, "--no-progress"]
                                      + (["--n-trials", "3"] if a.tiny else []), "quickstart")  # fmt: skip
    report["quickstart"].update(trial_times(quick))

    t = time.perf_counter()
    n_train, n_test = (1200, 200) if a.tiny else (50_000, 10_000)
    data = write_cifar_pickles(work / "data", n_train, n_test)
    report["data"] = {"kind": "synthetic CIFAR-10-format pickles", "train": n_train, "test": n_test,
                      "write_s": round(time.perf_counter() - t, 2)}  # fmt: skip
    r20 = resnet20_study(work, data, a, amp)
    report["resnet20"] = slimsearch(["run", str(r20), "--device", a.device, "--no-progress"], "resnet20 study")
    report["resnet20"].update(trial_times(r20), workers=a.workers, steps=5 if a.tiny else 50,
                              batch_size=32 if a.tiny else 128)  # fmt: skip

    epochs = "0.1" if a.tiny else "1"
    out = work / "export"
    report["export"] = slimsearch(["export", str(r20), "--trial", "best", "--finetune-epochs", epochs,
                                   "--device", a.device, "--out", str(out)], "export")  # fmt: skip
    metrics = out / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        report["export"].update({k: m.get(k) for k in ("val_acc", "finetune_steps", "macs_ratio", "speedup_batch1")})
    report["export"]["finetune_epochs"] = float(epochs)

    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["ok"] = all(report[k]["rc"] == 0 for k in ("quickstart", "resnet20", "export"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    r = report["resnet20"]
    log(f"{'OK' if report['ok'] else 'FAILED'} in {report['total_s']:.0f} s: ResNet-20 {r.get('s_per_trial_median')} s "
        f"per trial, {r.get('trials_per_h')} trials/h with {a.workers} workers; wrote {a.out}")  # fmt: skip
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
