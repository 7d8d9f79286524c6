"""Proxy fidelity (issue #6 item 3): does an evaluator's cheap score rank policies like their final accuracy?

For ``--policies`` random feasible policies of the real search space (the ``[space]`` table of
``--study``, default studies/<model>_cifar10.toml; an Optuna RandomSampler asks ``SearchSpace.suggest``; a
policy is kept when its MACs are <= ``--bound`` x the baseline's, duplicates dropped) this script scores
each policy with every evaluator exactly as a search trial does (``evaluators.evaluate.evaluate``, no
cache): "proxy" (BN recalibration on ``--bn-batches`` train batches, then accuracy) and "finetune" at each
of ``--ft-steps``, all on the same ``--val-size`` images of the 5k val split (seeded subset). Each policy
then gets the same final fine-tune (``--final-steps`` x ``--final-batch-size``, lr ``--final-lr`` cosine,
the evaluator code path with kind "finetune") scored on ``--final-size`` images of the 10k TEST split,
which neither the evaluators nor the adapted checkpoint have seen. Per evaluator: Spearman rho between its
scores and the final accuracies (bootstrap 95 % CI over policies), regret@1 (final accuracy lost by
picking the evaluator's best policy) and seconds per trial; the default is the cheapest evaluator with
rho >= ``--threshold``. "macs" (rank by MACs, no evaluation) is a reference row, never the default.

The model starts from the JPEG-adapted checkpoint (benchmarks/adapt_baselines.py; ``--raw`` for the public
weights while developing). Run from the repo root:

  python benchmarks/bench_proxy.py                        # CPU default, ~35 min at 1 thread
  python benchmarks/bench_proxy.py --model resnet56 --device cuda --threads 8 --policies 50 \\
      --ft-steps 10,30,100,300 --batch-size 128 --val-size 5000 --final-steps 3000 --final-batch-size 128 \\
      --final-size 10000 --kd --final-kd                  # GPU scale

Writes benchmarks/results/proxy_<model>.json and proxy_<model>.md (``--tag`` appends a suffix) and prints
the table. CPU defaults are a small budget (the final fine-tune is a fraction of an epoch), not the export's
fine-tune of several epochs: the numbers say how well short evaluators predict a longer fine-tune.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "macs"  # ranking by -MACs: what an evaluator must beat to be worth its cost


# ----------------------------------------------------------------------------- statistics (pure)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(np.asarray(a, float)) == 0 or np.ptp(np.asarray(b, float)) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of Spearman rho, resampling the (a, b) pairs; resamples with a constant side
    are dropped (their rho is undefined)."""
    from scipy.stats import rankdata

    x, y = np.asarray(a, float), np.asarray(b, float)
    idx = np.random.default_rng(seed).integers(0, len(x), (n, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)  # average ranks per resample
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    ok = den > 0
    if not ok.any():
        return float("nan"), float("nan")
    rhos = (rx * ry).sum(axis=1)[ok] / den[ok]
    lo, hi = np.quantile(rhos, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def regret_at_1(scores: Sequence[float], final: Sequence[float]) -> float:
    """Best final accuracy minus the final accuracy of the policy the evaluator scores highest."""
    return float(max(final) - final[int(np.argmax(np.asarray(scores, float)))])


def choose_default(rows: Sequence[dict[str, Any]], threshold: float = 0.8) -> dict[str, Any] | None:
    """The cheapest (mean seconds per trial) evaluator row with ``rho >= threshold``; reference rows
    (``"reference": True``) never qualify. None when no evaluator reaches the threshold."""
    ok = [r for r in rows if not r.get("reference") and np.isfinite(r["rho"]) and r["rho"] >= threshold]
    return min(ok, key=lambda r: r["mean_s"], default=None)


def summarise(records: Sequence[dict[str, Any]], names: Sequence[str], *, threshold: float, boot: int,
              seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """One row per evaluator (plus the MACs reference): rho vs the final accuracy, CI, regret@1, cost."""
    final = [r["final"]["acc"] for r in records]
    rows = []
    for name in [*names, REFERENCE]:
        if name == REFERENCE:
            scores = [-r["macs_ratio"] for r in records]
            secs = [r["sample_s"] for r in records]
        else:
            scores = [r["scores"][name]["val_acc"] for r in records]
            secs = [r["scores"][name]["seconds"] for r in records]
        rho = spearman(scores, final)
        lo, hi = bootstrap_ci(scores, final, boot, seed) if boot else (float("nan"), float("nan"))
        rows.append({"evaluator": name, "reference": name == REFERENCE, "rho": rho, "ci_low": lo, "ci_high": hi,
                     "regret_at_1": regret_at_1(scores, final), "mean_s": float(np.mean(secs)),
                     "median_s": float(np.median(secs)), "mean_score": float(np.mean(scores))})  # fmt: skip
    best = choose_default(rows, threshold)
    for r in rows:
        r["chosen"] = best is not None and r["evaluator"] == best["evaluator"]
    return rows


# ----------------------------------------------------------------------------- experiment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.common import adapted_dir, shared_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument(
        "--study", type=Path, help="study file whose [space] is sampled (default studies/<model>_cifar10.toml)"
    )
    p.add_argument("--policies", type=int, default=30, help="random feasible policies")
    p.add_argument("--bound", type=float, default=0.5, help="feasible: MACs <= bound x baseline MACs")
    p.add_argument("--fit", action="store_true", help="scale samples over the bound onto it (as search trials)")
    p.add_argument("--ft-steps", default="5,15", help="comma-separated step counts of the finetune evaluators")
    p.add_argument("--batch-size", type=int, default=64, help="evaluators' batch size (BN recalibration too)")
    p.add_argument("--lr", type=float, default=0.01, help="evaluators' fine-tune peak lr (cosine)")
    p.add_argument("--bn-batches", type=int, default=10, help="BN recalibration batches (every evaluator)")
    p.add_argument("--kd", action="store_true", help="evaluators' fine-tune distils from the baseline")
    p.add_argument("--val-size", type=int, default=1000, help="images of the 5k val split the evaluators score on")
    p.add_argument("--final-steps", type=int, default=50)
    p.add_argument("--final-batch-size", type=int, default=64)
    p.add_argument("--final-lr", type=float, default=0.01)
    p.add_argument("--final-kd", action="store_true")
    p.add_argument("--final-size", type=int, default=2000, help="images of the 10k test split for the final score")
    p.add_argument("--threshold", type=float, default=0.8, help="rho a default evaluator must reach")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CI (0: none)")
    p.add_argument("--seed", type=int, default=0, help="sampler, subsets and every fine-tune")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--raw", action="store_true", help="public checkpoint instead of the adapted one (development)")
    p.add_argument("--shared", default=shared_root(), help="folder with models/ and data/ ($SLIMSEARCH_SHARED)")
    p.add_argument("--ckpt-dir", default=str(adapted_dir()), help="adapted checkpoints ($SLIMSEARCH_ADAPTED)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files (proxy_<model><tag>.json)")
    return p.parse_args(argv)


def evaluator_configs(args: argparse.Namespace) -> dict[str, Any]:
    """name -> EvaluatorConfig: "proxy" and "finetune-<steps>" for each ``--ft-steps``."""
    from slimsearch.evaluators.config import EvaluatorConfig

    common = {"batch_size": args.batch_size, "bn_batches": args.bn_batches, "seed": args.seed}
    cfgs = {"proxy": EvaluatorConfig(kind="proxy", **common)}
    for s in (int(v) for v in args.ft_steps.split(",") if v.strip()):
        cfgs[f"finetune-{s}"] = EvaluatorConfig(kind="finetune", steps=s, lr=args.lr, kd=args.kd, **common)
    return cfgs


def sample_policies(model: Any, space: Any, n: int, bound: float, base_macs: float, seed: int,
                    log: Callable[[str], None], fit: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """``n`` distinct random policies with MACs <= bound x base_macs: rejection sampling from the space, or with
    ``fit`` every sample over the bound scaled onto it as a search trial's is (``[constraint] fit = "scale"``)."""
    import optuna
    from slimsearch.core.budget import fit_macs, policy_macs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    tried = 0
    while len(out) < n:
        if tried > 200 * n:
            raise SystemExit(f"only {len(out)} feasible policies in {tried} samples; raise --bound")
        trial = study.ask()
        policy = space.suggest(trial)
        tried += 1
        t = time.perf_counter()
        if fit:
            policy, _ = fit_macs(model, policy, bound * base_macs, (1, 3, 32, 32), max_rate=space.cfg.prune_rate[1])
        ratio = policy_macs(model, policy, (1, 3, 32, 32)) / base_macs  # shapes only: no factorising
        if ratio > bound or policy.hash in seen:
            continue
        seen.add(policy.hash)
        rates = [lp.prune_rate for lp in policy.layers.values()]
        decs = sum(lp.decomposition != "none" for lp in policy.layers.values())
        out.append({"index": len(out), "policy": policy, "params": dict(trial.params), "macs_ratio": ratio,
                    "mean_rate": float(np.mean(rates)), "decomposed": int(decs),
                    "sample_s": time.perf_counter() - t})  # fmt: skip
    log(f"sampled {tried} policies, kept {n} feasible (MACs {min(r['macs_ratio'] for r in out):.0%}.."
        f"{max(r['macs_ratio'] for r in out):.0%} of the baseline)")  # fmt: skip
    return out


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Sample, score with every evaluator and the final fine-tune, summarise."""
    import torch
    from slimsearch.core.data import DataSplits
    from slimsearch.core.models import build_model, load_checkpoint
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.evaluators.context import build_context
    from slimsearch.evaluators.evaluate import evaluate
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    from benchmarks.common import CHECKPOINTS, SHAPE, load_adapted, load_cifar, machine

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    study = args.study or REPO / "studies" / f"{args.model}_cifar10.toml"
    space_table = tomllib.loads(Path(study).read_text())["space"]
    splits = load_cifar(args.shared, log)
    if args.raw:
        model = load_checkpoint(build_model(args.model), Path(args.shared) / "models" / CHECKPOINTS[args.model])
    else:
        model = load_adapted(args.model, args.ckpt_dir)
    model = model.to(args.device).eval()
    g = torch.Generator().manual_seed(args.seed)
    val = splits.val.subset(torch.randperm(len(splits.val), generator=g)[: args.val_size])
    final_set = splits.test.subset(torch.randperm(len(splits.test), generator=g)[: args.final_size])
    # The final score goes through the evaluator too, with the test subset in the role of val.
    ctx = build_context(model, DataSplits(splits.train, val, None), SHAPE, max_macs_ratio=args.bound, cache=None)
    final_ctx = build_context(model, DataSplits(splits.train, final_set, None), SHAPE, max_macs_ratio=args.bound,
                              cache=None)  # fmt: skip
    space = SearchSpace.build(model, SpaceConfig.from_dict(space_table), SHAPE)
    log(f"{args.model} ({'raw' if args.raw else 'adapted'}): val subset {len(val)} acc {ctx.base_val_acc:.4f}, "
        f"final set (test) {len(final_set)} acc {final_ctx.base_val_acc:.4f}; space {space.summary()}")  # fmt: skip
    policies = sample_policies(model, space, args.policies, args.bound, ctx.base.macs, args.seed, log, args.fit)
    cfgs = evaluator_configs(args)
    final_cfg = EvaluatorConfig(kind="finetune", steps=args.final_steps, batch_size=args.final_batch_size,
                                lr=args.final_lr, kd=args.final_kd, bn_batches=args.bn_batches, seed=args.seed)  # fmt: skip
    records = []
    t_loop = time.perf_counter()
    for i, item in enumerate(policies):
        policy = item.pop("policy")
        rec = {**item, "policy": json.loads(policy.to_json()), "scores": {}}
        for name, cfg in cfgs.items():
            t = time.perf_counter()
            res = evaluate(ctx, cfg, policy, cache=None)
            if not res.ok:
                raise SystemExit(f"policy {i} {name}: {res.status} {res.reason}")
            rec["scores"][name] = {"val_acc": res.metrics["val_acc"], "seconds": time.perf_counter() - t,
                                   **{k: res.metrics[k] for k in ("apply_s", "cost_s", "train_s", "eval_s")}}  # fmt: skip
        t = time.perf_counter()
        res = evaluate(final_ctx, final_cfg, policy, cache=None)
        if not res.ok:
            raise SystemExit(f"policy {i} final: {res.status} {res.reason}")
        rec["final"] = {"acc": res.metrics["val_acc"], "seconds": time.perf_counter() - t}
        records.append(rec)
        done = time.perf_counter() - t_loop
        eta = done / (i + 1) * (len(policies) - i - 1)
        scores = " ".join(f"{n} {s['val_acc']:.3f} ({s['seconds']:.0f}s)" for n, s in rec["scores"].items())
        log(f"policy {i + 1}/{len(policies)} MACs {rec['macs_ratio']:.0%}: {scores}; final {rec['final']['acc']:.3f} "
            f"({rec['final']['seconds']:.0f}s); ETA {eta / 60:.1f} min")  # fmt: skip
    rows = summarise(records, list(cfgs), threshold=args.threshold, boot=args.bootstrap, seed=args.seed)
    default = EvaluatorConfig()
    chosen = next((r["evaluator"] for r in rows if r["chosen"]), None)
    default_name = "proxy" if default.kind == "proxy" else f"finetune-{default.steps}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "shared", "ckpt_dir")}  # fmt: skip
    settings["study"] = (
        str(Path(study).resolve().relative_to(REPO)) if REPO in Path(study).resolve().parents else str(study)
    )
    return {
        "settings": settings,
        "checkpoint": "raw" if args.raw else "adapted",
        "evaluator_configs": {n: c.to_dict() for n, c in cfgs.items()},
        "final_config": final_cfg.to_dict(),
        "sets": {
            "train": len(splits.train),
            "evaluator_val": f"{len(val)} of the {len(splits.val)} val images",
            "final": f"{len(final_set)} of the {len(splits.test)} test images",
        },  # fmt: skip
        "baseline": {
            "val_acc": ctx.base_val_acc,
            "final_set_acc": final_ctx.base_val_acc,
            "macs": int(ctx.base.macs),
        },  # fmt: skip
        "rows": rows,
        "chosen": chosen,
        "config_default": {"name": default_name, **asdict(default)},
        "chosen_matches_config_default": chosen == default_name,
        "policies": records,
        "wall_s": time.perf_counter() - t_start,
        "machine": machine(),
    }


# ----------------------------------------------------------------------------- output


def table(result: dict[str, Any]) -> str:
    """Markdown table of the per-evaluator rows (generated from the JSON)."""
    s = result["settings"]
    lines = [
        f"Proxy fidelity, {s['model']} ({result['checkpoint']} checkpoint), {len(result['policies'])} random "
        f"policies with MACs <= {s['bound']:.0%}; evaluators on {result['sets']['evaluator_val']}, final "
        f"fine-tune {s['final_steps']} steps x {s['final_batch_size']} (lr {s['final_lr']} cosine"
        f"{', KD' if s['final_kd'] else ''}) scored on {result['sets']['final']}.",
        "",
        "| evaluator | Spearman rho | 95 % CI | regret@1 (pt) | s / trial | chosen |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in result["rows"]:
        name = f"{r['evaluator']} (reference, no evaluation)" if r["reference"] else r["evaluator"]
        ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if np.isfinite(r["ci_low"]) else "-"
        lines.append(f"| {name} | {r['rho']:.3f} | {ci} | {100 * r['regret_at_1']:.1f} | {r['mean_s']:.1f} | "
                     f"{'yes' if r['chosen'] else ''} |")  # fmt: skip
    chosen = result["chosen"] or f"none (no evaluator reached rho >= {s['threshold']})"
    lines += ["", f"Default (cheapest with rho >= {s['threshold']}): {chosen}; EvaluatorConfig's default is "
              f"{result['config_default']['name']}. Run took {result['wall_s'] / 60:.1f} min "
              f"({result['machine']['threads']} thread(s), loadavg at the end {result['machine']['loadavg'][0]:.1f})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import log, write_results

    args = parse_args(argv)

    result = run(args, log)
    write_results(args.out, f"proxy_{args.model}{args.tag}", result, table(result))
    return 0


if __name__ == "__main__":
    from benchmarks.common import run_script

    run_script(main)
