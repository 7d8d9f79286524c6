"""Benchmark: how well core.latency's table predicts the CPU latency of compressed models, against MACs.

For ``--policies`` random policies of a study's search space (``studies/<model>_cifar10.toml``'s ``[space]``),
each fitted onto ``--bound`` of the original MACs as a search trial's is, the latency table predicts the
latency at batch 1 and 64; every policy is then applied, exported to TorchScript (``core.export``), reloaded
and measured round-robin (``--rounds``, best median kept, 1 thread). Reported per model and batch size:
Spearman rho of the prediction and of the MACs (the usual proxy, the baseline here) against the measured
latency, the prediction's mean and worst relative error (and the error without the table's two-point
calibration), the table's build time and the prediction's cost.
Random weights: latency does not depend on them, so this needs no data and no checkpoint.

CPU (the numbers in results/): nice -n 5 python benchmarks/bench_latency.py --threads 1
GPU machine: the same command (CPU latency by design; there is no --device flag).
Writes benchmarks/results/latency_table.json and the generated latency_table.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.cost import measure_latency  # noqa: E402
from slimsearch.core.export import MEMORY_FORMATS, export_model, load_exported  # noqa: E402
from slimsearch.core.latency import LatencyTable  # noqa: E402
from slimsearch.core.macs import policy_macs  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import Policy  # noqa: E402
from slimsearch.spaces.config import SpaceConfig  # noqa: E402
from slimsearch.spaces.space import SearchSpace  # noqa: E402

from benchmarks.bench_proxy import sample_policies  # noqa: E402
from benchmarks.common import log, machine, write_results  # noqa: E402

SHAPE = (1, 3, 32, 32)
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--policies", type=int, default=20, help="random policies per model")
    p.add_argument("--bound", type=float, default=0.5, help="MACs bound the samples are fitted onto")
    p.add_argument("--batches", default="1,64", help="batch sizes")
    p.add_argument("--repeats-b1", type=int, default=20, help="timed forwards per measurement at batch 1")
    p.add_argument("--repeats-big", type=int, default=3, help="timed forwards per measurement at larger batches")
    p.add_argument("--rounds", type=int, default=3, help="round-robin measurement rounds (best median kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-format", default="contiguous", choices=tuple(MEMORY_FORMATS),
                   help="conv weight layout of the table's programs and of the exports ([export] memory_format)")  # fmt: skip
    p.add_argument("--runtime", default="torchscript", choices=("torchscript", "onnxruntime"),
                   help="what the table times and the exports are measured in ([export] runtime); onnxruntime: "
                        "the ONNX exports in ONNX Runtime sessions")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return p.parse_args(argv)


def policies_for(model: torch.nn.Module, name: str, args: argparse.Namespace) -> list[Policy]:
    """The study's [space] sampled at random, each sample fitted onto the MACs bound (as search trials)."""
    space_table = tomllib.loads((REPO / "studies" / f"{name}_cifar10.toml").read_text())["space"]
    space = SearchSpace.build(model, SpaceConfig.from_dict(space_table), SHAPE)
    base = policy_macs(model, Policy(), SHAPE)
    rows = sample_policies(model, space, args.policies, args.bound, base, args.seed, log, fit=True)
    return [Policy()] + [r["policy"] for r in rows]


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_model(name).eval()
    policies = policies_for(model, name, args)
    batches = [int(b) for b in args.batches.split(",")]
    tables: dict[int, LatencyTable] = {}
    build_s: dict[int, float] = {}
    for b in batches:
        t = time.perf_counter()
        tables[b] = LatencyTable(model, SHAPE, batch_size=b, threads=args.threads, memory_format=args.memory_format,
                                 mode=args.runtime)  # fmt: skip
        build_s[b] = time.perf_counter() - t
        log(f"{name} b{b}: table built in {build_s[b]:.1f} s (baseline {tables[b].base_ms:.2f} ms)")
    # Without calibration: the baseline minus its layers' own times, scale 1.
    rests = {b: t.base_ms - t.layers_ms(model, Policy()) for b, t in tables.items()}  # type: ignore[operator]
    predicted: dict[int, list[float]] = {b: [] for b in batches}
    uncalibrated: dict[int, list[float]] = {b: [] for b in batches}
    predict_s: dict[int, list[float]] = {b: [] for b in batches}
    macs, programs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for i, policy in enumerate(policies):
            for b in batches:
                t = time.perf_counter()
                predicted[b].append(float(tables[b].predict(model, policy)))  # type: ignore[arg-type]
                predict_s[b].append(time.perf_counter() - t)
                uncalibrated[b].append(rests[b] + tables[b].layers_ms(model, policy))  # type: ignore[operator]
            built = apply_policy(model, policy, input_shape=SHAPE)
            macs.append(policy_macs(model, policy, SHAPE))
            fmt = "onnx" if args.runtime == "onnxruntime" else "torchscript"
            path = export_model(built, policy, Path(tmp) / str(i), formats=(fmt,), example_input=SHAPE,
                                memory_format=args.memory_format)  # fmt: skip
            if fmt == "onnx":  # the exported file in an ORT session with the table's settings
                from slimsearch.core.onnx_export import OrtProgram, ort_session

                programs.append(OrtProgram(ort_session(path[fmt], args.threads)))
            else:
                programs.append(load_exported(path[fmt]))
            log(f"{name}: policy {i + 1}/{len(policies)} exported ({macs[-1] / macs[0]:.0%} MACs)")
    measured = {b: [float("inf")] * len(programs) for b in batches}
    t_rounds = time.perf_counter()
    for r in range(args.rounds):
        order = list(range(len(programs)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            for b in batches:
                reps = args.repeats_b1 if b == 1 else args.repeats_big
                ms = measure_latency(programs[i], SHAPE, b, threads=args.threads, repeats=reps, warmup=2).median_ms
                measured[b][i] = min(measured[b][i], ms)
        per = (time.perf_counter() - t_rounds) / (r + 1)
        log(f"{name}: latency round {r + 1}/{args.rounds}, ETA {per * (args.rounds - r - 1):.0f} s")
    rows = []
    for b in batches:
        pred, meas, unc = np.array(predicted[b]), np.array(measured[b]), np.array(uncalibrated[b])
        err, unc_err = pred / meas - 1.0, unc / meas - 1.0
        # Ratios to the baseline (row 0) are what a bound constrains.
        ratio_err = (pred / pred[0]) / (meas / meas[0]) - 1.0
        unc_ratio_err = (unc / unc[0]) / (meas / meas[0]) - 1.0
        cold = predict_s[b][1 : 1 + min(5, len(policies) - 1)]
        rows.append({
            "model": name, "batch": b, "policies": len(policies) - 1,
            "rho_table": float(spearmanr(pred[1:], meas[1:]).statistic),
            "rho_macs": float(spearmanr(macs[1:], meas[1:]).statistic),
            "mean_abs_err_pct": float(100 * np.mean(np.abs(err[1:]))),
            "max_abs_err_pct": float(100 * np.max(np.abs(err[1:]))),
            "mean_abs_ratio_err_pct": float(100 * np.mean(np.abs(ratio_err[1:]))),
            "mean_signed_ratio_err_pct": float(100 * np.mean(ratio_err[1:])),
            "uncalibrated_mean_abs_err_pct": float(100 * np.mean(np.abs(unc_err[1:]))),
            "uncalibrated_mean_signed_ratio_err_pct": float(100 * np.mean(unc_ratio_err[1:])),
            "uncalibrated_ms": [round(x, 3) for x in unc.tolist()], "scale": tables[b].scale,
            "measured_ms": [round(x, 3) for x in meas.tolist()], "predicted_ms": [round(x, 3) for x in pred.tolist()],
            "macs": macs, "table_build_s": build_s[b], "table_shapes": tables[b].size,
            "predict_ms_first5": 1000 * statistics.mean(cold) if cold else 0.0,
            "predict_ms_median": 1000 * statistics.median(predict_s[b][1:]),
            "base_ms": tables[b].base_ms, "other_ms": tables[b].other_ms,
        })  # fmt: skip
    return {"model": name, "rows": rows, "policies": [p.to_json() for p in policies]}


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# Latency table: predicted vs measured CPU latency (generated by benchmarks/bench_latency.py)",
        "",
        f"{a['policies']} random policies per model from its study's [space], fitted onto {a['bound']:.0%} of the "
        f"MACs; {'ONNX exports in ONNX Runtime' if a.get('runtime') == 'onnxruntime' else 'TorchScript exports'} "
        f"({a.get('memory_format', 'contiguous')} weights), {a['threads']} thread(s), best median of {a['rounds']} round-robin rounds. "
        f"rho: Spearman against the measured latency (the prediction's, and the MACs' as the usual proxy). "
        f"Errors relative to the measured latency; ratio error: of latency / baseline latency, what a bound "
        f"constrains. Machine: {result['machine']['cpus']} CPUs, load {result['machine']['loadavg'][0]:.1f}, "
        f"{result['machine']['date']}; whole run {result['wall_s'] / 60:.1f} min.",
        "",
        "| model | batch | rho table | rho MACs | mean abs err % | max abs err % | ratio err % (signed) | "
        "uncalibrated: abs err % / signed ratio err % | scale | measured ms (min-max) | table build s | shapes timed "
        "| predict ms (first 5 / median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for r in m["rows"]:
            meas = r["measured_ms"][1:]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['rho_table']:.2f} | {r['rho_macs']:.2f} | "
                f"{r['mean_abs_err_pct']:.1f} | {r['max_abs_err_pct']:.1f} | {r['mean_abs_ratio_err_pct']:.1f} "
                f"({r['mean_signed_ratio_err_pct']:+.1f}) | {r['uncalibrated_mean_abs_err_pct']:.1f} / "
                f"{r['uncalibrated_mean_signed_ratio_err_pct']:+.1f} | {r['scale']:.3f} | {min(meas):.2f}-{max(meas):.2f} | {r['table_build_s']:.1f} | {r['table_shapes']} | "
                f"{r['predict_ms_first5']:.0f} / {r['predict_ms_median']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = [run_model(name, args) for name in args.models.split(",") if name.strip()]
    result = {"args": vars(args), "machine": machine(), "models": models, "wall_s": time.perf_counter() - t0}
    stem = "latency_table" + ("" if args.memory_format == "contiguous" else f"_{args.memory_format}")
    stem += "" if args.runtime == "torchscript" else f"_{args.runtime}"
    write_results(Path(args.out), stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
