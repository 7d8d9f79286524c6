"""Benchmark: cost of apply_policy + count_cost on ResNet-56, and measured CPU speed-up vs MACs reduction.

Part 1: median over N runs of apply_policy(all prunable layers at 0.5, l1) + count_cost, with the
dependency graph already cached (its one-off build time is reported separately). Each run is timed twice:
wall clock (time.perf_counter) and CPU time of the process (time.process_time), because on a shared
machine the wall clock mostly measures the other jobs; os.getloadavg() before and after is recorded.
Part 2: CPU latency (core.cost.measure_latency) at batch 1 and 64 of the original and of compressed models
(uniform pruning 0.3/0.5/0.7 of every prunable layer, Tucker-2 on every 3x3 conv but the stem, and pruning
0.5 + Tucker), against their MACs reduction: the eager modules and their frozen TorchScript exports.
``--rounds 0`` skips part 2.

CPU (the numbers in results/): nice -n 5 python benchmarks/bench_apply.py --threads 1
GPU machine: the same command; both parts are CPU measurements by design (apply_policy/count_cost run on
the CPU in a search, and part 2 is the CPU speed-up), so there is no --device flag.
Writes benchmarks/results/apply_speed.json and the generated benchmarks/results/apply_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.cost import count_cost, measure_latency  # noqa: E402
from slimsearch.core.decompose import default_cache  # noqa: E402
from slimsearch.core.export import export_model, load_exported  # noqa: E402
from slimsearch.core.graph import compressible_layers, model_graph  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402

SHAPE = (1, 3, 32, 32)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def uniform(model: torch.nn.Module, rate: float, tucker: float | None = None) -> Policy:
    layers = {}
    for li in compressible_layers(model):
        lp = LayerPolicy(prune_rate=rate if li.prunable else 0.0)
        if tucker is not None and li.decomposable and li.in_channels > 3:
            lp = LayerPolicy(prune_rate=lp.prune_rate, decomposition="tucker", rank_ratio=tucker)
        if not lp.is_identity:
            layers[li.name] = lp
    return Policy(layers)


def time_apply(model: torch.nn.Module, policy: Policy, runs: int, build: float) -> dict[str, object]:
    """Wall and CPU medians of apply_policy, count_cost and their sum (two untimed warm-up runs first)."""
    for _ in range(2):
        count_cost(apply_policy(model, policy), SHAPE)
    wall: dict[str, list[float]] = {"apply": [], "cost": [], "total": []}
    cpu: dict[str, list[float]] = {"apply": [], "cost": [], "total": []}
    load_before = os.getloadavg()
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        new = apply_policy(model, policy)
        w1, c1 = time.perf_counter(), time.process_time()
        count_cost(new, SHAPE)
        w2, c2 = time.perf_counter(), time.process_time()
        for store, (a, b, c) in ((wall, (w0, w1, w2)), (cpu, (c0, c1, c2))):
            store["apply"].append(b - a)
            store["cost"].append(c - b)
            store["total"].append(c - a)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {
        "graph_build_ms_once": round(1000 * build, 1),
        "median_apply_plus_cost_ms": ms(wall["total"]),
        "median_apply_ms": ms(wall["apply"]),
        "median_count_cost_ms": ms(wall["cost"]),
        "min_apply_plus_cost_ms": round(1000 * min(wall["total"]), 2),
        "cpu_median_apply_plus_cost_ms": ms(cpu["total"]),
        "cpu_median_apply_ms": ms(cpu["apply"]),
        "cpu_median_count_cost_ms": ms(cpu["cost"]),
        "cpu_min_apply_plus_cost_ms": round(1000 * min(cpu["total"]), 2),
        "runs": runs,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def latency_rows(model: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, object]]:
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
        log(f"built {label!r}: {cost.macs / 1e6:.2f} M MACs")
    # The frozen TorchScript export (core.export format "torchscript-frozen": BN folded), reloaded as a user would.
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        frozen = {
            label: load_exported(
                export_model(
                    models[label],
                    policies[label],
                    Path(tmp) / str(i),
                    formats=("torchscript-frozen",),
                    example_input=SHAPE,
                )["torchscript-frozen"]
            )
            for i, label in enumerate(models)
        }
    programs = {(label, "eager"): m for label, m in models.items()} | {(k, "frozen"): f for k, f in frozen.items()}
    # The machine is shared: measure round-robin so load drift hits every model alike, and report the
    # minimum over rounds of each round's median (least disturbed) next to the median over rounds.
    b1: dict[tuple[str, str], list[float]] = {k: [] for k in programs}
    b64: dict[tuple[str, str], list[float]] = {k: [] for k in programs}
    t_rounds = time.perf_counter()
    for r in range(args.rounds):
        for key, m in programs.items():
            b1[key].append(
                measure_latency(m, SHAPE, 1, threads=args.threads, repeats=args.repeats_b1, warmup=3).median_ms
            )
            b64[key].append(
                measure_latency(m, SHAPE, 64, threads=args.threads, repeats=args.repeats_b64, warmup=1).median_ms
            )
        per_round = (time.perf_counter() - t_rounds) / (r + 1)
        log(f"latency round {r + 1}/{args.rounds} done, ETA {per_round * (args.rounds - r - 1):.0f} s")
    base = rows[0]
    for row in rows:
        label = row["policy"]
        for kind, prefix in (("eager", "latency"), ("frozen", "frozen")):
            row[f"{prefix}_b1_ms"] = round(min(b1[label, kind]), 3)
            row[f"{prefix}_b1_median_of_rounds_ms"] = round(statistics.median(b1[label, kind]), 3)
            row[f"{prefix}_b64_ms"] = round(min(b64[label, kind]), 2)
            row[f"{prefix}_b64_median_of_rounds_ms"] = round(statistics.median(b64[label, kind]), 2)
        row["macs_reduction_x"] = round(base["macs"] / row["macs"], 3)
        row["params_reduction_x"] = round(base["params"] / row["params"], 3)
        for prefix, tag in (("latency", "speedup"), ("frozen", "frozen_speedup")):
            row[f"{tag}_b1_x"] = round(base[f"{prefix}_b1_ms"] / row[f"{prefix}_b1_ms"], 3)
            row[f"{tag}_b64_x"] = round(base[f"{prefix}_b64_ms"] / row[f"{prefix}_b64_ms"], 3)
    return rows


def markdown(result: dict) -> str:
    """The generated table (results/apply_speed.md)."""
    t = result["apply_timing"]
    lines = [
        "# apply_policy + count_cost speed, CPU latency vs MACs (generated by benchmarks/bench_apply.py)",
        "",
        f"ResNet-56, random weights, {result['threads']} thread(s), {result['machine']['cpus']} CPUs, "
        f"torch {result['machine']['torch']}; load average before/after part 1: {t['loadavg_before']} / "
        f"{t['loadavg_after']}.",
        "",
        f"Part 1: prune 0.5 (l1) on every prunable layer, median of {t['runs']} runs "
        f"(graph built once in {t['graph_build_ms_once']} ms).",
        "",
        "| | apply_policy ms | count_cost ms | apply + cost ms | min apply + cost ms |",
        "|---|---|---|---|---|",
        f"| wall (perf_counter) | {t['median_apply_ms']} | {t['median_count_cost_ms']} | "
        f"{t['median_apply_plus_cost_ms']} | {t['min_apply_plus_cost_ms']} |",
        f"| CPU (process_time) | {t['cpu_median_apply_ms']} | {t['cpu_median_count_cost_ms']} | "
        f"{t['cpu_median_apply_plus_cost_ms']} | {t['cpu_min_apply_plus_cost_ms']} |",
    ]
    if result["latency"]:
        lines += [
            "",
            f"Part 2: latency ({result['latency_method']}, {result['rounds']} rounds).",
            "",
            "Eager: the `nn.Module` apply_policy returns. Frozen: its `torchscript-frozen` export (BN folded into the",
            "convs), reloaded; x = the original's time / this row's time, each within its own column.",
            "",
            "| policy | MACs M | MACs x | params K | b1 ms | b1 x | b64 ms | b64 x | frozen b1 ms | b1 x | frozen b64 ms "
            "| b64 x |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["latency"]:
            lines.append(
                f"| {r['policy']} | {r['macs'] / 1e6:.2f} | {r['macs_reduction_x']:.2f} | {r['params'] / 1e3:.1f} | "
                f"{r['latency_b1_ms']:.2f} | {r['speedup_b1_x']:.2f} | {r['latency_b64_ms']:.1f} | "
                f"{r['speedup_b64_x']:.2f} | {r['frozen_b1_ms']:.2f} | {r['frozen_speedup_b1_x']:.2f} | "
                f"{r['frozen_b64_ms']:.1f} | {r['frozen_speedup_b64_x']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (0: skip part 2)")
    ap.add_argument("--repeats-b1", type=int, default=20)
    ap.add_argument("--repeats-b64", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "apply_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    model = build_model("resnet56").eval()
    t0 = time.perf_counter()
    model_graph(model, SHAPE)  # traced once per architecture, then cached
    build = time.perf_counter() - t0
    log(f"graph built in {build:.1f} s; timing apply_policy + count_cost ({args.runs} runs)")
    apply_timing = time_apply(model, uniform(model, 0.5), args.runs, build)
    log(
        f"ResNet-56, prune 0.5 l1 on all {sum(li.prunable for li in compressible_layers(model))} prunable layers: "
        f"apply+count_cost median wall {apply_timing['median_apply_plus_cost_ms']} ms "
        f"(apply {apply_timing['median_apply_ms']}, count_cost {apply_timing['median_count_cost_ms']}), "
        f"CPU {apply_timing['cpu_median_apply_plus_cost_ms']} ms (apply {apply_timing['cpu_median_apply_ms']}, "
        f"count_cost {apply_timing['cpu_median_count_cost_ms']}); load {apply_timing['loadavg_before']}"
    )
    rows = latency_rows(model, args) if args.rounds > 0 else []
    if rows:
        header = (
            f"{'policy':<24}{'MACs M':>9}{'MACs x':>8}{'params K':>10}{'b1 ms':>9}{'b1 x':>7}{'b64 ms':>9}{'b64 x':>7}"
        )
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
        "threads": args.threads,
        "latency_method": "min over rounds of per-round medians (round-robin over models)",
        "rounds": args.rounds,
        "run_s": round(time.perf_counter() - T0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2) + "\n"), (out.with_suffix(".md"), markdown(result))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
