"""Probe: why pruned ResNets gain less in ONNX Runtime than their MACs promise (issue 25).

For the networks bench_runtime.py times (baseline, Torch-Pruning's allocation, uniform, the committed searches,
the first search rounded to 8 and 16), this counts what ONNX Runtime's optimiser makes of each ONNX export:
blocked (NCHWc) convs, plain convs and layout reorders (``ReorderInput`` / ``ReorderOutput``) in the optimised
graph, and times each at batch 1, 1 thread, with all optimisations (ORT_ENABLE_ALL, what our sessions use) and
without the layout ones (ORT_ENABLE_EXTENDED), best median of ``--rounds`` alternating rounds. Random weights.

  python benchmarks/probe_ort_nchwc.py --models resnet56     # results/ort_nchwc.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.macs import policy_macs  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.onnx_export import onnx_bytes, require_onnx  # noqa: E402
from slimsearch.core.policy import Policy  # noqa: E402

from benchmarks.bench_runtime import networks_for  # noqa: E402
from benchmarks.common import SHAPE, log, machine, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("all", "extended")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--stem", default="ort_nchwc")
    return p.parse_args(argv)


def session(data: bytes, level: str, optimized: str | None = None) -> Any:
    onnx, ort = require_onnx()
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]  # fmt: skip
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def graph_ops(data: bytes) -> dict[str, int]:
    """Op counts of the graph ORT runs with all optimisations (domain:op)."""
    onnx, _ = require_onnx()
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "opt.onnx")
        session(data, "all", path)
        return dict(collections.Counter(f"{n.domain}:{n.op_type}" for n in onnx.load(path).graph.node))


def median_ms(s: Any, x: np.ndarray, repeats: int) -> float:
    name = s.get_inputs()[0].name
    for _ in range(10):
        s.run(None, {name: x})
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, {name: x})
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(name).eval()
    nets = networks_for(name, argparse.Namespace(budget=0.5, round_to="8,16"), model)
    base_macs = policy_macs(model, Policy(), SHAPE)
    x = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    rows, sessions = [], {}
    for i, net in enumerate(nets):
        built = apply_policy(model, net["policy"], input_shape=SHAPE)
        data = onnx_bytes(built, torch.randn(SHAPE))
        ops = graph_ops(data)
        rows.append({"label": net["label"], "macs_ratio": policy_macs(model, net["policy"], SHAPE) / base_macs,
                     "nchwc_convs": ops.get("com.microsoft.nchwc:Conv", 0),
                     "plain_convs": ops.get(":Conv", 0) + ops.get("com.microsoft:FusedConv", 0),
                     "reorders": ops.get("com.microsoft.nchwc:ReorderInput", 0)
                     + ops.get("com.microsoft.nchwc:ReorderOutput", 0),
                     "channels": sorted({int(m.out_channels) for m in built.modules()
                                         if isinstance(m, torch.nn.Conv2d)}), "ops": ops})  # fmt: skip
        for level in LEVELS:
            sessions[(i, level)] = session(data, level)
    best = {k: float("inf") for k in sessions}
    for r in range(args.rounds):
        for k in list(sessions)[:: 1 if r % 2 == 0 else -1]:
            best[k] = min(best[k], median_ms(sessions[k], x, args.repeats))
        log(f"{name}: round {r + 1}/{args.rounds}")
    for i, row in enumerate(rows):
        for level in LEVELS:
            row[f"ms_{level}"] = best[(i, level)]
            row[f"export_speedup_{level}"] = best[(0, level)] / best[(i, level)] * row["macs_ratio"]
    return {"model": name, "networks": rows}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# ONNX Runtime's blocked convs and layout reorders (generated by benchmarks/probe_ort_nchwc.py)", "",
             f"Batch 1, 1 thread, best median of {result['args']['rounds']} alternating rounds; {m['cpus']} CPUs, load "
             f"{m['loadavg'][0]:.1f}, {m['date']}. all: ORT_ENABLE_ALL (NCHWc layouts); extended: without them.", "",
             "| model | network | MACs % | NCHWc convs | plain convs | reorders | all: ms / export speed-up | "
             "extended: ms / export speed-up |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mod in result["models"]:
        for r in mod["networks"]:
            lines.append(f"| {mod['model']} | {r['label']} | {100 * r['macs_ratio']:.1f} | {r['nchwc_convs']} | "
                         f"{r['plain_convs']} | {r['reorders']} | {r['ms_all']:.3f} / {r['export_speedup_all']:.2f} | "
                         f"{r['ms_extended']:.3f} / {r['export_speedup_extended']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    models = [run_model(n.strip(), args) for n in args.models.split(",") if n.strip()]
    result = {"args": vars(args), "models": models, "machine": machine()}
    write_results(Path(args.out), args.stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
