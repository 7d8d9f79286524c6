"""Score one policy: apply it, gate on MACs and latency (before any training), then proxy or short fine-tune.

``evaluate`` never raises for a bad candidate: infeasible, failing (bad policy, NaN loss, any
exception) and pruned candidates come back as an ``EvalResult`` with a status and a one-line reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.config import EvaluatorConfig
from slimsearch.evaluators.context import EvalContext
from slimsearch.evaluators.result import EvalResult

STATUSES = ("ok", "infeasible", "fail", "pruned")
TIMES = ("apply_s", "cost_s", "train_s", "eval_s", "wall_s")
_USE_CONTEXT_CACHE: Any = object()

Report = Callable[[int, float], bool]


# A bound's name -> the metric holding its violation (<= 0: within the bound).
VIOLATIONS = {"macs": "macs_violation", "latency": "latency_violation"}


def violations(metrics: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """Each named bound's violation from a result's metrics; 0.0 where it was not measured (a policy rejected
    by another bound before its latency could be told)."""
    return {n: float(metrics.get(VIOLATIONS[n], 0.0)) for n in names}


def result_key(ctx: EvalContext, cfg: EvaluatorConfig, policy: Policy) -> str:
    """Cache key: context fingerprint, the evaluation-relevant config fields and the policy hash."""
    return f"{ctx.fingerprint}-{cfg.key}-{policy.hash}"


def network_key(ctx: EvalContext, cfg: EvaluatorConfig, digest: str) -> str:
    """Cache key of a built network (``core.apply.model_digest``): every policy that builds it shares it."""
    return f"{ctx.fingerprint}-{cfg.key}-net-{digest}"


@dataclass
class _Built:
    """What ``_run`` tells ``evaluate`` about the network it built: its digest, and the cached result of an
    earlier policy that built the same network (then nothing is trained)."""

    cache: ResultCache | None
    digest: str = ""
    reused: EvalResult | None = None


def one_line(e: BaseException) -> str:
    """An exception as one short line (SlimError messages are already written for users)."""
    text = " ".join(str(e).split())
    if not isinstance(e, SlimError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text[:300]


def evaluate(
    ctx: EvalContext,
    cfg: EvaluatorConfig,
    policy: Policy,
    *,
    report: Report | None = None,
    cache: ResultCache | None = _USE_CONTEXT_CACHE,
) -> EvalResult:
    """Evaluate ``policy`` on ``ctx`` under ``cfg``; deterministic for ``cfg.seed``.

    ``report(step, val_acc)`` receives the fine-tune's evaluations every ``cfg.eval_every`` steps;
    returning True stops the trial ("pruned"). ``cache`` defaults to ``ctx.cache``; None disables it.
    """
    if cache is _USE_CONTEXT_CACHE:
        cache = ctx.cache
    key = result_key(ctx, cfg, policy) if cache is not None else ""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            hit.cached = True
            return hit
    t0 = time.perf_counter()
    metrics: dict[str, float] = dict.fromkeys(TIMES[:-1], 0.0)
    intermediate: list[tuple[int, float]] = []
    built = _Built(cache)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            status, reason = _run(ctx, cfg, policy, report, metrics, intermediate, built)
    except ImportError:
        # A broken installation (say, the package upgraded under a running study), not this candidate: failing
        # and caching every trial would burn the study's budget in seconds. The runner stops with an error.
        raise
    except Exception as e:  # never raise for a candidate: the search records the failure and moves on
        status, reason = "fail", one_line(e)
    metrics["wall_s"] = time.perf_counter() - t0
    if built.reused is not None:  # its scores, this call's time split
        r = built.reused
        result = EvalResult(r.status, {**r.metrics, **metrics}, r.reason, r.intermediate, policy.hash, True,
                            built.digest)  # fmt: skip
    else:
        result = EvalResult(status, metrics, reason, intermediate, policy.hash, model_digest=built.digest)
    if cache is not None:
        cache.put(key, result)
        if built.digest and built.reused is None:
            cache.put(network_key(ctx, cfg, built.digest), result)
    return result


def _run(
    ctx: EvalContext,
    cfg: EvaluatorConfig,
    policy: Policy,
    report: Report | None,
    metrics: dict[str, float],
    intermediate: list[tuple[int, float]],
    built: _Built,
) -> tuple[str, str]:
    from slimsearch.core.apply import apply_policy, model_digest, structure_only
    from slimsearch.core.cost import count_cost, measure_latency
    from slimsearch.core.latency import timed_program
    from slimsearch.core.macs import policy_macs
    from slimsearch.core.train import FinetuneConfig, finetune, recalibrate_bn
    from slimsearch.core.train import evaluate as accuracy

    # Gate before building anything where that is cheap: factorising (CP above all) can take seconds, so a
    # decomposed policy's MACs come from ``core.macs`` first (exactly the real result's), and a latency bound
    # is checked on the predicted latency (``core.latency``). Only an infeasible policy's structure is built,
    # for its full cost metrics.
    t = time.perf_counter()
    over = ctx.max_macs is not None and any(lp.decomposition != "none" for lp in policy.layers.values())
    over = over and policy_macs(ctx.model, policy, ctx.input_shape) > ctx.max_macs
    slow = ""
    lat_ms = None
    table = ctx.latency_table() if ctx.max_latency_ratio is not None else None
    if table is not None:
        lat_ms = table.predict(ctx.model, policy)
        slow = _latency_gate(ctx, table, lat_ms, metrics) if lat_ms is not None else ""
    metrics["cost_s"] += time.perf_counter() - t
    if over or slow:
        t = time.perf_counter()
        shell = structure_only(ctx.model, policy, input_shape=ctx.input_shape, seed=cfg.seed)
        metrics["apply_s"] += time.perf_counter() - t
        t = time.perf_counter()
        verdict = _gate(ctx, count_cost(shell, ctx.input_shape), metrics) or slow
        metrics["cost_s"] += time.perf_counter() - t
        return "infeasible", verdict

    t = time.perf_counter()
    model = apply_policy(ctx.model, policy, input_shape=ctx.input_shape, seed=cfg.seed)
    built.digest = model_digest(model)
    metrics["apply_s"] += time.perf_counter() - t
    if built.cache is not None:
        built.reused = built.cache.get(network_key(ctx, cfg, built.digest))
        if built.reused is not None:
            return built.reused.status, built.reused.reason

    t = time.perf_counter()
    verdict = _gate(ctx, count_cost(model, ctx.input_shape), metrics)
    if not verdict and table is not None and lat_ms is None:
        # Not predictable (EVBMF ranks): measure the built model under the table's settings.
        verdict = _latency_gate(ctx, table, table.measure(model), metrics, "measured")
    if verdict:
        metrics["cost_s"] += time.perf_counter() - t
        return "infeasible", verdict
    if cfg.measure_latency:
        # what the export ships, in the study's runtime ([export] runtime, threads)
        program = timed_program(model, ctx.latency_runtime, ctx.latency_memory_format, threads=ctx.latency_threads,
                                input_shape=ctx.input_shape)  # fmt: skip
        lat = measure_latency(program, ctx.input_shape, batch_size=cfg.latency_batch, threads=ctx.latency_threads)
        metrics["latency_ms"] = float(lat.median_ms)
    metrics["cost_s"] += time.perf_counter() - t

    train, val = ctx.splits.train, ctx.splits.val
    model = model.to(ctx.device)  # built and costed on the CPU; trained and scored on the study's device
    t = time.perf_counter()
    # Pruning/decomposition leaves BN statistics of the old activations; recomputing them is the proxy,
    # and also the starting point of the fine-tune (so short fine-tunes do not start from stale stats).
    recalibrate_bn(model, train, num_batches=cfg.bn_batches, batch_size=cfg.batch_size, seed=cfg.seed)
    acc: float | None = None
    status = "ok"
    if cfg.kind == "custom":
        from slimsearch.evaluators.custom import score

        extra = score(cfg, model, ctx.splits, ctx.model)
        metrics["train_s"] = time.perf_counter() - t
        clash = sorted((set(extra) - {"val_acc"}) & set(metrics))
        if clash:
            raise SlimError(f"custom evaluator {cfg.fn!r} returned {clash[0]!r}, a metric slimsearch sets itself")
        metrics.update(extra)
        return "ok", ""
    if cfg.kind == "finetune":
        fcfg = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, amp=cfg.amp)

        def on_eval(step: int, val_acc: float) -> bool:
            intermediate.append((int(step), float(val_acc)))
            return bool(report(step, val_acc)) if report is not None else False

        every = cfg.eval_every or None
        res = finetune(
            model,
            train,
            fcfg,
            teacher=ctx.teacher() if cfg.kd else None,
            val_ds=val if every else None,
            eval_every=every,
            on_eval=on_eval if every else None,
        )
        if res.stopped_early:
            status = "pruned"
        if intermediate and intermediate[-1][0] == res.steps:
            acc = intermediate[-1][1]  # already scored at the last step
    metrics["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if acc is None:
        acc = accuracy(model, val, cfg.val_batch_size)
    metrics["eval_s"] = time.perf_counter() - t
    if not math.isfinite(acc):
        raise SlimError(f"validation accuracy is {acc}")
    metrics["val_acc"] = float(acc)
    reason = f"stopped by the pruner at step {intermediate[-1][0]}" if status == "pruned" else ""
    return status, reason


def _latency_gate(ctx: EvalContext, table: Any, ms: float, metrics: dict[str, float], how: str = "predicted") -> str:
    """Record the latency metrics; return why ``ms`` (``how``: predicted or measured) breaks the latency bound
    of ``table``'s baseline ("" when it does not)."""
    base = table.base_ms
    bound = float(ctx.max_latency_ratio) * base  # type: ignore[arg-type]
    metrics.update(latency_pred_ms=ms, latency_ratio=ms / base, latency_violation=ms - bound)
    if ms <= bound:
        return ""
    return (
        f"{how} latency {ms:.2f} ms exceeds the bound {bound:.2f} ms ({ms / base:.1%} of the baseline's "
        f"{base:.2f} ms at batch {ctx.latency_batch})"
    )


def _gate(ctx: EvalContext, cost: Any, metrics: dict[str, float]) -> str:
    """Record the cost metrics; return why the model breaks the MACs bound ("" when it does not)."""
    metrics.update(macs=float(cost.macs), flops=float(cost.flops), params=float(cost.params))
    metrics["macs_ratio"] = cost.macs / ctx.base.macs if ctx.base.macs else 1.0
    metrics["params_ratio"] = cost.params / ctx.base.params if ctx.base.params else 1.0
    if ctx.max_macs is None:
        return ""
    metrics["macs_violation"] = cost.macs - ctx.max_macs
    if cost.macs <= ctx.max_macs:
        return ""
    return (
        f"MACs {cost.macs:,} exceed the bound {ctx.max_macs:,.0f} "
        f"({metrics['macs_ratio']:.1%} of the baseline's {ctx.base.macs:,})"
    )
