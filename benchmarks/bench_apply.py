"""Benchmark: cost of apply_policy + count_cost on ResNet-56, and measured CPU speed-up vs MACs reduction.

Part 1: median over N runs of apply_policy(all prunable layers at 0.5, l1) + count_cost, with the
dependency graph already cached (its one-off build time is reported separately).
Part 2: CPU latency (core.cost.measure_latency, threads=1) at batch 1 and 64 of the original and of
compressed models (uniform pruning 0.3/0.5/0.7 of every prunable layer, Tucker-2 on every 3x3 conv but
the stem, and pruning 0.5 + Tucker), against their MACs reduction.
Run from the repo root: python benchmarks/bench_apply.py [--runs 20] [--rounds 5]
Writes benchmarks/results/apply_speed.json. Timings depend on the machine's load, which is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.apply import apply_policy  # noqa: E402
from core.cost import count_cost, measure_latency  # noqa: E402
from core.decompose import default_cache  # noqa: E402
from core.graph import compressible_layers, model_graph  # noqa: E402
from core.models import build_model  # noqa: E402
from core.policy import LayerPolicy, Policy  # noqa: E402

SHAPE = (1, 3, 32, 32)


def uniform(model: torch.nn.Module, rate: float, tucker: float | None = None) -> Policy:
    layers = {}
    for li in compressible_layers(model):
        lp = LayerPolicy(prune_rate=rate if li.prunable else 0.0)
        if tucker is not None and li.decomposable and li.in_channels > 3:
            lp = LayerPolicy(prune_rate=lp.prune_rate, decomposition="tucker", rank_ratio=tucker)
        if not lp.is_identity:
            layers[li.name] = lp
    return Policy(layers)


def time_apply(model: torch.nn.Module, policy: Policy, runs: int, build: float) -> dict[str, float]:
    total, applies, costs = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        new = apply_policy(model, policy)
        t1 = time.perf_counter()
        count_cost(new, SHAPE)
        t2 = time.perf_counter()
        applies.append(t1 - t0)
        costs.append(t2 - t1)
        total.append(t2 - t0)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {
        "graph_build_ms_once": round(1000 * build, 1),
        "median_apply_plus_cost_ms": ms(total),
        "median_apply_ms": ms(applies),
        "median_count_cost_ms": ms(costs),
        "min_apply_plus_cost_ms": round(1000 * min(total), 2),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats-b1", type=int, default=20)
    ap.add_argument("--repeats-b64", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "apply_speed.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    model = build_model("resnet56").eval()
    t0 = time.perf_counter()
    model_graph(model, SHAPE)  # traced once per architecture, then cached
    build = time.perf_counter() - t0
    apply_timing = time_apply(model, uniform(model, 0.5), args.runs, build)
    print(
        f"ResNet-56, prune 0.5 l1 on all {sum(li.prunable for li in compressible_layers(model))} prunable layers: "
        f"apply+count_cost median {apply_timing['median_apply_plus_cost_ms']} ms "
        f"(apply {apply_timing['median_apply_ms']} ms, count_cost {apply_timing['median_count_cost_ms']} ms; "
        f"graph build once {apply_timing['graph_build_ms_once']} ms)"
    )
    policies = {
        "original": Policy(),
        "prune 0.3": uniform(model, 0.3),
        "prune 0.5": uniform(model, 0.5),
        "prune 0.7": uniform(model, 0.7),
        "tucker 0.5": uniform(model, 0.0, tucker=0.5),
        "prune 0.5 + tucker 0.5": uniform(model, 0.5, tucker=0.5),
    }
    cache = default_cache()
    models, rows = {}, []
    for label, policy in policies.items():
        t0 = time.perf_counter()
        models[label] = apply_policy(model, policy, cache=cache)
        cost = count_cost(models[label], SHAPE)
        rows.append(
            {"policy": label, "macs": cost.macs, "params": cost.params, "apply_s": round(time.perf_counter() - t0, 2)}
        )
    # The machine is shared: measure round-robin so load drift hits every model alike, and report the
    # minimum over rounds of each round's median (least disturbed) next to the median over rounds.
    b1: dict[str, list[float]] = {k: [] for k in models}
    b64: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for label, m in models.items():
            b1[label].append(measure_latency(m, SHAPE, 1, threads=1, repeats=args.repeats_b1, warmup=3).median_ms)
            b64[label].append(measure_latency(m, SHAPE, 64, threads=1, repeats=args.repeats_b64, warmup=1).median_ms)
    base = rows[0]
    for row in rows:
        label = row["policy"]
        row["latency_b1_ms"] = round(min(b1[label]), 3)
        row["latency_b1_median_of_rounds_ms"] = round(statistics.median(b1[label]), 3)
        row["latency_b64_ms"] = round(min(b64[label]), 2)
        row["latency_b64_median_of_rounds_ms"] = round(statistics.median(b64[label]), 2)
        row["macs_reduction_x"] = round(base["macs"] / row["macs"], 3)
        row["params_reduction_x"] = round(base["params"] / row["params"], 3)
        row["speedup_b1_x"] = round(base["latency_b1_ms"] / row["latency_b1_ms"], 3)
        row["speedup_b64_x"] = round(base["latency_b64_ms"] / row["latency_b64_ms"], 3)
    header = f"{'policy':<24}{'MACs M':>9}{'MACs x':>8}{'params K':>10}{'b1 ms':>9}{'b1 x':>7}{'b64 ms':>9}{'b64 x':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['policy']:<24}{r['macs'] / 1e6:>9.2f}{r['macs_reduction_x']:>8.2f}{r['params'] / 1e3:>10.1f}"
            f"{r['latency_b1_ms']:>9.2f}{r['speedup_b1_x']:>7.2f}{r['latency_b64_ms']:>9.1f}{r['speedup_b64_x']:>7.2f}"
        )
    result = {
        "model": "resnet56",
        "input_shape": list(SHAPE),
        "apply_timing": apply_timing,
        "latency": rows,
        "threads": 1,
        "latency_method": "min over rounds of per-round medians (round-robin over models)",
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
