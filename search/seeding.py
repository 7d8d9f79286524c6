"""Seed strategies: policies enqueued as a study's first trials, and the paper methods run on a study.

Built in: ``uniform`` (one policy per rate in ``uniform_rates``, every searched layer at that
rate), ``global`` (one threshold over all units' mean-normalised filter norms) and ``tp_global``
(Torch-Pruning's global group-norm allocation, bisected onto the MACs bound). The paper methods
(abshpc, mtd, ga, distfit) register themselves from the optional ``search.methods.seeds`` module
with ``search.study.register_seed_strategy`` (that registration checks their [seeds] parameters at
load time).

``generate_seeds`` makes a study's seed policies. It runs the four methods itself (``run_study_method``)
so they share one ``MethodAcc``: the study's evaluator WITHOUT the MACs gate (the methods walk from
light to heavy compression; a gated evaluator would reject every light step), memoised by policy hash
across methods, and limited to ``[seeds] budget`` evaluator calls in total. Once the budget is spent,
every policy not evaluated yet is answered as rejected (accuracy ``REJECTED`` = -1, no evaluation), so
a method ends with the steps it accepted so far (abshpc/ga/distfit: remaining layers unpruned; mtd: its
rule switches to Tucker-2 for the remaining layers, which it never evaluates anyway). ``slimsearch
method`` uses the same pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsearch.core.criteria import global_rates, group_importance
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import CRITERIA, Policy
from slimsearch.search.study import SEED_STRATEGIES, known_seed_strategies, register_seed_strategy

METHOD_STRATEGIES = ("abshpc", "mtd", "ga", "distfit")
REJECTED = -1.0  # answer to a method's question once the evaluation budget is spent: below a0 - any tolerance


def _fractions_ok(values: Any) -> bool:
    """A non-empty list of plain numbers in [0, 1)."""
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values)
    )


def _check_uniform(params: Mapping[str, Any], where: str) -> None:
    allowed = ("rates", "criterion")
    for key in params:
        if key not in allowed:
            raise SlimError(f"{where} uniform_{key}: unknown parameter; allowed: uniform_rates, uniform_criterion")
    rates = params.get("rates", [0.3, 0.5])
    if not _fractions_ok(rates):
        raise SlimError(f"{where} uniform_rates: expected a non-empty list of rates in [0, 1), got {rates!r}")
    crit = params.get("criterion", "l1")
    if crit not in CRITERIA or crit == "mask":
        allowed_c = ", ".join(c for c in CRITERIA if c != "mask")
        raise SlimError(f"{where} uniform_criterion: unknown criterion {crit!r}; allowed: {allowed_c}")


@register_seed_strategy("uniform", check=_check_uniform)
def uniform_seeds(ctx: Any, params: Mapping[str, Any]) -> list[Any]:
    """Every searched layer pruned at the same rate: one policy per entry of ``rates``.

    Rates are clipped to the space's [low, high] by ``SearchSpace.uniform_policy``'s round trip
    through the space parameters, so the enqueued trial is a point of the search space.
    """
    rates = params.get("rates", [0.3, 0.5])
    crit = params.get("criterion", "l1")
    return [ctx.space.uniform_policy(float(r), crit) for r in rates]


def _check_fractions_and_criterion(
    params: Mapping[str, Any], where: str, name: str, list_key: str, criterion: str, zero_ok: bool = True
) -> None:
    """[seeds] ``<name>_<list_key>`` (fractions, default [0.5]) and ``<name>_criterion`` (l1, l2, fpgm)."""
    for key in params:
        if key not in (list_key, "criterion"):
            raise SlimError(f"{where} {name}_{key}: unknown parameter; allowed: {name}_{list_key}, {name}_criterion")
    fr = params.get(list_key, [0.5])
    if not _fractions_ok(fr) or (not zero_ok and 0 in fr):
        span = "[0, 1)" if zero_ok else "(0, 1)"
        raise SlimError(f"{where} {name}_{list_key}: expected a non-empty list of fractions in {span}, got {fr!r}")
    crit = params.get("criterion", criterion)
    if crit not in ("l1", "l2", "fpgm"):
        raise SlimError(f"{where} {name}_criterion: {crit!r} is not one of l1, l2, fpgm")


def _check_global(params: Mapping[str, Any], where: str) -> None:
    _check_fractions_and_criterion(params, where, "global", "fractions", "l2")


@register_seed_strategy("global", check=_check_global)
def global_seeds(ctx: Any, params: Mapping[str, Any]) -> list[Any]:
    """Torch-Pruning-style global pruning as a seed: one threshold over every searched unit's filter group
    norms (each divided by its unit's mean, ``core.criteria.global_rates``) removes ``fractions`` of all
    their filters; a unit's rate is the share of its filters below it, filters chosen by ``criterion``.
    Over-budget seeds are fitted like any sample (``[constraint] fit``)."""
    from slimsearch.spaces.space import Param

    mods = dict(ctx.model.named_modules())
    scores = {u.key: group_importance([mods[n].weight for n in u.layers]) for u in ctx.space.units
              if isinstance(u.rate, Param)}  # fmt: skip
    crit = params.get("criterion", "l2")
    return [ctx.space.unit_policy(global_rates(scores, float(f)), crit) for f in params.get("fractions", [0.5])]


def _check_tp_global(params: Mapping[str, Any], where: str) -> None:
    _check_fractions_and_criterion(params, where, "tp_global", "ratios", "fpgm", zero_ok=False)


@register_seed_strategy("tp_global", check=_check_tp_global)
def tp_global_seeds(ctx: Any, params: Mapping[str, Any]) -> list[Any]:
    """Torch-Pruning's global pruning (``GroupMagnitudeImportance(p=2)``: a group's norm over the conv, its
    BatchNorm and the next conv's input slice, one threshold for all) as a seed: the kept-filter count it gives
    each searched unit, the filters chosen by ``criterion`` (default fpgm). Without ``ratios`` and with a MACs
    bound, TP's ratio is bisected onto the bound (the allocation a user would get from Torch-Pruning at that
    budget); otherwise one seed per ratio, fitted like any sample. Units Torch-Pruning cannot trace (a
    residual stream behind an option-A shortcut) stay unpruned in the seed."""
    from slimsearch.core.budget import bisect_budget
    from slimsearch.core.cost import count_cost
    from slimsearch.core.tp_prune import pruned_rates, tp_prune
    from slimsearch.spaces.space import Param
    from torch import nn

    units = [u for u in ctx.space.units if isinstance(u.rate, Param)]
    if not units:
        return []
    searched = {n for u in units for n in u.layers}
    mods = dict(ctx.model.named_modules())
    ignore = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and n not in searched]
    top = max(float(u.rate.high) for u in units)
    crit = params.get("criterion", "fpgm")

    @functools.cache  # the bisection's last ratio is pruned again for the seed
    def prune(ratio: float) -> nn.Module:
        return tp_prune(ctx.model, "tp_global", ratio, ctx.input_shape, max_ratio=top, ignore=ignore)

    def seed(pruned: nn.Module) -> Any:
        rates = pruned_rates(ctx.model, pruned, [u.layers[0] for u in units])
        return ctx.space.unit_policy({u.key: rates[u.layers[0]] for u in units if u.layers[0] in rates}, crit)

    bound = getattr(ctx.eval_ctx, "max_macs", None)
    if "ratios" in params or bound is None:
        return [seed(prune(float(r))) for r in params.get("ratios", [0.5])]
    try:
        ratio, _ = bisect_budget(lambda r: count_cost(prune(r), ctx.input_shape).macs, bound, hi=top, iters=10)
    except SlimError:  # even the most pruned allocation is over the bound: fitted like any sample
        ratio = top
    return [seed(prune(ratio))]


def _load_optional() -> None:
    """Register the paper strategies of ``search.methods.seeds`` (abshpc, mtd, ga, distfit) when present."""
    if (
        importlib.util.find_spec("slimsearch.search.methods") is None
        or importlib.util.find_spec("slimsearch.search.methods.seeds") is None
    ):
        return
    importlib.import_module("slimsearch.search.methods.seeds").register()


_load_optional()


# ----------------------------------------------------------------------------- paper methods on a study


class MethodAcc:
    """``acc(policy) -> float`` for the methods: the study's evaluator without the MACs gate, memoised by
    policy hash, at most ``budget`` evaluations (None: unlimited); see the module docstring.

    ``calls``: evaluations made; ``refused``: questions answered ``REJECTED`` because the budget was spent.
    ``result(policy)`` is the full ``EvalResult`` of a policy, evaluated outside the budget if needed.
    """

    def __init__(self, eval_ctx: Any, eval_cfg: Any, budget: int | None = None) -> None:
        if budget is not None and budget < 1:
            raise SlimError(f"evaluation budget must be >= 1, got {budget}")
        self._ctx = dataclasses.replace(eval_ctx, max_macs=None)  # new fingerprint: no MACs bound
        self._cfg = eval_cfg
        self.budget = budget
        self.calls = 0
        self.refused = 0
        self._results: dict[str, Any] = {}

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.calls >= self.budget

    @property
    def left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.calls)

    def _evaluate(self, policy: Policy) -> Any:
        from slimsearch.evaluators.evaluate import evaluate

        res = self._results.get(policy.hash)
        if res is None:
            res = self._results[policy.hash] = evaluate(self._ctx, self._cfg, policy)
            self.calls += 1
        return res

    def __call__(self, policy: Policy) -> float:
        from slimsearch.search.methods.common import as_accuracy

        if policy.hash not in self._results and self.exhausted:
            self.refused += 1
            return REJECTED
        return as_accuracy(self._evaluate(policy))

    def result(self, policy: Policy) -> Any:
        """The ``EvalResult`` of ``policy`` (memoised; a new evaluation is not limited by the budget)."""
        return self._evaluate(policy)


def method_layers(ctx: Any, name: str) -> list[str]:
    """Layers a method works on: the space's decomposable layers (mtd) or its uncoupled prune units (others)."""
    space = ctx.space
    if name == "mtd":
        return [d.layer for d in space.decs]
    return [u.layers[0] for u in space.units if len(u.layers) == 1]


