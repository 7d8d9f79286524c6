"""Adapt the public CIFAR ResNet checkpoints to the JPEG-stored CIFAR-10 archive and report their accuracy.

The public ResNet-20/56 weights (../shared/models) lose ~10 points on the JPEG pixels of
../shared/data/cifar10-jpeg.tar.gz until fine-tuned on them. This script fine-tunes each one on the 45k train
split (5k held out as validation, seed 0; the 10k test split is never trained on), scores raw and adapted
weights on the full val and test splits, and writes the adapted state dicts OUTSIDE the repo to
``--ckpt-dir`` (default ``$SLIMSEARCH_ADAPTED`` or ``~/.cache/slimsearch/adapted``) as ``<model>-jpeg.th``.
Every other benchmark on the JPEG archive starts from these files; rerunning this script regenerates them.

  python benchmarks/adapt_baselines.py --models resnet20,resnet56 --epochs 0.3        # CPU
  python benchmarks/adapt_baselines.py --models resnet20,resnet56 --epochs 15 --device cuda

Writes benchmarks/results/adapt_baselines.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.models import build_model, load_checkpoint  # noqa: E402
from slimsearch.core.train import FinetuneConfig, evaluate, finetune  # noqa: E402

from benchmarks.common import CHECKPOINTS, adapted_dir, load_cifar, machine, run_script, shared_root  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs over the 45k train split")
    p.add_argument("--lr", type=float, default=0.01, help="peak lr, cosine schedule, SGD Nesterov")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--eval-only", action="store_true", help="score an existing adapted checkpoint, do not train")
    p.add_argument("--shared", default=shared_root(), help="folder with models/ and data/ ($SLIMSEARCH_SHARED)")
    p.add_argument("--ckpt-dir", default=str(adapted_dir()), help="where adapted checkpoints go ($SLIMSEARCH_ADAPTED)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def adapt(name: str, args: argparse.Namespace, splits, log) -> dict:
    """Fine-tune one public checkpoint on the JPEG train split; save it; return raw/adapted accuracies."""
    model = load_checkpoint(build_model(name), Path(args.shared) / "models" / CHECKPOINTS[name]).to(args.device)
    raw = {"val_acc": evaluate(model, splits.val), "test_acc": evaluate(model, splits.test)}
    log(f"{name}: raw checkpoint val {raw['val_acc']:.4f} test {raw['test_acc']:.4f}")
    out = Path(args.ckpt_dir) / f"{name}-jpeg.th"
    sidecar = out.with_suffix(".json")
    if args.eval_only:
        model = load_checkpoint(build_model(name), out).to(args.device)
        trained = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        train_s, settings = trained.get("train_s"), trained.get("settings")
    else:
        cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        t = time.perf_counter()
        finetune(model, splits.train, cfg, log=lambda s: log(f"  {name} {s}"), log_every=25)
        train_s, settings = time.perf_counter() - t, {"epochs": args.epochs, "lr": args.lr,
                                                      "batch_size": args.batch_size, "seed": args.seed}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, out)
        sidecar.write_text(json.dumps({"train_s": train_s, "settings": settings}) + "\n")
    model.eval()
    adapted = {"val_acc": evaluate(model, splits.val), "test_acc": evaluate(model, splits.test)}
    took = "evaluated only" if train_s is None else f"trained in {train_s:.0f} s"
    log(f"{name}: adapted val {adapted['val_acc']:.4f} test {adapted['test_acc']:.4f} ({took}) -> {out}")
    return {"model": name, "checkpoint": CHECKPOINTS[name], "raw": raw, "adapted": adapted, "train_s": train_s,
            "train_settings": settings, "adapted_path": str(out)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    splits = load_cifar(args.shared, log)
    out = Path(args.out) / "adapt_baselines.json"
    previous = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows = {r["model"]: r for r in previous}  # models not run now keep their last row
    for name in [n for n in args.models.split(",") if n]:
        rows[name] = adapt(name, args, splits, log)
    rows = dict(sorted(rows.items()))
    result = {"splits": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
              "machine": machine(), "rows": list(rows.values())}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    rows = result["rows"]
    print(f"{'model':<10} {'raw val':>8} {'raw test':>9} {'adapted val':>12} {'adapted test':>13} {'train s':>8}")
    for r in rows:
        print(f"{r['model']:<10} {100 * r['raw']['val_acc']:8.2f} {100 * r['raw']['test_acc']:9.2f} "
              f"{100 * r['adapted']['val_acc']:12.2f} {100 * r['adapted']['test_acc']:13.2f} {r['train_s'] or float('nan'):8.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_script(main)
