"""Benchmark: measured latency of compressed ResNets in TorchScript, TorchScript-frozen and ONNX Runtime, the export
speed-up per runtime, channel rounding (round_to) at equal MACs, and optionally a search under an ORT latency bound.

Networks per model (``--models``): the baseline; the committed ``results/compare_<model>.json`` networks at the
``--budget`` MACs bound: Torch-Pruning's global allocation (``tp_alloc_l1``: tp_global's kept-filter counts),
uniform pruning (``fpgm``: one rate everywhere) and every slimsearch search's exported policy; and the first
search's policy rounded to ``--round-to`` N (``core.rounding``) and fitted back onto its own MACs (the fit a search
does with ``[space] round_to``). A model without a compare JSON (smallcnn, the toy test) gets a uniform 50 %
policy. Random weights: latency does not depend on them. Each network is timed as the TorchScript program,
the frozen TorchScript program (BN folded) and an ONNX Runtime session of its ONNX export (graph optimisations
on, ``--threads`` intra-op threads) at every ``--batches`` size, in ``--rounds`` alternating rounds (best median
kept, so every program sees the same machine load). Export speed-up = (baseline ms / network ms) x (network
MACs / baseline MACs): 1.0 when time falls as fast as MACs.

``--accuracy N``: proxy val accuracy (BN recalibrated on 20 train batches, N val images) of every network with the
public checkpoint (``../shared/models``), so round_to's accuracy cost at equal MACs is measured too.
``--search-study PATH[,PATH]``: runs each study (``slimsearch run``) and exports its best trial (``slimsearch
export``), and records what the export measured: speed-up in the study's runtime and the latency bound checked on the
export (the ResNet-56 target: ORT speed-up >= 0.8 at batch 1, bound met).

CPU: nice -n 5 python benchmarks/bench_runtime.py --models resnet20,resnet56 --accuracy 1000
Writes benchmarks/results/runtime.json and the generated runtime.md (``--stem`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.budget import fit_cost, prunable_leaders  # noqa: E402
from slimsearch.core.cost import measure_latency  # noqa: E402
from slimsearch.core.errors import SlimError  # noqa: E402
from slimsearch.core.export import torchscript_program  # noqa: E402
from slimsearch.core.latency import timed_program  # noqa: E402
from slimsearch.core.macs import policy_macs  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402
from slimsearch.core.rounding import round_policy  # noqa: E402

from benchmarks.common import log, machine, shared_root, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("torchscript", "torchscript-frozen", "onnxruntime")
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--budget", type=float, default=0.5, help="MACs bound of the compare.json networks")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--round-to", default="8,16", help="N values of the rounded variants ('' for none)")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (best median kept)")
    p.add_argument("--repeats-b1", type=int, default=20)
    p.add_argument("--repeats-big", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accuracy", type=int, default=0, help="val images for the proxy accuracy (0: skip)")
    p.add_argument(
        "--search-study", default="", help="study files to run and export, comma-separated (ORT-bound searches)"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--stem", default="runtime")
    return p.parse_args(argv)


def shape_of(name: str) -> tuple[int, ...]:
    return (1, 1, 8, 8) if name == "smallcnn" else (1, 3, 32, 32)


def round_at_macs(model: torch.nn.Module, policy: Policy, n: int, shape: tuple[int, ...]) -> Policy:
    """``policy`` rounded to multiples of ``n`` and fitted (scaled harder or filled) onto its own MACs, as a
    search's fit does with ``[space] round_to``: the rounded network costs at most what the original does."""
    target = policy_macs(model, policy, shape)
    cost = lambda p: policy_macs(model, round_policy(model, p, n, shape), shape)  # noqa: E731
    fitted, _ = fit_cost(model, policy, cost, target, shape, fill=True)
    return round_policy(model, fitted, n, shape)


