"""Expected GPU wall time of ``bench_budget.py --device cuda`` for a protocol's [gpu] section, from the code.

Issue 22 asks for a GPU version of the budget protocol that fits in 9 minutes of one H100. No GPU was lent to
measure it, so its size is set from this estimate, built like gpu_estimate.py's per-trial one: FLOPs
(``FlopCounterMode``, counted at a small batch and scaled linearly) and eager aten ops (a dispatch counter) of one
training step, one BN-recalibration batch and one evaluation batch, on the unpruned model and on a candidate at
each cell's MACs budget, turned into seconds by two stated rates (``--tflops`` effective throughput, ``--op-us``
host cost per op; a phase costs the larger of the two). The counts are multiplied by what every row of the cell
runs (benchmarks/bench_budget.py): the final fine-tune (its steps, the two BN recalibrations, the variant
evaluations, the test pass), each search's trials (evaluator steps, BN batches, search-val pass, CPU apply + fit),
the rerank, and the equal-compute row's extra steps; plus ``--startup-s`` once (CUDA context, data decode and
upload). ResNet-20's cells share one baseline+ft row (budget-free rows run once).

  python benchmarks/gpu_budget_estimate.py [--protocol benchmarks/protocol.toml] [--tflops 20] [--op-us 10]

Writes benchmarks/results/gpu_budget_estimate.json. These are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.budget import fit_macs  # noqa: E402
from slimsearch.core.cost import count_cost  # noqa: E402
from slimsearch.core.data import load_synthetic  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402
from slimsearch.core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn, total_steps  # noqa: E402

from benchmarks import budget_lib as L  # noqa: E402
from benchmarks.bench_budget import recipe  # noqa: E402
from benchmarks.gpu_estimate import per_unit  # noqa: E402

SHAPE = (1, 3, 32, 32)
TRAIN, VAL_BATCH = 50_000, 512  # CIFAR-10 train images; bench_budget's evaluation batch (per_image)
LIMIT_S = 9 * 60  # issue 22: the GPU protocol within 9 minutes of one H100


def unit_costs(
    model: torch.nn.Module, batch: int, kd: bool, amp: str, probe: int = 4
) -> dict[str, tuple[float, float]]:
    """(FLOPs, ops) of one training step at ``batch``, one BN batch at ``batch``, one evaluation batch of 512."""
    ds = load_synthetic(n=64, num_classes=10, size=32, channels=3)
    teacher = model if kd else None
    sgd = torch.optim.SGD
    torch.optim.SGD = functools.partial(sgd, foreach=True)  # what core.train gets for CUDA parameters
    try:
        step = per_unit(
            lambda n: finetune(model, ds, FinetuneConfig(steps=n, batch_size=probe, amp=amp), teacher=teacher)
        )
    finally:
        torch.optim.SGD = sgd
    bn = per_unit(lambda n: recalibrate_bn(model, ds, num_batches=n, batch_size=probe))
    val = per_unit(lambda n: evaluate(model, ds.subset(torch.arange(n * probe)), batch_size=probe))
    return {"step": (step[0] * batch / probe, step[1]), "bn": (bn[0] * batch / probe, bn[1]),
            "val": (val[0] * VAL_BATCH / probe, val[1])}  # fmt: skip


def seconds(cost: tuple[float, float], units: float, tflops: float, op_us: float) -> float:
    flops, ops = cost
    return units * max(flops / (tflops * 1e12), ops * op_us * 1e-6)


def candidate(base: torch.nn.Module, budget: float) -> torch.nn.Module:
    """A network at ``budget`` of the base MACs (the blocks' first convs pruned, fitted onto it)."""
    first = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and n.endswith(".conv1")]
    policy, _ = fit_macs(base, Policy({n: LayerPolicy(prune_rate=0.5) for n in first}),
                         budget * count_cost(base, SHAPE).macs, SHAPE, max_rate=0.9, fill=True)  # fmt: skip
    return apply_policy(base, policy, input_shape=SHAPE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", type=Path, default=REPO / "benchmarks" / "protocol.toml")
    p.add_argument("--tflops", type=float, default=20.0, help="assumed effective GPU throughput, TFLOP/s")
    p.add_argument("--op-us", type=float, default=10.0, help="assumed host cost of one eager op, microseconds")
    p.add_argument("--cpu-ms", type=float, default=60.0, help="CPU ms per trial (apply + fit + cost)")
    p.add_argument("--startup-s", type=float, default=60.0, help="once: CUDA context, data decode and upload")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_budget_estimate.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    proto = L.load_protocol(a.protocol)
    rec, f, s = recipe(proto, True), proto["finetune"], proto["search"]
    final_steps = {e: total_steps(FinetuneConfig(epochs=e, batch_size=rec.batch_size), TRAIN)
                   for _, _, e in L.gpu_cells(proto)}  # fmt: skip
    n_val, n_search = int(proto["data"]["val_size"]), int(s["val_images"])
    n_test = 10_000 - n_val
    sec = functools.partial(seconds, tflops=a.tflops, op_us=a.op_us)
    cells, total, costs, done_ft = [], a.startup_s, {}, set()
    for model, budget, epochs in L.gpu_cells(proto):
        torch.manual_seed(0)
        base = build_model(model).eval()
        if model not in costs:
            costs[model] = unit_costs(base, rec.batch_size, bool(f["kd"]), rec.amp)
        cand = unit_costs(candidate(base, budget), rec.batch_size, bool(f["kd"]), rec.amp)
        steps = final_steps[epochs]

        def final(c: dict[str, tuple[float, float]], extra: int = 0, steps: int = steps) -> float:
            passes = 3 * math.ceil(n_val / VAL_BATCH) + math.ceil(n_test / VAL_BATCH)  # start, ft, ft+bn; test
            return sec(c["step"], steps + extra) + sec(c["bn"], 2 * f["bn_batches"]) + sec(c["val"], passes)

        trial = (sec(cand["step"], s["evaluator_steps"]) + sec(cand["bn"], s["bn_batches"])
                 + sec(cand["val"], math.ceil(n_search / VAL_BATCH)) + a.cpu_ms / 1000)  # fmt: skip
        rerank_steps = round(float(s["rerank_fraction"]) * steps) if int(s["rerank"]) > 1 else 0
        rerank = int(s["rerank"]) * (sec(cand["step"], rerank_steps) + sec(cand["val"], math.ceil((n_val - n_search) / VAL_BATCH))) if rerank_steps else 0.0  # fmt: skip
        seeds = len(proto["models"][model]["search_seeds"])
        search_cost_steps = int(s["n_trials"]) * int(s["evaluator_steps"]) + int(s["rerank"]) * rerank_steps
        rows = {"baseline": sec(costs[model]["val"], math.ceil((n_val + n_test) / VAL_BATCH)),
                "baseline+ft": 0.0 if model in done_ft else final(costs[model]),
                "baselines": len(proto["baselines"]["rows"]) * final(cand),
                "slimsearch": seeds * (int(s["n_trials"]) * trial + rerank + final(cand)),
                "tp_global_eqc": final(cand, extra=search_cost_steps)}  # fmt: skip
        done_ft.add(model)
        cell_s = sum(rows.values())
        total += cell_s
        cells.append({"cell": L.cell_name(model, budget, epochs) + "-gpu", "final_steps": steps, "rows_s": rows,
                      "cell_s": cell_s, "step_ms": 1000 * sec(cand["step"], 1)})  # fmt: skip
    out = {"script": "benchmarks/gpu_budget_estimate.py", "protocol_version": proto["version"],
           "gpu": proto["gpu"], "recipe": {"batch_size": rec.batch_size, "lr": rec.lr, "evaluator_lr": rec.eval_lr,
           "amp": rec.amp}, "assumptions": {"effective_tflops": a.tflops, "host_us_per_op": a.op_us,
           "cpu_ms_per_trial": a.cpu_ms, "startup_s": a.startup_s,
           "note": "stated GPU rates, not measurements; FLOPs and op counts are counted from the code"},
           "cells": cells, "expected_s": total, "limit_s": LIMIT_S, "fits": total <= LIMIT_S,
           "torch": torch.__version__, "written": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    for c in cells:
        print(f"{c['cell']:24} {c['final_steps']:5} final steps, {c['step_ms']:5.1f} ms/step -> {c['cell_s']:6.0f} s  "
              + ", ".join(f"{k} {v:.0f}" for k, v in c["rows_s"].items()))  # fmt: skip
    print(f"expected {total:.0f} s ({total / 60:.1f} min) for {len(cells)} cell(s) at {a.tflops:g} TFLOP/s and "
          f"{a.op_us:g} us/op (limit {LIMIT_S} s: {'fits' if total <= LIMIT_S else 'does NOT fit'}); wrote {a.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
