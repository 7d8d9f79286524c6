"""Reproduction table: the four methods of METHODS.md on the public CIFAR ResNets, next to the papers' figures.

For each model: load the public checkpoint (../shared/models) and the CIFAR-10 JPEG archive
(../shared/data/cifar10-jpeg.tar.gz; 45k train / 5k val (seed 0) / 10k test). The methods' acc() is the
evaluators' proxy: BN recalibration on ``--bn-batches`` train batches, then accuracy on the first
``--val-images`` val images (evaluators.evaluate, kind "proxy", no MACs bound). After each method the policy is
applied, BN recalibrated and the model fine-tuned for ``--finetune-steps`` SGD steps (same for every method and
for the "baseline+ft" row; KD from the baseline with ``--kd``), then scored on the val subset and on the first
``--test-images`` test images. The baseline is scored on the same splits, raw and after the same fine-tune: the
public weights lose ~10 points on the JPEG pixels until fine-tuned (SOURCE.md), so the fine-tuned baseline is the
fair reference for the fine-tuned rows. ``--start adapted`` (default) starts from the JPEG-adapted checkpoint that
benchmarks/adapt_baselines.py writes (outside the repo); ``--start raw`` from the public weights, which
``--adapt-steps`` can fine-tune first. VGG-16 has no public CIFAR checkpoint here: train one with
``slimsearch train vgg16 --data cifar10 --root <archive> --epochs 30 --out <file> --device cuda`` (hours on CPU).

Run from the repo root (CPU only):
  python benchmarks/bench_methods.py --models resnet20 --val-images 500 --bn-batches 4 --finetune-steps 50 \
      --test-images 2000 --ga-pop 10 --ga-generations 5
Writes benchmarks/results/methods_<model>.json and regenerates benchmarks/results/methods.md from every
methods_*.json there. This is a CPU smoke-scale budget, not the papers' 100-300 fine-tuning epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.cost import count_cost  # noqa: E402
from slimsearch.core.data import DataSplits, batches, load_splits  # noqa: E402
from slimsearch.core.models import build_model, load_checkpoint  # noqa: E402
from slimsearch.core.policy import Policy  # noqa: E402
from slimsearch.core.train import FinetuneConfig, finetune, recalibrate_bn  # noqa: E402
from slimsearch.core.train import evaluate as accuracy  # noqa: E402
from slimsearch.evaluators.cache import ResultCache  # noqa: E402
from slimsearch.evaluators.config import EvaluatorConfig  # noqa: E402
from slimsearch.evaluators.context import EvalContext, build_context  # noqa: E402
from slimsearch.evaluators.evaluate import evaluate  # noqa: E402
from slimsearch.search.methods import run_method  # noqa: E402
from slimsearch.search.methods.common import as_accuracy  # noqa: E402

from benchmarks.common import CHECKPOINTS, SHAPE, load_adapted, run_script, stratified_subset  # noqa: E402

# What the papers report (METHODS.md / seeds/). None of them is on ResNet-20/56, so these are context, not targets.
PAPER = {
    "abshpc": "VGG-16 / AlexNet, CIFAR-10; n/a (abstract gives no figures)",
    "mtd": "VGG-11 32x, VGG-16 37x params compression, <1% acc drop (CIFAR-10)",
    "ga": "VGG: 8x params, 3x FLOPs, acc better than original (CIFAR-10/SVHN)",
    "distfit": "ResNet-110: >62% FLOPs reduction, 0.14% relative acc drop (CIFAR-10)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--methods", default="abshpc,mtd,ga,distfit")
    p.add_argument("--val-images", type=int, default=500, help="val subset the proxy scores on")
    p.add_argument("--bn-batches", type=int, default=4, help="BN recalibration batches of the proxy")
    p.add_argument("--finetune-steps", type=int, default=50, help="final fine-tune, same for every row")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument(
        "--start",
        choices=("adapted", "raw"),
        default="adapted",
        help="adapted: the checkpoint of benchmarks/adapt_baselines.py; raw: the public weights",
    )
    p.add_argument("--adapt-steps", type=int, default=0, help="fine-tune the baseline on the JPEGs first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01, help="final fine-tune lr (cosine)")
    p.add_argument("--kd", action="store_true", help="final fine-tune with KD from the baseline")
    p.add_argument("--abshpc-epsilon", type=float, default=0.005)
    p.add_argument("--mtd-tol", type=float, default=0.01)
    p.add_argument("--mtd-rank-ratio", type=float, default=None, help="CP/Tucker rank ratio (default: EVBMF)")
    p.add_argument("--abshpc-resolution", type=float, default=None, help="stop a layer's bisection at this rate gap")
    p.add_argument("--ga-pop", type=int, default=10)
    p.add_argument("--ga-generations", type=int, default=5)
    p.add_argument("--ga-tol", type=float, default=0.01)
    p.add_argument("--distfit-rate", type=float, default=None, help="uniform rate (default: sensitivity scan)")
    p.add_argument("--distfit-tol", type=float, default=0.01)
    p.add_argument("--scan-rates", default="0.2,0.4,0.6,0.8", help="sensitivity-scan rates of ga and distfit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    default_shared = os.environ.get("SLIMSEARCH_SHARED") or str(Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--shared", default=default_shared, help="folder with models/ and data/ ($SLIMSEARCH_SHARED)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def first(ds: Any, n: int) -> Any:
    """A class-balanced ``n``-image subset (val is stored classes interleaved; test class by class)."""
    return stratified_subset(ds, n)


def cost_row(base: Any, model: torch.nn.Module) -> dict[str, float]:
    c = count_cost(model, SHAPE)
    return {
        "macs": c.macs,
        "params": c.params,
        "macs_compression": base.macs / c.macs,
        "params_compression": base.params / c.params,
        "macs_reduction_pct": 100.0 * (1 - c.macs / base.macs),
    }


def finish(ctx: EvalContext, model: torch.nn.Module, test: Any, args: argparse.Namespace) -> dict[str, float]:
    """BN recalibration + the final fine-tune (in place), then val-subset and test-subset accuracy."""
    t = time.perf_counter()
    recalibrate_bn(model, ctx.splits.train, num_batches=args.bn_batches, batch_size=args.batch_size, seed=args.seed)
    pre = accuracy(model, ctx.splits.val)
    if args.finetune_steps > 0:
        cfg = FinetuneConfig(steps=args.finetune_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        finetune(model, ctx.splits.train, cfg, teacher=ctx.model if args.kd else None)
    model.eval()
    return {
        "val_acc_before_ft": pre,
        "val_acc": accuracy(model, ctx.splits.val),
        "test_acc": accuracy(model, test),
        "finetune_s": time.perf_counter() - t,
    }


def method_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    scan = tuple(float(r) for r in args.scan_rates.split(","))
    if name == "abshpc":
        return {"epsilon": args.abshpc_epsilon, "rate_resolution": args.abshpc_resolution}
    if name == "mtd":
        r = args.mtd_rank_ratio
        return {"tol": args.mtd_tol, "cp_rank": r, "tucker_ranks": r}
    if name == "ga":
        return {"pop": args.ga_pop, "generations": args.ga_generations, "tol": args.ga_tol, "scan_rates": scan,
                "seed": args.seed}  # fmt: skip
    if args.distfit_rate is not None:
        return {"rates": args.distfit_rate}
    return {"tol": args.distfit_tol, "scan_rates": scan}


def run_one(name: str, ctx: EvalContext, test: Any, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    ectx = dataclasses.replace(ctx, cache=ResultCache())  # fresh cache: calls and time are this method's own
    cfg = EvaluatorConfig(kind="proxy", bn_batches=args.bn_batches, batch_size=args.batch_size, seed=args.seed)
    calls = 0

    def acc(policy: Policy) -> float:
        nonlocal calls
        calls += 1
        return as_accuracy(evaluate(ectx, cfg, policy))

    inputs = None
    if name == "ga":
        inputs, _ = next(iter(batches(ctx.splits.train, 256, shuffle=True, seed=args.seed)))
    opts = method_options(name, args)
    t = time.perf_counter()
    res = run_method(name, model=ctx.model, acc=acc, inputs=inputs if inputs is not None else torch.zeros(SHAPE),
                     **opts)  # fmt: skip
    search_s = time.perf_counter() - t
    log(f"  {name}: search {search_s:.0f} s, {calls} evaluator calls")
    model = apply_policy(ctx.model, res.policy, input_shape=SHAPE, seed=args.seed)
    row = {"method": name, "search_s": search_s, "evaluator_calls": calls, "options": opts}
    row["proxy_val_acc"] = as_accuracy(evaluate(ectx, cfg, res.policy))
    row.update(cost_row(ctx.base, model))
    row.update(finish(ctx, model, test, args))
    row["wall_s"] = search_s + row["finetune_s"]
    row["paper"] = PAPER[name]
    row["policy"] = res.policy.to_dict()
    row["report"] = json.loads(json.dumps(res.report, default=str))
    return row


def run_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    shared = Path(args.shared)
    t = time.perf_counter()
    splits = load_splits("cifar10", root=shared / "data" / "cifar10-jpeg.tar.gz", val_size=5000, seed=0)
    log(f"data loaded in {time.perf_counter() - t:.0f} s")
    sub = DataSplits(splits.train, first(splits.val, args.val_images), None)
    test = first(splits.test, args.test_images)
    raw_model = load_checkpoint(build_model(name), shared / "models" / CHECKPOINTS[name]).eval()
    rows = []
    raw = {"val_acc": accuracy(raw_model, sub.val), "test_acc": accuracy(raw_model, test)}
    base_model = load_adapted(name) if args.start == "adapted" else raw_model
    if args.adapt_steps > 0:
        cfg = FinetuneConfig(steps=args.adapt_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        finetune(base_model, splits.train, cfg)
        base_model.eval()
    ctx = build_context(base_model, sub, SHAPE, score_baseline=True)
    base_row = {"method": "baseline", "val_acc": ctx.base_val_acc, "test_acc": accuracy(base_model, test),
                "raw_checkpoint": raw, "evaluator_calls": 0, "search_s": 0.0, "wall_s": 0.0, "paper": ""}  # fmt: skip
    base_row.update(cost_row(ctx.base, base_model))
    rows.append(base_row)
    ft = apply_policy(base_model, Policy(), input_shape=SHAPE)
    ft_row = {"method": "baseline+ft", "evaluator_calls": 0, "search_s": 0.0, "paper": ""}
    ft_row.update(cost_row(ctx.base, ft))
    ft_row.update(finish(ctx, ft, test, args))
    ft_row["wall_s"] = ft_row["finetune_s"]
    rows.append(ft_row)
    log(f"{name}: baseline val {base_row['val_acc']:.4f} test {base_row['test_acc']:.4f}; "
        f"+ft val {ft_row['val_acc']:.4f} test {ft_row['test_acc']:.4f}")  # fmt: skip
    for m in [m for m in args.methods.split(",") if m]:
        rows.append(run_one(m, ctx, test, args, log))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "shared", "models", "methods")}
    return {
        "model": name,
        "checkpoint": CHECKPOINTS[name],
        "data": "cifar10-jpeg.tar.gz (JPEG pixels; numbers not comparable with published CIFAR-10 tables)",
        "splits": {"train": len(splits.train.y), "val_subset": len(sub.val.y), "test_subset": len(test.y)},
        "settings": settings,
        "budget_note": "CPU smoke-scale budget, not the papers' 100-300 fine-tuning epochs",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


COLUMNS = ["method", "val_acc", "test_acc", "macs", "params", "macs_compression", "params_compression",
           "evaluator_calls", "wall_s"]  # fmt: skip


def table(result: dict) -> Any:
    import pandas as pd

    return pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in result["rows"]])


def a0_note(result: dict) -> str:
    """The proxy's a0 (baseline after BN recalibration on the JPEG train images) from the methods' reports."""
    a0 = next((r["report"]["a0"] for r in result["rows"] if "a0" in r.get("report", {})), None)
    return "" if a0 is None else f" Proxy a0 (baseline, BN recalibrated, val subset): {100 * a0:.2f} %."


def markdown(results: list[dict]) -> str:
    lines = ["# Reproduction table: the four methods on the public CIFAR ResNets", "",
             "Generated by `benchmarks/bench_methods.py` from `methods_*.json`; do not edit by hand.", "",
             "**Budget: CPU smoke scale, NOT the papers' 100-300 fine-tuning epochs.** Data: the CIFAR-10 JPEG "
             "archive (JPEG pixels; the public weights lose ~10 points on it until fine-tuned), so numbers are "
             "comparable with each other, not with published CIFAR-10 tables. None of the papers reports "
             "ResNet-20/56; their figures are for other networks and are given as context.", ""]  # fmt: skip
    for res in results:
        s = res["settings"]
        lines += [f"## {res['model']} ({res['date']})", "",
                  f"val subset {res['splits']['val_subset']} images, BN recalibration {s['bn_batches']}x"
                  f"{s['batch_size']} images (proxy acc for the searches); final fine-tune {s['finetune_steps']} "
                  f"steps x {s['batch_size']} (lr {s['lr']}, KD {s['kd']}) for every row but `baseline`; "
                  f"test subset {res['splits']['test_subset']} images; start {s.get('start', 'raw')} checkpoint, "
                  f"adapt steps {s['adapt_steps']}; "
                  f"ABSHPC eps {s['abshpc_epsilon']}, MTD tol {s['mtd_tol']} ranks "
                  f"{s.get('mtd_rank_ratio') or 'EVBMF'}, GA pop {s['ga_pop']} gens "
                  f"{s['ga_generations']} tol {s['ga_tol']}, distfit "
                  f"{'rate ' + str(s['distfit_rate']) if s['distfit_rate'] is not None else 'scan tol ' + str(s['distfit_tol'])}"
                  f", scan rates {s['scan_rates']}. Machine: {res['machine']['cpus']} CPUs, load "
                  f"{res['machine']['loadavg'][0]:.1f}.", "",
                  "| method | val acc % | test acc % | MACs (M) | params (M) | MACs x | params x | evaluator calls "
                  "| wall s | paper reports |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in res["rows"]:
            lines.append(
                f"| {r['method']} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} | {r['macs'] / 1e6:.2f} | "
                f"{r['params'] / 1e6:.3f} | {r['macs_compression']:.2f} | {r['params_compression']:.2f} | "
                f"{r['evaluator_calls']} | {r['wall_s']:.0f} | {r['paper']} |"
            )
        raw = res["rows"][0].get("raw_checkpoint", {})
        if raw:
            lines += ["", f"Raw public checkpoint on these subsets: val {100 * raw['val_acc']:.2f} %, "
                          f"test {100 * raw['test_acc']:.2f} %. `baseline` = the model the methods start from "
                          "(no fine-tune); `baseline+ft` = the same final fine-tune as the method rows." + a0_note(res)]  # fmt: skip
        lines.append("")
    lines += ["MACs x / params x = original / compressed (whole model, per image). Accuracies after the final "
              "fine-tune; wall s = search + final fine-tune on this machine.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import pandas as pd

    for name in [m for m in args.models.split(",") if m]:
        if name not in CHECKPOINTS:
            raise SystemExit(f"--models: no public checkpoint for {name!r}; known: {', '.join(CHECKPOINTS)}")
        t = time.perf_counter()
        res = run_model(name, args, log)
        res["total_s"] = time.perf_counter() - t
        (out / f"methods_{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(table(res).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        log(f"{name}: total {res['total_s']:.0f} s")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("methods_*.json"))]
    (out / "methods.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    run_script(main)
