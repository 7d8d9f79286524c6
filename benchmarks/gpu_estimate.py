"""Expected seconds per trial on one GPU, from the code: FLOPs and op counts of a trial times stated GPU rates.

A ResNet-56 trial of studies/resnet56_cifar10.toml (finetune evaluator: BN recalibration on ``bn_batches``
batches, ``steps`` KD steps at ``batch_size``, then ``val_size`` validation images) on a candidate at the study's
MACs bound (``fit = "fill"`` lands every trial there). Counted, not timed, on the CPU:

* FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` around the code a trial runs (``core.train.finetune``
  with the KD teacher, ``recalibrate_bn``, ``evaluate``), at a small batch and scaled linearly to the real one;
* aten ops dispatched (a ``TorchDispatchMode`` counter) per training step, per recalibration batch and per
  validation batch: eager PyTorch pays a roughly fixed host cost per op however small the kernel. SGD is
  counted with ``foreach=True``, its default for CUDA parameters (one op per tensor list, not per tensor).

Each phase takes max(FLOPs / throughput, ops x per-op cost) (the host queues kernels while the GPU runs
earlier ones), plus the CPU work a trial does before training (apply_policy + count_cost: ``--cpu-ms``, from
benchmarks/results/apply_speed.json). The GPU rates are assumptions, stated in the JSON: ``--tflops`` is the
effective throughput of these thin 16-64-channel convolutions at batch 128 (a few % of a modern GPU's dense
peak), ``--op-us`` the host cost of one eager op. Writes benchmarks/results/gpu_estimate.json.

  python benchmarks/gpu_estimate.py [--tflops 20] [--op-us 10]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.budget import fit_macs  # noqa: E402
from slimsearch.core.cost import count_cost  # noqa: E402
from slimsearch.core.data import load_synthetic  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402
from slimsearch.core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn  # noqa: E402
from slimsearch.evaluators.config import EvaluatorConfig  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SHAPE = (1, 3, 32, 32)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def counted(fn: Callable[[], object]) -> tuple[int, int]:
    """(FLOPs, aten ops) of ``fn()``."""
    flops, ops = FlopCounterMode(display=False), OpCounter()
    with flops, ops:
        fn()
    return int(flops.get_total_flops()), ops.ops


def per_unit(fn: Callable[[int], object], a: int = 1, b: int = 2) -> tuple[float, float]:
    """FLOPs and ops of one more unit (step, batch): ``fn(b) - fn(a)`` over ``b - a``, so setup cancels out."""
    fa, oa = counted(lambda: fn(a))
    fb, ob = counted(lambda: fn(b))
    return (fb - fa) / (b - a), (ob - oa) / (b - a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=REPO / "studies" / "resnet56_cifar10.toml")
    p.add_argument("--tflops", type=float, default=20.0, help="assumed effective GPU throughput, TFLOP/s")
    p.add_argument("--op-us", type=float, default=10.0, help="assumed host cost of one eager op, microseconds")
    p.add_argument("--cpu-ms", type=float, default=None,
                   help="CPU ms per trial before training (default: apply + cost of ResNet-56 from apply_speed.json)")  # fmt: skip
    p.add_argument("--probe-batch", type=int, default=4, help="batch the FLOPs are counted at (scaled linearly)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_estimate.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    raw = tomllib.loads(a.study.read_text())
    ev = EvaluatorConfig.from_dict(raw.get("evaluator", {}))
    ratio = float(raw.get("constraint", {}).get("max_macs_ratio", 1.0))
    val_size = int(raw.get("data", {}).get("val_size", 5000))
    factory = raw["model"]["factory"]
    if a.cpu_ms is None:
        rows = json.loads((REPO / "benchmarks" / "results" / "apply_speed.json").read_text())
        a.cpu_ms = float(_apply_cost_ms(rows))

    torch.manual_seed(0)
    base = build_model(factory).eval()
    first_convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and n.endswith(".conv1")]
    base_macs = count_cost(base, SHAPE).macs
    policy, _ = fit_macs(base, Policy({n: LayerPolicy(prune_rate=0.5) for n in first_convs}), ratio * base_macs,
                         SHAPE, max_rate=0.8, fill=True)  # fmt: skip
    cand = apply_policy(base, policy, input_shape=SHAPE)
    cand_macs = count_cost(cand, SHAPE).macs
    pb = a.probe_batch
    ds = load_synthetic(n=64, num_classes=10, size=32, channels=3)
    teacher = base if ev.kd else None

    sgd = torch.optim.SGD
    torch.optim.SGD = functools.partial(sgd, foreach=True)  # what core.train gets for CUDA parameters

    def train(steps: int) -> None:
        finetune(cand, ds, FinetuneConfig(steps=steps, batch_size=pb, lr=ev.lr, seed=0, augment=True), teacher=teacher)

    try:
        step_flops, step_ops = per_unit(train)
    finally:
        torch.optim.SGD = sgd
    recal_flops, recal_ops = per_unit(lambda n: recalibrate_bn(cand, ds, num_batches=n, batch_size=pb))
    val_flops, val_ops = per_unit(lambda n: evaluate(cand, ds.subset(torch.arange(n * pb)), batch_size=pb))
    scale = ev.batch_size / pb
    vb = ev.val_batch_size
    phases = {
        "finetune": {"units": ev.steps, "flops": step_flops * scale, "ops": step_ops},
        "bn_recalibration": {"units": ev.bn_batches, "flops": recal_flops * scale, "ops": recal_ops},
        "validation": {"units": -(-val_size // vb), "flops": val_flops * vb / pb, "ops": val_ops},
    }
    total = a.cpu_ms / 1000
    for ph in phases.values():
        ph["compute_s"] = ph["units"] * ph["flops"] / (a.tflops * 1e12)
        ph["host_s"] = ph["units"] * ph["ops"] * a.op_us * 1e-6
        ph["s"] = max(ph["compute_s"], ph["host_s"])
        ph["bound"] = "compute" if ph["compute_s"] >= ph["host_s"] else "host (per-op overhead)"
        total += ph["s"]
    out = {
        "script": "benchmarks/gpu_estimate.py",
        "study": str(a.study.relative_to(REPO)) if a.study.is_relative_to(REPO) else str(a.study),
        "model": factory,
        "evaluator": {
            "kind": ev.kind,
            "steps": ev.steps,
            "batch_size": ev.batch_size,
            "kd": ev.kd,
            "bn_batches": ev.bn_batches,
            "val_size": val_size,
            "val_batch_size": vb,
        },  # fmt: skip
        "base_macs": base_macs,
        "candidate_macs": cand_macs,
        "candidate_macs_ratio": cand_macs / base_macs,
        "assumptions": {
            "effective_tflops": a.tflops,
            "host_us_per_op": a.op_us,
            "cpu_ms_per_trial": a.cpu_ms,
            "note": "stated GPU rates, not measurements; FLOPs and op counts are counted from the code",
        },  # fmt: skip
        "flops_counted_at_batch": pb,
        "phases": phases,
        "expected_s_per_trial": total,
        "expected_trials_per_h_one_worker": 3600 / total,
        "torch": torch.__version__,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, ph in phases.items():
        print(f"{name:17} {ph['units']:4} x {ph['flops'] / 1e9:7.2f} GFLOP, {ph['ops']:6.0f} ops -> "
              f"{ph['s'] * 1000:7.1f} ms ({ph['bound']})")  # fmt: skip
    print(f"expected {total:.2f} s per trial ({3600 / total:.0f} trials/h per worker) at {a.tflops:g} TFLOP/s and "
          f"{a.op_us:g} us/op, + {a.cpu_ms:.0f} ms CPU; wrote {a.out}")  # fmt: skip
    return 0


def _apply_cost_ms(data: Any) -> float:
    """Median wall ms of apply_policy + count_cost of ResNet-56 at prune 0.5 (bench_apply.py's part 1)."""
    try:
        return float(data["apply_timing"]["median_apply_plus_cost_ms"])
    except (KeyError, TypeError):
        raise SystemExit("benchmarks/results/apply_speed.json: no apply + cost time found; pass --cpu-ms") from None


if __name__ == "__main__":
    sys.exit(main())