def method_inputs(ctx: Any, name: str, params: Mapping[str, Any]) -> Any:
    """Normalised train images for GA's fitness (``samples`` of them, seeded); None for the other methods."""
    if name != "ga":
        return None
    from slimsearch.core.data import batches

    n = int(params.get("samples", 256))
    x, _ = next(iter(batches(ctx.splits.train, n, shuffle=True, seed=ctx.cfg.study.seed)))
    return x


def _layer_rates(name: str, opts: dict[str, Any], layers: Sequence[str]) -> dict[str, Any]:
    """GA takes per-layer rates only: one rate becomes a mapping; rates of layers the method does not work on
    are a ``SlimError``."""
    r = opts.get("rates")
    if name == "ga" and isinstance(r, (int, float)) and not isinstance(r, bool):
        opts["rates"] = dict.fromkeys(layers, float(r))
    elif isinstance(r, Mapping):
        unknown = [n for n in r if n not in layers]
        if unknown:
            raise SlimError(f"{name} rates: {unknown[0]!r} is not a layer the method works on; "
                            f"layers: {', '.join(layers)}")  # fmt: skip
    return opts


def run_study_method(ctx: Any, name: str, params: Mapping[str, Any], acc: MethodAcc) -> Any:
    """Run method ``name`` with ``params`` on the study context's baseline; returns its ``MethodResult``."""
    from slimsearch.search.methods import run_method

    layers = method_layers(ctx, name)
    if not layers:
        kind = "decomposable" if name == "mtd" else "uncoupled prunable"
        raise SlimError(f"method {name}: the study's search space has no {kind} layers to work on")
    opts = _layer_rates(name, dict(params), layers)
    if name == "distfit" and isinstance(opts.get("rates"), (list, tuple)):
        raise SlimError(f"method distfit: rates {list(opts['rates'])} gives several policies; give one rate")
    return run_method(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def method_seed_policies(ctx: Any, name: str, params: Mapping[str, Any], acc: MethodAcc) -> list[Policy]:
    """Seed policies of method ``name`` (distfit: one per rate when ``rates`` is a list), evaluated by ``acc``.

    The methods' own final evaluation is skipped unless asked for (the seed trial evaluates the policy).
    """
    from slimsearch.search.methods import seed_policies

    layers = method_layers(ctx, name)
    if not layers:
        return []
    opts = _layer_rates(name, dict(params), layers)
    if name != "abshpc":
        opts.setdefault("final_eval", False)
    return seed_policies(name, model=ctx.model, acc=acc, layers=layers, inputs=method_inputs(ctx, name, opts), **opts)


def generate_seeds(ctx: Any, log: Callable[[str], None] | None = None) -> list[tuple[str, Policy]]:
    """(label, Policy) for every [seeds] strategy in order; the methods share one budgeted ``MethodAcc``."""
    cfg = ctx.cfg
    reg = known_seed_strategies()
    acc: MethodAcc | None = None
    out: list[tuple[str, Policy]] = []
    for name in cfg.seeds.strategies:
        params = cfg.seeds.params.get(name, {})
        if name in METHOD_STRATEGIES:
            acc = acc or MethodAcc(ctx.eval_ctx, cfg.evaluator, cfg.seeds.budget)
            before, refused = acc.calls, acc.refused
            pols = method_seed_policies(ctx, name, typed_params(name, params, f"[seeds] {name}_"), acc)
            if log is not None:
                left = "" if acc.budget is None else f" ({acc.left} of the budget of {acc.budget} left)"
                note = (
                    f"; budget spent, {acc.refused - refused} steps rejected unevaluated"
                    if acc.refused > refused
                    else ""
                )
                log(f"seed strategy {name}: {len(pols)} policies, {acc.calls - before} evaluator calls{left}{note}")
        else:
            pols = reg[name](ctx, params)
        out += [(f"{name}#{i}", p) for i, p in enumerate(pols)]
    return out


# ----------------------------------------------------------------------------- `slimsearch method`

_METHOD_OUT_MARKERS = ("report.json", "manifest.json")


def _method_fn(name: str) -> Callable[..., Any]:
    from slimsearch.search.methods import abshpc_search, distfit_search, ga_select, mtd_search

    return {"abshpc": abshpc_search, "mtd": mtd_search, "ga": ga_select, "distfit": distfit_search}[name]


def _check_value(name: str, key: str, value: Any, default: Any, where: str) -> Any:
    """A method option's value checked against the type of the method's default (TOML has no None)."""
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = num
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
    else:  # default None: the method checks the value itself
        ok = True
    if not ok:
        want = type(default).__name__ if not isinstance(default, (tuple, list)) else "list"
        raise SlimError(f"{where}{key}: expected {want} (like the default {default!r}), got {value!r}")
    if isinstance(value, list) and key in ("cp_rank", "tucker_ranks", "scan_rates", "compare"):
        return tuple(value)
    return float(value) if isinstance(default, float) else value


def method_options(
    cfg: Any, name: str, overrides: Mapping[str, Any], *, where: str = "option --set "
) -> dict[str, Any]:
    """Options of method ``name``: the study's [seeds] parameters for it (when it is a seed strategy there),
    updated by ``overrides``; unknown names and values of the wrong type are a ``SlimError``."""

    if name not in METHOD_STRATEGIES:
        raise SlimError(f"unknown method {name!r}; allowed: {', '.join(METHOD_STRATEGIES)}")
    out = typed_params(name, cfg.seeds.params.get(name, {}), f"{cfg.path}: [seeds] {name}_")
    out.update(typed_params(name, overrides, where))
    return out


def typed_params(name: str, params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``params`` of method ``name`` checked: known names, values of the type of the method's defaults."""
    import inspect

    from slimsearch.search.methods.seeds import allowed_params

    allowed = allowed_params(name)
    sig = inspect.signature(_method_fn(name)).parameters
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            raise SlimError(f"{prefix}{key}: unknown option of method {name}; allowed: {', '.join(allowed)}")
        out[key] = _check_value(name, key, value, sig[key].default, prefix)
    return out


def _strict_check(name: str) -> Callable[[Mapping[str, Any], str], None]:
    def check(params: Mapping[str, Any], where: str) -> None:
        typed_params(name, params, f"{where} {name}_")

    return check


def _register_strict_checks() -> None:
    """[seeds] parameters of the method strategies are checked at load time for names AND value types."""
    for name in METHOD_STRATEGIES:
        if name in SEED_STRATEGIES:
            register_seed_strategy(name, check=_strict_check(name))(SEED_STRATEGIES[name])


_register_strict_checks()


def check_method_out(out: Path) -> None:
    """The output folder must be new, empty, or an earlier method output (it is replaced as a whole)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SlimError(f"--out: {out} exists and is not a directory")
    if any(out.iterdir()) and not any((out / m).is_file() for m in _METHOD_OUT_MARKERS):
        raise SlimError(f"--out: {out} is a non-empty folder that is not a method output (it would be "
                        "replaced); give a new or empty folder")  # fmt: skip


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


def layer_rows(model: Any, policy: Policy, layers: Sequence[str], decisions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-layer decisions of a method's policy: filters, kept, rate, criterion, keep, decomposition, rank,
    plus the method's own per-layer record (``decisions``)."""
    from torch import nn

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
    cfg: Any,
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
    import json
    import os
    import time

    from slimsearch.core.cost import count_cost
    from slimsearch.core.train import evaluate as accuracy
    from slimsearch.evaluators.cache import ResultCache
    from slimsearch.search.context import build_study_context
    from slimsearch.search.export import parse_formats, rebuild_candidate, write_export

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
    files = write_export(sctx, cfg, model, policy, out, fmts, metrics)
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


__all__ = [
    "METHOD_STRATEGIES",
    "REJECTED",
    "SEED_STRATEGIES",
    "MethodAcc",
    "MethodRun",
    "check_method_out",
    "generate_seeds",
    "layer_rows",
    "method_options",
    "method_layers",
    "method_seed_policies",
    "run_method_on_study",
    "run_study_method",
    "uniform_seeds",
]