def networks_for(name: str, args: argparse.Namespace, model: torch.nn.Module) -> list[dict[str, Any]]:
    """(label, policy) of the networks to time: module docstring."""
    shape = shape_of(name)
    nets: list[dict[str, Any]] = [{"label": "baseline", "policy": Policy()}]
    path = REPO / "benchmarks" / "results" / f"compare_{name}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        rows = next(b["rows"] for b in data["budgets"] if abs(float(b["budget"]) - args.budget) < 1e-9)
        want = {"tp_alloc_l1": "tp_global (TP allocation)", "fpgm": "uniform (one rate)"}
        search = 0
        for r in rows:
            if r.get("policy") is None:
                continue
            if r["method"] in want:
                nets.append({"label": want.pop(r["method"]), "policy": Policy.from_dict(r["policy"])})
            elif r["method"] == "slimsearch":
                nets.append({"label": f"slimsearch #{search}", "policy": Policy.from_dict(r["policy"])})
                search += 1
    else:
        nets.append({"label": "uniform 50 %", "policy": Policy({n: LayerPolicy(prune_rate=0.5)
                                                                 for n in prunable_leaders(model, shape)})})  # fmt: skip
    source = next((n for n in nets if n["label"].startswith("slimsearch")), nets[-1])
    for n in [int(x) for x in args.round_to.split(",") if x.strip()]:
        nets.append({"label": f"{source['label']} round_to {n}", "policy": round_at_macs(model, source["policy"], n,
                                                                                          shape)})  # fmt: skip
    return nets


def programs_of(model: torch.nn.Module, shape: tuple[int, ...], threads: int) -> dict[str, Any]:
    return {"torchscript": torchscript_program(model, shape),
            "torchscript-frozen": torchscript_program(model, shape, frozen=True),
            "onnxruntime": timed_program(model, "onnxruntime", threads=threads, input_shape=shape)}  # fmt: skip


def proxy_accuracy(name: str, nets: list[dict[str, Any]], n_val: int) -> None:
    """Each network's val accuracy after BN recalibration (public checkpoint), in place as ``proxy_val_acc``."""
    from slimsearch.core.models import load_checkpoint
    from slimsearch.core.train import evaluate, recalibrate_bn

    from benchmarks.common import load_cifar, stratified_subset

    splits = load_cifar(shared_root(), log)
    val = stratified_subset(splits.val, n_val)
    base = load_checkpoint(build_model(name), Path(shared_root()) / "models" / CHECKPOINTS[name]).eval()
    for net in nets:
        m = apply_policy(base, net["policy"], input_shape=shape_of(name))
        if net["policy"].layers:
            recalibrate_bn(m, splits.train, num_batches=20, batch_size=128, seed=0)
        net["proxy_val_acc"] = evaluate(m.eval(), val)
        log(f"{name} {net['label']}: proxy val acc {net['proxy_val_acc']:.4f}")


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    shape = shape_of(name)
    model = build_model(name, in_channels=1 if name == "smallcnn" else None).eval()
    nets = networks_for(name, args, model)
    base_macs = policy_macs(model, Policy(), shape)
    programs: dict[tuple[int, str], Any] = {}
    for i, net in enumerate(nets):
        built = apply_policy(model, net["policy"], input_shape=shape)
        net["macs_ratio"] = policy_macs(model, net["policy"], shape) / base_macs
        for rt, prog in programs_of(built, shape, args.threads).items():
            programs[(i, rt)] = prog
        log(f"{name}: {net['label']} built ({net['macs_ratio']:.1%} MACs), {i + 1}/{len(nets)}")
    batches = [int(b) for b in args.batches.split(",")]
    best = {(k, b): float("inf") for k in programs for b in batches}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        keys = list(programs)[:: 1 if r % 2 == 0 else -1]
        for key in keys:
            for b in batches:
                reps = args.repeats_b1 if b == 1 else args.repeats_big
                ms = measure_latency(programs[key], shape, b, threads=args.threads, repeats=reps, warmup=2).median_ms
                best[(key, b)] = min(best[(key, b)], ms)
        per = (time.perf_counter() - t0) / (r + 1)
        log(f"{name}: round {r + 1}/{args.rounds}, ETA {per * (args.rounds - r - 1):.0f} s")
    for i, net in enumerate(nets):
        net["latency_ms"], net["speedup"], net["export_speedup"] = {}, {}, {}
        for rt in RUNTIMES:
            for b in batches:
                key = f"{rt}@{b}"
                ms, base_ms = best[((i, rt), b)], best[((0, rt), b)]
                net["latency_ms"][key] = ms
                net["speedup"][key] = base_ms / ms
                net["export_speedup"][key] = base_ms / ms * net["macs_ratio"]
    if args.accuracy > 0:
        proxy_accuracy(name, nets, args.accuracy)
    for net in nets:
        net["kept"] = {n: lp.prune_rate for n, lp in net["policy"].layers.items()}
        net["policy"] = net["policy"].to_dict()
    return {"model": name, "networks": nets, "batches": batches}


