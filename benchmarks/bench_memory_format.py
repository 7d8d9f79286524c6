"""Benchmark: CPU latency of the TorchScript export with contiguous (NCHW) vs channels_last (NHWC) conv weights.

For each model: the unpruned network, uniform pruning at 0.5 of every block-inner conv, a policy that prunes
the first stage lightly (0.25) and the later ones harder (0.625), both at ~50 % of the MACs, and ``--samples``
random policies of the study's [space] fitted onto 50 % of the MACs, as a search's trials are (odd channel
counts, Tucker/CP stacks: what a search exports, and what ``[export] memory_format = "auto"`` decides for).
Each is exported by
``core.export.export_model`` (format torchscript, ``memory_format`` contiguous and channels_last), reloaded, and
timed single-threaded on ordinary NCHW inputs at batch 1 and 64 (``core.cost.measure_latency``), round-robin over
all programs ``--rounds`` times, the order reversed every other round, best median kept. Weights are random: the
latency does not depend on them.

CPU (the numbers in results/): nice -n 5 python benchmarks/bench_memory_format.py
Writes benchmarks/results/memory_format.json and the generated benchmarks/results/memory_format.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.budget import prunable_leaders  # noqa: E402
from slimsearch.core.cost import count_cost, measure_latency  # noqa: E402
from slimsearch.core.export import MEMORY_FORMATS, export_model, load_exported  # noqa: E402
from slimsearch.core.models import build_model  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402

from benchmarks.common import SHAPE, log, machine, run_script, write_results  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def variants(name: str, samples: int) -> dict[str, tuple[torch.nn.Module, Policy]]:
    """Unpruned, uniform 0.5, stage 1 at 0.25 / later stages at 0.625 (block-inner convs), and ``samples`` fitted
    random policies of the study's space (``bench_latency.policies_for``)."""
    from benchmarks.bench_latency import policies_for

    model = build_model(name).eval()
    inner = [n for n in prunable_leaders(model, SHAPE) if n.startswith("layer") and n.endswith("conv1")]
    light = {n: 0.25 if n.startswith("layer1.") else 0.625 for n in inner}
    out: dict[str, tuple[torch.nn.Module, Policy]] = {"unpruned": (model, Policy())}
    for label, rates in (("uniform 0.5", dict.fromkeys(inner, 0.5)), ("stage 1 light", light)):
        policy = Policy({n: LayerPolicy(prune_rate=r) for n, r in rates.items()})
        out[label] = (apply_policy(model, policy, input_shape=SHAPE), policy)
    if samples:
        drawn = policies_for(model, name, argparse.Namespace(policies=samples, bound=0.5, seed=0))[1:]
        for i, policy in enumerate(drawn):
            out[f"search sample {i}"] = (apply_policy(model, policy, input_shape=SHAPE), policy)
    return out


def samples_summary(rows: list[dict]) -> list[dict]:
    """Per model and batch: channels_last / contiguous latency over the search samples."""
    ms = {(r["model"], r["batch"], r["variant"], r["memory_format"]): r["latency_ms"] for r in rows}
    out = []
    for model, batch in sorted({(m, b) for m, b, v, _ in ms if v.startswith("search sample")}):
        ratios = [ms[(model, batch, v, "channels_last")] / ms[(model, batch, v, "contiguous")]
                  for m, b, v, f in ms if (m, b) == (model, batch) and v.startswith("search sample") and f == "contiguous"]  # fmt: skip
        out.append({"model": model, "batch": batch, "n": len(ratios), "median_ratio": statistics.median(ratios),
                    "min_ratio": min(ratios), "max_ratio": max(ratios), "nhwc_faster": sum(r < 1 for r in ratios)})  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=6, help="fitted random policies of the study's space per model")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    if a.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {a.rounds}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    programs: dict[tuple[str, str, str], tuple[object, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            for label, (model, policy) in variants(name.strip(), a.samples).items():
                macs = float(count_cost(model, SHAPE).macs)
                for fmt in MEMORY_FORMATS:
                    d = Path(tmp) / f"{name}-{label}-{fmt}".replace(" ", "_")
                    export_model(model, policy, d, ("torchscript",), example_input=SHAPE, memory_format=fmt)
                    programs[(name, label, fmt)] = (load_exported(d), macs)
        log(f"{len(programs)} programs exported; timing {a.rounds} rounds")
        best: dict[tuple[str, str, str, int], float] = {}
        for r in range(a.rounds):
            order = list(programs.items()) if r % 2 == 0 else list(reversed(programs.items()))
            for key, (prog, _) in order:
                for batch in (1, 64):
                    ms = measure_latency(prog, SHAPE, batch_size=batch, repeats=30 if batch == 1 else 8,
                                         warmup=3).median_ms  # fmt: skip
                    best[(*key, batch)] = min(ms, best.get((*key, batch), float("inf")))
    rows = []
    for (name, label, fmt, batch), ms in best.items():
        macs, base_macs = programs[(name, label, fmt)][1], programs[(name, "unpruned", fmt)][1]
        same = best[(name, "unpruned", fmt, batch)]
        nchw = best[(name, "unpruned", "contiguous", batch)]
        rows.append({
            "model": name, "variant": label, "memory_format": fmt, "batch": batch, "latency_ms": ms,
            "macs_ratio": macs / base_macs, "speedup_vs_unpruned_same_format": same / ms,
            "export_speedup": same / ms * macs / base_macs, "speedup_vs_unpruned_contiguous": nchw / ms,
        })  # fmt: skip
    rows.sort(key=lambda r: (r["model"], r["batch"], r["variant"] != "unpruned", r["variant"], r["memory_format"]))
    result = {"machine": machine(), "rounds": a.rounds, "samples": a.samples, "wall_s": time.perf_counter() - t0,
              "rows": rows, "samples_summary": samples_summary(rows)}  # fmt: skip
    md = [
        "# TorchScript export: contiguous vs channels_last conv weights (generated by bench_memory_format.py)",
        "",
        f"Single-thread CPU, NCHW inputs, best median of {a.rounds} round-robin rounds; random weights. "
        "export speed-up = latency reduction / MACs reduction against the unpruned program of the same format. "
        f"Machine: {result['machine']['cpus']} CPUs, load {result['machine']['loadavg'][0]:.1f}, "
        f"{result['machine']['date']}; whole run {result['wall_s'] / 60:.1f} min.",
        "",
        "| model | batch | variant | memory format | latency ms | MACs % | speed-up (same format) | export speed-up "
        "| speed-up vs unpruned contiguous |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['memory_format']} | {r['latency_ms']:.2f} | "
            f"{100 * r['macs_ratio']:.1f} | {r['speedup_vs_unpruned_same_format']:.2f} | {r['export_speedup']:.2f} | "
            f"{r['speedup_vs_unpruned_contiguous']:.2f} |"
        )
    md += [
        "",
        "Search samples, channels_last latency / contiguous latency of the same program (below 1: NHWC faster):",
        "",
    ]
    md += [f"- {s['model']} batch {s['batch']}: median {s['median_ratio']:.2f} (range {s['min_ratio']:.2f}-"
           f"{s['max_ratio']:.2f}), channels_last faster for {s['nhwc_faster']} of {s['n']}"
           for s in result["samples_summary"]]  # fmt: skip
    write_results(a.out, "memory_format", result, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
