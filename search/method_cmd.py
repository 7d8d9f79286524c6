"""``slimsearch method``: one paper method run alone on a study's baseline, its policy exported with a report
(per-layer decisions, evaluator calls, accuracy, cost). The pieces it shares with the study's seeds are in
``search.seeding``."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.export import out_dir_problem
from slimsearch.core.policy import Policy
from slimsearch.core.train import evaluate as accuracy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.search.context import build_study_context
from slimsearch.search.export import parse_formats, rebuild_candidate, write_export
from slimsearch.search.seeding import MethodAcc, _layer_rates, method_layers, method_options, run_study_method
from slimsearch.search.study import StudyConfig
from torch import nn

_METHOD_OUT_MARKERS = ("report.json", "manifest.json")


def check_method_out(out: Path) -> None:
    """The output folder must be new, empty, or an earlier method output holding only what a method writes
    (it is replaced as a whole, so nothing of the user's may be in it)."""
    problem = out_dir_problem(out, _METHOD_OUT_MARKERS, what="a method output")
    if problem:
        raise SlimError(f"--out: {problem}")


@dataclass
class MethodRun:
    """What ``run_method_on_study`` wrote: the output folder, its files, the report dict and a printable table."""

    name: str
    out_dir: Path
    files: dict[str, Path]
    report: dict[str, Any]
    table: str


def _clean(obj: Any) -> Any:
    """JSON-safe: tuples -> lists, non-finite floats -> None, tensors/numpy scalars -> numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def layer_rows(
    model: nn.Module, policy: Policy, layers: Sequence[str], decisions: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Per-layer decisions of a method's policy: filters, kept, rate, criterion, keep, decomposition, rank,
    plus the method's own per-layer record (``decisions``)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    names = list(layers) + [n for n in policy.layers if n not in layers]
    rows = []
    for n in names:
        conv, lp = convs[n], policy.get(n)
        kept = lp.keep_count(conv.out_channels)
        row: dict[str, Any] = {
            "layer": n, "filters": conv.out_channels, "kept": kept, "rate": 1 - kept / conv.out_channels,
            "criterion": lp.criterion if kept < conv.out_channels else "-",
            "keep": list(lp.keep) if lp.keep is not None else None, "clusters": lp.clusters,
            "decomposition": lp.decomposition, "rank": list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank,
            "rank_ratio": lp.rank_ratio, "method": dict(decisions.get(n, {})),
        }  # fmt: skip
        rows.append(row)
    return rows


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = f"{'layer':<28} {'filters':>7} {'kept':>5} {'rate':>6}  {'criterion':<9} {'decomp':<7} rank"
    lines = [head]
    for r in rows:
        rank = (
            ""
            if r["rank"] is None
            else ("x".join(map(str, r["rank"])) if isinstance(r["rank"], list) else str(r["rank"]))
        )
        lines.append(f"{r['layer']:<28} {r['filters']:>7} {r['kept']:>5} {r['rate']:>6.3f}  {r['criterion']:<9} "
                     f"{r['decomposition']:<7} {rank}")  # fmt: skip
    return "\n".join(lines)


def run_method_on_study(
    cfg: StudyConfig,
    name: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    budget: int | None = None,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = ("torchscript", "state"),
    log: Callable[[str], None] | None = None,
) -> MethodRun:
    """``slimsearch method``: run paper method ``name`` alone on the study's baseline and export its result.

    acc() is the study's evaluator without the MACs gate (``MethodAcc``, at most ``budget`` evaluator calls);
    the MACs bound is only reported (``feasible``). Writes to ``out_dir`` (default
    ``<workdir>/method-<name>``): policy.json and the compressed model (``core.export.export_model``: the
    evaluator's recalibration / short fine-tune redone, as ``slimsearch export`` does), metrics.json and
    report.json (per-layer decisions, evaluator calls, val_acc, MACs, params, compression ratios, times).
    """
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    opts = method_options(cfg, name, overrides or {})
    fmts = parse_formats(list(formats))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise SlimError(f"--budget must be a positive integer, got {budget!r}")
    out = Path(out_dir) if out_dir is not None else cfg.study.workdir / f"method-{name}"
    check_method_out(out)
    sctx = build_study_context(cfg, log=log)
    layers = method_layers(sctx, name)
    opts = _layer_rates(name, opts, layers)  # bad layer names are reported before any evaluation
    sctx.eval_ctx.cache = ResultCache(cfg.study.workdir / "cache")  # shared with the study's trials
    acc = MethodAcc(sctx.eval_ctx, cfg.evaluator, budget)
    base = sctx.eval_ctx.base
    log(f"method {name} on {cfg.name}: {cfg.model.factory}, {len(layers)} layers, evaluator {cfg.evaluator.kind} "
        f"without the MACs bound" + (f", budget {budget} evaluator calls" if budget else ""))  # fmt: skip
    t1 = time.perf_counter()
    mres = run_study_method(sctx, name, opts, acc)
    method_s = time.perf_counter() - t1
    policy = mres.policy
    calls = acc.calls
    final = acc.result(policy)
    if final.status != "ok":
        raise RuntimeError(f"method {name}: evaluating its policy failed: {final.reason}")
    base_acc = acc.result(Policy())
    model = rebuild_candidate(sctx, cfg, policy)  # on the study's device
    rebuilt_acc = accuracy(model, sctx.splits.val)
    model = model.cpu()  # exported and timed on the CPU
    cost = count_cost(model, sctx.input_shape)
    m = final.metrics
    max_macs = sctx.eval_ctx.max_macs
    metrics: dict[str, Any] = {
        "method": name, "study": cfg.name, "val_acc": m["val_acc"], "base_val_acc": base_acc.metrics.get("val_acc"),
        "rebuilt_val_acc": rebuilt_acc,
        "macs": int(m["macs"]), "flops": int(m["flops"]), "params": int(m["params"]),
        "base_macs": int(base.macs), "base_params": int(base.params),
        "macs_ratio": m["macs"] / base.macs, "params_ratio": m["params"] / base.params,
        "macs_reduction_x": base.macs / m["macs"], "params_compression_x": base.params / m["params"],
        "exported_macs": int(cost.macs), "exported_params": int(cost.params),
        "max_macs": max_macs, "feasible": max_macs is None or m["macs"] <= max_macs,
        "evaluator": cfg.evaluator.kind, "input_shape": list(sctx.input_shape), "policy_hash": policy.hash,
    }  # fmt: skip
    metrics = _clean(metrics)
    files = write_export(sctx, cfg, model, policy, out, fmts, metrics, also=_METHOD_OUT_MARKERS)
    rows = layer_rows(sctx.model, policy, layers, mres.report.get("layers", {}))
    report = {
        **metrics,
        "options": opts,
        "budget": budget,
        "evaluator_calls": calls,  # evaluations made by the method (the final report's one is not counted)
        "budget_exhausted": acc.refused > 0,
        "rejected_unevaluated": acc.refused,
        "layers": rows,
        "method_report": mres.report,
        "history": mres.history,
        "policy": policy.to_dict(),
        "method_s": method_s,
        "wall_s": time.perf_counter() - t0,
        "files": {k: str(v) for k, v in files.items()},
    }
    path = out / "report.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(report), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    files = {**files, "policy": out / "policy.json", "metrics": out / "metrics.json", "report": path}
    return MethodRun(name, out, files, report, _table(rows))