def run_search(path: str) -> dict[str, Any]:
    """Run and export the study at ``path`` (best trial); what the export measured."""
    from slimsearch.search.export import export_trial
    from slimsearch.search.runner import run_study
    from slimsearch.search.study import load_study

    cfg = load_study(path)
    t = time.perf_counter()
    run_study(cfg, progress=False, log=log)
    res = export_trial(cfg, "best", log=log)
    keys = ("trial", "val_acc", "test_acc", "macs_ratio", "latency_program", "latency_threads", "latency_ms_batch1",
            "base_latency_ms_batch1", "speedup_batch1", "export_speedup_batch1", "bound_latency_batch",
            "bound_latency_ratio", "max_latency_ratio", "bound_latency_met")  # fmt: skip
    out = {k: res.metrics.get(k) for k in keys}
    out.update(study=str(path), runtime=cfg.export.runtime, wall_s=time.perf_counter() - t)
    return out


def markdown(result: dict[str, Any]) -> str:
    a, mach = result["args"], result["machine"]
    lines = [
        "# Runtime benchmark (generated by benchmarks/bench_runtime.py)",
        "",
        f"Best median of {a['rounds']} alternating rounds, {a['threads']} thread(s); export speed-up = latency "
        f"speed-up x MACs ratio (1.0: time falls as fast as MACs). Machine: {mach['cpus']} CPUs, load "
        f"{mach['loadavg'][0]:.1f} at the end, {mach['date']}; whole run {result['wall_s'] / 60:.1f} min.",
    ]
    for m in result["models"]:
        lines += ["", f"## {m['model']}", "", "| network | MACs % | " + " | ".join(
            f"{rt} b{b}: ms / export speed-up" for rt in RUNTIMES for b in m["batches"]) + " | proxy val acc |",
            "|---|---|" + "---|" * (len(RUNTIMES) * len(m["batches"])) + "---|"]  # fmt: skip
        for n in m["networks"]:
            cells = [f"{n['latency_ms'][f'{rt}@{b}']:.3f} / {n['export_speedup'][f'{rt}@{b}']:.2f}"
                     for rt in RUNTIMES for b in m["batches"]]  # fmt: skip
            acc = f"{n['proxy_val_acc']:.4f}" if "proxy_val_acc" in n else "-"
            lines.append(f"| {n['label']} | {100 * n['macs_ratio']:.1f} | " + " | ".join(cells) + f" | {acc} |")
    searches = result.get("search") or []
    if searches:
        lines += ["", "## Searches under a latency bound, measured on their exports", ""]
    for s in searches:
        if "error" in s:
            lines.append(f"- {s['study']}: {s['error']}")
            continue
        lines.append(f"- {s['study']} ({s['runtime']}): trial {s['trial']}, MACs {100 * s['macs_ratio']:.1f} %, "
                     f"speed-up {s['speedup_batch1']:.2f}x at batch 1 ({s['latency_program']}: "
                     f"{s['latency_ms_batch1']:.3f} vs {s['base_latency_ms_batch1']:.3f} ms), export speed-up "
                     f"{s['export_speedup_batch1']:.2f}; bound {s['max_latency_ratio']}: measured "
                     f"{s['bound_latency_ratio']:.3f} at batch {s['bound_latency_batch']}, met: "
                     f"{s['bound_latency_met']}; val acc {s['val_acc']}, test acc {s['test_acc']}; "
                     f"{s['wall_s'] / 60:.1f} min.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = [run_model(n.strip(), args) for n in args.models.split(",") if n.strip()]
    result: dict[str, Any] = {"args": vars(args), "models": models}
    result.update(machine=machine(), wall_s=time.perf_counter() - t0)
    write_results(Path(args.out), args.stem, result, markdown(result))  # the timings stand without the search
    studies = [p.strip() for p in args.search_study.split(",") if p.strip()]
    if studies:
        result["search"] = []
    for path in studies:
        try:
            result["search"].append(run_search(path))
        except SlimError as e:  # e.g. no trial met the bound: recorded, not lost
            result["search"].append({"study": path, "error": str(e)})
        result.update(machine=machine(), wall_s=time.perf_counter() - t0)
        write_results(Path(args.out), args.stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
