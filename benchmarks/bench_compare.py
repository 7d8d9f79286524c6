"""Compression comparison at equal MACs: Torch-Pruning baselines, the paper strategies and a slimsearch search.

For each model (default ResNet-20 and ResNet-56) and each MACs budget (default <= 50 % and <= 30 % of the
original), every candidate starts from the JPEG-adapted checkpoint (benchmarks/adapt_baselines.py) and gets
the SAME final fine-tune, then is measured on the test split (top-1, MACs, params, single-thread CPU latency
of its TorchScript export at batch 1 and 64, search wall time). Candidates:

- ``tp_l1``: Torch-Pruning ``MetaPruner``, uniform ratio, ``MagnitudeImportance(p=1, group_reduction="first",
  normalizer=None)`` (the filter L1 norm of Li et al.: TP's docstring names this variant "standard L1").
- ``tp_global``: Torch-Pruning global pruning, ``GroupMagnitudeImportance(p=2)`` (TP 1.6's group-norm
  importance; later TP versions call it GroupNormImportance). Both TP rows: ``max_pruning_ratio`` ``--tp-max-ratio``.
- ``fpgm``: uniform FPGM, our ``apply_policy`` with criterion "fpgm" at one rate everywhere.
- one row per paper strategy (search/methods, the evaluators' proxy as acc); a policy above the budget is
  PROJECTED onto it: every prunable layer's kept-filter count is scaled by one factor (1 - t), bisected, so
  its per-layer allocation, criteria, masks (GA: the GA's own kept filters, strongest L1 first) and
  decompositions stay; a policy under the budget is kept as it is.
- ``slimsearch``: ``search.runner``'s ``prepare_study`` + ``trial_loop`` (what ``slimsearch run`` does with one
  worker) on a StudyConfig built from ``studies/<model>_cifar10.toml``'s [space] with ``max_macs`` = the
  budget (``fit = "scale"``: a sample over it is scaled onto it, as the paper policies are), ``--evaluator``
  on the val subset (default ``finetune:5``: BN recalibration, 5 SGD steps, then accuracy; it beat the proxy by
  2.5 pt at 50 % and 11 pt at 30 % on ResNet-20, where the proxy's best did not survive the final fine-tune),
  ``--n-trials`` trials, TPE, seeded with the uniform L1/FPGM policies at the budget and the (projected) paper
  policies; the best feasible trial goes to the final fine-tune. Its search time includes the paper methods' time when they seed it.
  ``--search-seeds 0,1,2``: one search per sampler seed (one row each; the verdicts use their mean), the
  fine-tunes keep ``--seed``, so the rows differ by the search's path only. ``--rerank K``: the K best trials
  (distinct networks, ``search.export.top_trials``) all get the final fine-tune and the one with the best
  accuracy on ``--held-out-images`` val images the search never saw is kept (their extra fine-tunes count as
  search time; every candidate's test accuracy is reported, never used to choose).
- references: ``baseline`` (the adapted checkpoint, no further training) and ``baseline+ft`` (the same final
  fine-tune), so "within 0.5 pt of the unpruned baseline" compares like with like.

The Torch-Pruning baselines prune what Torch-Pruning can: ``ignored_layers`` = the residual streams' convs
(the option-A shortcut pads channels, which Torch-Pruning traces as element-wise, tying channel c of one
stage to channel c of the next: wrong by the padding) plus the classifier, so they prune the block-inner
convs. Uniform FPGM, the paper strategies' projections and the uniform seeds of the search prune the same
block-inner convs (pruning the streams at the same rate as the rest costs them accuracy: uniform FPGM fell from
63.5 to 54.9 % on ResNet-20 at 50 %, 17-step fine-tune); only slimsearch's search space may also hold the
residual streams (``core.graph`` traces the shortcut as a 1x1 conv): ``--space coupled=true`` puts them in (the
ResNet study files keep them out, see benchmarks/README.md).
Their ratio is bisected on ``core.cost.count_cost`` until MACs <= budget (as close to it as the channel grid allows).

Final fine-tune (every row but ``baseline``): BN recalibration on ``--bn-batches`` train batches (then the
proxy accuracy on the val subset is recorded), ``--epochs`` of SGD (lr ``--lr`` cosine, batch 128, KD from the
adapted baseline with ``--kd``), then top-1 on ``--test-images`` test images (stratified; all 10k by default). Export speed-up =
(latency speed-up) / (MACs reduction), both as factors over the baseline, on the TorchScript file that
``core.export.export_model`` writes and ``load_exported`` reads back (what ``slimsearch export`` gives a user).

CPU (2 shared cores here; 1 thread, nice), one model per invocation:
  nice -n 5 python benchmarks/bench_compare.py --models resnet20 --threads 1 > /work/runs/compare20.log 2>&1
  nice -n 5 python benchmarks/bench_compare.py --models resnet56 --threads 1 > /work/runs/compare56.log 2>&1
GPU scale (searches and fine-tunes on the GPU; latency is still measured on the CPU, 1 thread):
  python benchmarks/bench_compare.py --device cuda --epochs 5 --n-trials 100 --val-images 5000 --bn-batches 16 \
      --scan-rates 0.2,0.4,0.6,0.8 --ga-pop 20 --ga-generations 10
Smoke test: --models resnet20 --budgets 0.5 --n-trials 2 --steps 5 --test-images 500 --val-images 200
Writes benchmarks/results/compare_<model>.json and regenerates benchmarks/results/compare.md from every
compare_*.json there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.budget import bisect_budget, fit_macs, policy_macs, prunable_leaders  # noqa: E402
from slimsearch.core.cost import count_cost, measure_latency  # noqa: E402
from slimsearch.core.criteria import global_rates, group_importance  # noqa: E402
from slimsearch.core.data import DataSplits, batches  # noqa: E402
from slimsearch.core.errors import SlimError  # noqa: E402
from slimsearch.core.export import MEMORY_FORMATS, export_model, load_exported  # noqa: E402
from slimsearch.core.graph import model_graph  # noqa: E402
from slimsearch.core.policy import LayerPolicy, Policy  # noqa: E402
from slimsearch.core.tp_prune import pruned_rates, tp_prune  # noqa: E402
from slimsearch.core.train import FinetuneConfig, finetune, recalibrate_bn  # noqa: E402
from slimsearch.core.train import evaluate as accuracy  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECKPOINTS,
    SHAPE,
    adapted_dir,
    load_adapted,
    load_cifar,
    machine,
    parse_evaluator,
    run_script,
    shared_root,
    stratified_subset,
)

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("tp_l1", "tp_global", "fpgm")
# Criterion a projection gives the layers a method left unpruned: the method's own (GA's masks need a search,
# so its fallback l1; MTD only decomposes).
METHOD_CRITERION = {"abshpc": "hpc", "distfit": "distfit", "ga": "l1", "mtd": "l1"}
LABELS = {"tp_l1": "TP uniform L1", "tp_global": "TP global (group norm)", "fpgm": "uniform FPGM",
          "abshpc": "ABSHPC", "mtd": "MTD", "ga": "GA", "distfit": "distfit", "slimsearch": "slimsearch",
          "baseline": "baseline", "baseline+ft": "baseline+ft", "tp_alloc_l1": "TP global allocation, L1 filters",
          "tp_alloc_fpgm": "TP global allocation, FPGM filters"}  # fmt: skip
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- pure pieces (unit-tested)


def inner_leaders(model: nn.Module, shape: Sequence[int] = SHAPE) -> list[str]:
    """The prunable convs outside coupled groups (on the ResNets: each block's first conv)."""
    g = model_graph(model, tuple(shape))
    return [n for n in prunable_leaders(model, shape) if g.layers[n].group is None]


def uniform_policy(
    model: nn.Module, rate: float, criterion: str, shape: Sequence[int] = SHAPE, coupled: bool = False
) -> Policy:
    """Every prunable leader at ``rate`` (6 decimals, as JSON keeps it) with ``criterion``; the coupled groups
    (residual streams) only when ``coupled``."""
    r = round(float(rate), 6)
    leaders = prunable_leaders(model, shape) if coupled else inner_leaders(model, shape)
    return Policy({n: LayerPolicy(prune_rate=r, criterion=criterion) for n in leaders})


def global_policy(b: Bench, max_macs: float) -> tuple[Policy, float]:
    """The search's ``global`` seed (``search.seeding.global_seeds``) on the block-inner convs, its fraction
    bisected onto the budget: TP global's allocation rule with our L2 filter choice."""
    mods = dict(b.base.named_modules())
    scores = {n: group_importance([mods[n].weight]) for n in inner_leaders(b.base)}

    def at(f: float) -> Policy:
        return Policy(
            {n: LayerPolicy(prune_rate=round(r, 6), criterion="l2") for n, r in global_rates(scores, f).items()}
        )

    f, _ = bisect_budget(lambda x: policy_macs(b.base, at(x), SHAPE), max_macs, iters=b.args.bisect_iters)
    return at(f), f


def allocation_policy(base: nn.Module, pruned: nn.Module, criterion: str) -> Policy:
    """``pruned``'s per-layer allocation (its block-inner convs' kept-filter counts) as a policy on ``base``
    with our ``criterion`` choosing the filters: Torch-Pruning global's allocation, our filter choice."""
    rates = pruned_rates(base, pruned, inner_leaders(base))
    return Policy({n: LayerPolicy(prune_rate=round(r, 6), criterion=criterion) for n, r in rates.items()})


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--budgets", default="0.5,0.3", help="MACs budgets as fractions of the original")
    p.add_argument("--candidates", default="tp_l1,tp_global,fpgm,abshpc,mtd,ga,distfit,slimsearch")
    p.add_argument("--epochs", type=float, default=0.05, help="final fine-tune epochs (45k images), every row")
    p.add_argument("--steps", type=int, default=None, help="final fine-tune steps instead of --epochs")
    p.add_argument("--lr", type=float, default=0.01, help="final fine-tune lr (cosine)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kd", action="store_true", help="final fine-tune with KD from the adapted baseline")
    p.add_argument("--test-images", type=int, default=10000, help="test images, class-stratified (10000 = all)")
    p.add_argument("--val-images", type=int, default=500, help="val subset of the search's evaluator")
    p.add_argument("--evaluator", default="finetune:5", help="slimsearch's evaluator: proxy | finetune:<steps>")
    p.add_argument("--bn-batches", type=int, default=4, help="BN recalibration batches (proxy and final)")
    p.add_argument("--n-trials", type=int, default=40, help="slimsearch trials per budget (seeds included)")
    p.add_argument("--n-startup-trials", type=int, default=10, help="TPE random startup trials")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random", "nsga2", "cmaes", "local"))
    p.add_argument("--fit", choices=("scale", "fill"), default=None,
                   help="[constraint] fit of the search (default: the study file's)")  # fmt: skip
    p.add_argument(
        "--search-seeds",
        default=None,
        metavar="S,S,...",
        help="sampler seeds: one slimsearch search (and row) per seed, verdicts on their mean; "
        "fine-tunes keep --seed (default: --seed)",
    )
    p.add_argument(
        "--rerank",
        type=int,
        default=1,
        metavar="K",
        help="final-fine-tune the K best trials (by the search's val accuracy) and keep the one with "
        "the best held-out val accuracy; 1 = the search's best (what `slimsearch export` "
        "does by default; --top-k there)",
    )
    p.add_argument(
        "--held-out-images",
        type=int,
        default=2000,
        help="val images after the search's subset, scored after every final fine-tune (--rerank)",
    )
    p.add_argument("--study-seeds", default="uniform,methods",
                   help="slimsearch seeds: uniform (L1 and FPGM at the budget), global (one L2 threshold "
                        "over all layers at the budget), tp (the tp_global row's per-layer allocation with L1 "
                        "and FPGM filters; needs tp_global among --candidates), methods (projected paper "
                        "policies)")  # fmt: skip
    p.add_argument("--space", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [space] key of the study file (TOML value), e.g. --space \"decomposition=['none']\"")  # fmt: skip
    p.add_argument("--latency-bound", type=float, default=None, metavar="RATIO",
                   help="slimsearch also bounds its predicted latency: [constraint] max_latency_ratio")  # fmt: skip
    p.add_argument("--latency-batch", type=int, default=64, help="batch size of --latency-bound")
    p.add_argument("--bisect-iters", type=int, default=12)
    p.add_argument("--tp-max-ratio", type=float, default=0.9, help="TP max_pruning_ratio: most pruned of one layer")
    # paper strategies (same flags as bench_methods.py), small CPU budgets
    p.add_argument("--abshpc-epsilon", type=float, default=0.005)
    p.add_argument(
        "--abshpc-resolution",
        type=float,
        default=0,
        help="stop a layer's bisection at this rate gap (0: one filter, the paper's rule)",
    )
    p.add_argument("--mtd-tol", type=float, default=0.01)
    p.add_argument("--mtd-rank-ratio", type=float, default=None, help="CP/Tucker rank ratio (default: EVBMF)")
    p.add_argument("--ga-pop", type=int, default=6)
    p.add_argument("--ga-generations", type=int, default=3)
    p.add_argument("--ga-tol", type=float, default=0.01)
    p.add_argument("--distfit-rate", type=float, default=None, help="uniform rate (default: sensitivity scan)")
    p.add_argument("--distfit-tol", type=float, default=0.01)
    p.add_argument("--scan-rates", default="0.3,0.6", help="sensitivity-scan rates of ga and distfit")
    p.add_argument("--lat-repeats-b1", type=int, default=20)
    p.add_argument("--lat-repeats-b64", type=int, default=3)
    p.add_argument("--latency-format", default="torchscript", choices=("torchscript", "torchscript-frozen"),
                   help="export whose latency is measured (frozen: BN folded, see core.export)")  # fmt: skip
    p.add_argument("--latency-memory-format", default="auto", choices=(*MEMORY_FORMATS, "auto"),
                   help="conv weight layout of the timed exports; auto: both, each row's faster per batch size")  # fmt: skip
    p.add_argument("--retime", action="store_true",
                   help="re-measure the latency of every row of --out's compare_<model>.json (networks rebuilt "
                        "from their policies / TP ratios; accuracies kept) and regenerate compare.md")  # fmt: skip
    p.add_argument("--lat-rounds", type=int, default=3, help="round-robin latency rounds over all exports (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda (searches and fine-tunes; latency stays on CPU)")
    p.add_argument("--shared", default=shared_root(), help="folder with models/ and data/ ($SLIMSEARCH_SHARED)")
    p.add_argument("--adapted-dir", default=str(adapted_dir()), help="adapted checkpoints ($SLIMSEARCH_ADAPTED)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--markdown-only", action="store_true", help="only regenerate compare.md from compare_*.json")
    args = p.parse_args(argv)
    parse_evaluator(args.evaluator)  # a typo fails here, not after the baselines
    try:
        space_overrides(args.space)
    except SlimError as e:
        p.error(str(e))
    return args


def search_seeds(a: argparse.Namespace) -> list[int]:
    """``--search-seeds`` as ints (default: ``--seed``)."""
    if a.search_seeds is None:
        return [a.seed]
    try:
        return [int(x) for x in _list(a.search_seeds)]
    except ValueError:
        raise SystemExit(f"--search-seeds: expected integers, got {a.search_seeds!r}") from None


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Bench:
    """What every candidate of one model shares."""

    name: str
    args: argparse.Namespace
    base: nn.Module
    splits: DataSplits  # train, val subset (proxy), test subset
    held_out: Any  # val images the searches never see (--rerank chooses on them); None when empty
    base_macs: int
    base_params: int
    base_ts: Any  # the baseline's TorchScript exports, reloaded: layout -> program
    log: Log
    tmp: Path
    done: dict[str, dict] = dataclasses.field(default_factory=dict)  # final results by model identity
    exports: dict[str, Any] = dataclasses.field(default_factory=dict)  # their exports (layout -> program), same keys

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device


def latency(model: nn.Module | Any, args: argparse.Namespace) -> dict[str, float]:
    """Median single-thread CPU latency (ms) at batch 1 and 64."""
    b1 = measure_latency(model, SHAPE, 1, threads=1, repeats=args.lat_repeats_b1, warmup=3)
    b64 = measure_latency(model, SHAPE, 64, threads=1, repeats=args.lat_repeats_b64, warmup=1)
    return {"b1_ms": b1.median_ms, "b64_ms": b64.median_ms}


def export_reload(model: nn.Module, policy: Policy | None, where: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The TorchScript export (``--latency-format``) of a CPU copy of ``model`` in each layout of
    ``--latency-memory-format`` (auto: contiguous and channels_last), reloaded as a user would; layout -> program."""
    cpu, fmt = copy.deepcopy(model).cpu().eval(), args.latency_format
    layouts = tuple(MEMORY_FORMATS) if args.latency_memory_format == "auto" else (args.latency_memory_format,)
    out = {}
    for layout in layouts:
        files = export_model(cpu, policy, where / layout, formats=(fmt,), example_input=SHAPE, memory_format=layout)
        out[layout] = load_exported(files[fmt])
    return out


def latency_phase(b: Bench) -> dict[str, dict[str, Any]]:
    """Every export of the model, the baseline's included, each layout of it, measured round-robin
    ``--lat-rounds`` times (the order reversed every other round); the best median of each per batch size over
    rounds and layouts (``b1_layout`` / ``b64_layout``: the faster layout), by ``b.exports`` key and ``"baseline"``.

    Measured after every fine-tune, so all candidates see the same conditions: measuring each right after
    its own fine-tune (even paired with the baseline) gave two identically shaped ResNet-56s 1.39x and 1.67x.
    Several layouts, because neither wins everywhere on our CPU: channels_last runs pruned ResNets with odd
    channel counts 1.2-1.6x slower at batch 1 and up to 2.6x faster at batch 64 (results/memory_format.md).
    """
    models = {"baseline": b.base_ts} | b.exports
    best: dict[str, dict[str, Any]] = {k: dict.fromkeys(("b1_ms", "b64_ms"), math.inf) for k in models}
    for r in range(b.args.lat_rounds):
        for k in list(models) if r % 2 == 0 else list(reversed(models)):
            for layout, program in models[k].items():
                for m, v in latency(program, b.args).items():
                    if v < best[k][m]:
                        best[k][m], best[k][m.replace("_ms", "_layout")] = v, layout
    return best


def add_latency(row: dict[str, Any], lat: dict[str, float], base_lat: dict[str, float], base_macs: int) -> None:
    """The row's latency, speed-ups and export speed-ups (speed-up / MACs reduction) against ``base_lat``."""
    row["latency"] = dict(lat) | {f"base_{k}": v for k, v in base_lat.items()}
    for bs in ("b1", "b64"):
        sp = base_lat[f"{bs}_ms"] / lat[f"{bs}_ms"]
        row[f"speedup_{bs}"] = sp
        row[f"export_speedup_{bs}"] = sp / (base_macs / row["macs"])


def finish(b: Bench, model: nn.Module, policy: Policy | None, key: str) -> dict[str, Any]:
    """The final fine-tune (in place) and every measurement of one candidate; memoised by ``key``."""
    if key in b.done:
        return dict(b.done[key], reused=True)
    a = b.args
    t = time.perf_counter()
    model.to(b.device)
    recalibrate_bn(model, b.splits.train, num_batches=a.bn_batches, batch_size=a.batch_size, seed=a.seed)
    proxy = accuracy(model, b.splits.val)
    cfg = FinetuneConfig(epochs=a.epochs, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    res = finetune(model, b.splits.train, cfg, teacher=b.base if a.kd else None)
    ft_s = time.perf_counter() - t
    model.eval()
    t = time.perf_counter()
    test = accuracy(model, b.splits.test)
    test_s = time.perf_counter() - t
    t = time.perf_counter()
    held = accuracy(model, b.held_out) if b.held_out is not None else None
    held_s = time.perf_counter() - t
    cost = count_cost(model, SHAPE)
    b.exports[key] = export_reload(model, policy, b.tmp / f"export-{len(b.done)}", a)
    row = {"test_acc": test, "proxy_val_acc": proxy, "finetune_steps": res.steps, "finetune_s": ft_s,
           "test_s": test_s, "held_out_val_acc": held, "held_out_s": held_s, "macs": cost.macs, "params": cost.params, "macs_pct": 100.0 * cost.macs / b.base_macs,
           "params_pct": 100.0 * cost.params / b.base_params, "latency_key": key}  # fmt: skip
    b.done[key] = row
    b.log(f"    test {100 * test:.2f} % (proxy {100 * proxy:.2f}), {cost.macs / 1e6:.2f} M MACs "
          f"({row['macs_pct']:.1f} %); ft {ft_s:.0f} s test {test_s:.0f} s")  # fmt: skip
    return dict(row)


def policy_key(policy: Policy) -> str:
    return f"policy:{policy.hash}"


def run_baseline(b: Bench, kind: str, max_macs: float) -> tuple[dict, nn.Module, Policy | None]:
    """tp_l1 / tp_global / fpgm at the budget: bisect the ratio on count_cost."""
    t = time.perf_counter()
    if kind == "fpgm":

        def macs_fpgm(r: float) -> float:
            return policy_macs(b.base, uniform_policy(b.base, r, "fpgm"), SHAPE)

        r, macs = bisect_budget(macs_fpgm, max_macs, iters=b.args.bisect_iters)
        policy: Policy | None = uniform_policy(b.base, r, "fpgm")
        model = apply_policy(b.base, policy, input_shape=SHAPE)
        setting = f"rate {r:.4f} everywhere"
    else:

        def macs_tp(r: float) -> float:
            return count_cost(tp_prune(b.base, kind, r, SHAPE, max_ratio=b.args.tp_max_ratio), SHAPE).macs

        # Above max_pruning_ratio Torch-Pruning skips a group instead of capping it (MACs go back up), so the
        # bisection stays at or below the cap, where MACs fall monotonically with the ratio.
        r, macs = bisect_budget(macs_tp, max_macs, hi=b.args.tp_max_ratio, iters=b.args.bisect_iters)
        policy, model = None, tp_prune(b.base, kind, r, SHAPE, max_ratio=b.args.tp_max_ratio)
        setting = f"TP pruning_ratio {r:.4f}" + (" (global)" if kind == "tp_global" else " (uniform)")
    row = {"method": kind, "kind": "baseline", "setting": setting, "ratio": r, "search_s": time.perf_counter() - t,
           "evaluator_calls": 0, "projected": False}  # fmt: skip
    return row, model, policy


def run_methods(b: Bench, names: list[str]) -> dict[str, dict]:
    """Each paper strategy once per model (the proxy as acc; no MACs target): policy, MACs, time, calls."""
    from slimsearch.evaluators.cache import ResultCache
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.evaluators.context import build_context
    from slimsearch.evaluators.evaluate import evaluate
    from slimsearch.search.methods import run_method
    from slimsearch.search.methods.common import as_accuracy

    from benchmarks.bench_methods import PAPER, method_options

    a = b.args
    cfg = EvaluatorConfig(kind="proxy", bn_batches=a.bn_batches, batch_size=a.batch_size, seed=a.seed)
    ctx = build_context(b.base, b.splits, SHAPE, score_baseline=False, cache=ResultCache())
    out = {}
    for name in names:
        calls = 0

        def acc(policy: Policy) -> float:
            nonlocal calls
            res = evaluate(ctx, cfg, policy)
            calls += not res.cached
            return as_accuracy(res)

        inputs = next(iter(batches(b.splits.train, 256, shuffle=True, seed=a.seed)))[0] if name == "ga" else None
        ma = argparse.Namespace(**vars(a))
        if ma.abshpc_resolution is not None and ma.abshpc_resolution <= 0:
            ma.abshpc_resolution = None  # 0: bisect every layer down to one filter (the paper's rule)
        opts = method_options(name, ma)
        t = time.perf_counter()
        res = run_method(name, model=b.base, acc=acc, inputs=inputs if inputs is not None else torch.zeros(SHAPE),
                         **opts)  # fmt: skip
        s = time.perf_counter() - t
        macs = policy_macs(b.base, res.policy, SHAPE)
        b.log(
            f"  {name}: {s:.0f} s, {calls} evaluator calls (shared cache), native MACs {100 * macs / b.base_macs:.1f} %"
        )
        out[name] = {"method": name, "policy": res.policy, "search_s": s, "evaluator_calls": calls, "macs": macs, "options": opts,
                     "paper": PAPER[name], "a0": res.report.get("a0"), "summary": res.policy.summary()}  # fmt: skip
    return out


def project(b: Bench, native: dict, max_macs: float) -> tuple[Policy, bool, float, float]:
    """The method's policy if within budget, else its projection; (policy, projected, t, seconds)."""
    t0 = time.perf_counter()
    if native["macs"] <= max_macs:
        return native["policy"], False, 0.0, 0.0
    crit = METHOD_CRITERION[native["method"]]
    # the block-inner convs the method left alone are pruned with its criterion; the residual streams are not
    given = native["policy"].layers
    start = Policy({**{n: LayerPolicy(criterion=crit) for n in inner_leaders(b.base) if n not in given}, **given})
    pol, t = fit_macs(b.base, start, max_macs, SHAPE, criterion=None, t_max=0.98, rel_tol=0.0,
                      max_evals=b.args.bisect_iters + 2)  # fmt: skip
    if t is None:
        raise SlimError(f"{native['method']}: {max_macs:,.0f} MACs is out of reach by scaling its policy")
    return pol, True, t, time.perf_counter() - t0


# ----------------------------------------------------------------------------- slimsearch


_GIVEN: dict[str, list[Policy]] = {}


def _register_given() -> None:
    """Seed strategy ``bench_given``: the exact policies this script computed (search.study's registry)."""
    from slimsearch.search.seed_params import SEED_STRATEGIES, register_seed_strategy

    if "bench_given" in SEED_STRATEGIES:
        return

    @register_seed_strategy("bench_given")
    def given(ctx: Any, params: Any) -> list[Policy]:
        return list(_GIVEN.get(str(params.get("key")), []))


def space_overrides(items: list[str]) -> dict[str, Any]:
    """``["decomposition=['none']", "rank_ratio=[0.2, 0.6]"]`` -> [space] keys with TOML values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SlimError(f"--space {item!r}: expected KEY=VALUE (a TOML value)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise SlimError(f"--space {item!r}: {value!r} is not a TOML value ({e})") from None
    return out


def latency_constraint(a: argparse.Namespace) -> dict[str, Any]:
    """The [constraint] latency keys of ``--latency-bound`` / ``--latency-batch`` (none without a bound)."""
    if a.latency_bound is None:
        return {}
    return {"max_latency_ratio": float(a.latency_bound), "latency_batch": int(a.latency_batch)}


def latency_layout(a: argparse.Namespace) -> dict[str, Any]:
    """build_context's memory format of the latency bound: the timed exports' (``--latency-memory-format``)."""
    return {"latency_memory_format": a.latency_memory_format} if a.latency_bound is not None else {}


def study_config(b: Bench, max_macs: float, tag: str, seeds: list[tuple[str, Policy]], search_seed: int) -> Any:
    """A StudyConfig like studies/<model>_cifar10.toml, with the budget, the proxy and a temp storage."""
    from slimsearch.search.study import study_from_dict

    a = b.args
    toml = tomllib.loads((REPO / "studies" / f"{b.name}_cifar10.toml").read_text())
    work = b.tmp / f"study-{tag}"
    raw: dict[str, Any] = {
        "study": {"name": f"compare_{b.name}_{tag}", "storage": f"sqlite:///{work}/study.db", "workdir": str(work),
                  "sampler": a.sampler, "n_trials": a.n_trials, "n_startup_trials": min(a.n_startup_trials, a.n_trials),
                  "seed": search_seed, "pruner": "none"},
        "model": {"factory": b.name, "checkpoint": str(Path(a.adapted_dir) / f"{b.name}-jpeg.th")},
        "data": {"dataset": "cifar10", "root": str(Path(a.shared) / "data" / "cifar10-jpeg.tar.gz"), "val_size": 5000},
        "constraint": {"max_macs": float(max_macs), "fit": a.fit or toml["constraint"].get("fit", "scale")}
        | latency_constraint(a),
        "space": toml["space"] | space_overrides(a.space),
        "evaluator": {"bn_batches": a.bn_batches, "batch_size": a.batch_size, "seed": a.seed}
        | parse_evaluator(a.evaluator)[1],
    }  # fmt: skip
    if seeds:
        _register_given()
        _GIVEN[tag] = [p for _, p in seeds]
        raw["seeds"] = {"strategies": ["bench_given"], "bench_given_key": tag}
    return study_from_dict(raw, REPO / "studies" / f"{b.name}_cifar10.toml")


def run_slimsearch(
    b: Bench, max_macs: float, tag: str, seeds: list[tuple[str, Policy]], search_seed: int
) -> tuple[dict, list[Any]]:
    """The search machinery of ``slimsearch run`` (one worker) on the val subset, sampler seeded with
    ``search_seed``; the row and the ``--rerank`` best feasible trials (``search.export.top_trials``), best first."""
    from slimsearch.evaluators.cache import ResultCache
    from slimsearch.evaluators.context import build_context
    from slimsearch.search.context import StudyContext
    from slimsearch.search.export import top_trials
    from slimsearch.search.optuna_study import record_from_trial
    from slimsearch.search.records import trial_line
    from slimsearch.search.runner import open_storage, prepare_study, trial_loop
    from slimsearch.spaces.space import SearchSpace

    cfg = study_config(b, max_macs, tag, seeds, search_seed)
    t = time.perf_counter()
    ectx = build_context(b.base, b.splits, SHAPE, max_macs=max_macs, score_baseline=False, cache=ResultCache(),
                         **latency_constraint(b.args), **latency_layout(b.args))  # fmt: skip
    space = SearchSpace.build(b.base, cfg.space, SHAPE)
    sha = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in b.base.state_dict().values()))
    sctx = StudyContext(cfg, b.base, b.splits, SHAPE, ectx, space, cfg.model.checkpoint, sha.hexdigest()[:16])
    study = prepare_study(cfg, sctx, open_storage(cfg), log=lambda s: b.log(f"    {s}"))
    trial_loop(study, sctx, cfg, on_trial=lambda ft: b.log(f"    {trial_line(record_from_trial(ft))}"))
    trials = study.get_trials(deepcopy=False)
    by_number = {tr.number: tr for tr in trials}
    ranked = [by_number[r.number] for r in top_trials([record_from_trial(tr) for tr in trials], max(1, b.args.rerank))]
    best = ranked[0]
    states: dict[str, int] = {}
    for tr in trials:
        st = tr.user_attrs.get("status", tr.state.name.lower())
        states[st] = states.get(st, 0) + 1
    labels = [lab for lab, _ in seeds]
    seed_of = best.user_attrs.get("seed")
    row = {"method": "slimsearch", "kind": "slimsearch", "search_s": time.perf_counter() - t,
           "evaluator_calls": sum(1 for tr in trials if not tr.user_attrs.get("cached", False)),
           "n_trials": len(trials), "trial_states": states, "best_trial": best.number,
           "best_proxy_val_acc": best.user_attrs.get("val_acc"),
           "best_from_seed": labels[int(seed_of.split("#")[1])] if seed_of else None,
           "seeds": labels, "space": dict(cfg.space.to_dict()), "evaluator": cfg.evaluator.to_dict(),
           "sampler": cfg.study.sampler, "n_startup_trials": cfg.study.n_startup_trials,
           "setting": f"{len(trials)} trials, {cfg.study.sampler}, {parse_evaluator(b.args.evaluator)[0]}"
                      + (f", predicted latency b{b.args.latency_batch} <= {b.args.latency_bound:.3f} x"
                         if b.args.latency_bound is not None else ""),
           "best_latency_ratio_predicted": best.user_attrs.get("latency_ratio"),
           "search_seed": search_seed, "projected": False}  # fmt: skip
    return row, ranked


def rerank(b: Bench, ranked: list[Any]) -> tuple[dict, Policy]:
    """Final-fine-tune each of ``ranked`` (best first) and keep the best on the held-out val images.

    Returns the chosen one's measurements plus ``rerank`` (every candidate: search val, held-out val, test;
    the test numbers are reported, never used to choose) and ``rerank_s`` (the extra fine-tunes and held-out
    scoring: search time).
    """
    a = b.args
    done = []
    for tr in ranked:
        policy = Policy.from_json(tr.user_attrs["policy"])
        b.log(f"    rerank: trial {tr.number} (search val {100 * tr.user_attrs.get('val_acc', 0):.2f} %)")
        fin = finish(b, apply_policy(b.base, policy, input_shape=SHAPE, seed=a.seed), policy, policy_key(policy))
        done.append((tr, policy, fin))
    pick = 0
    if len(done) > 1:
        if b.held_out is None:
            raise SlimError("--rerank needs held-out val images (--held-out-images > 0 and val beyond --val-images)")
        pick = max(range(len(done)), key=lambda i: (done[i][2]["held_out_val_acc"], -i))
    info = [{"trial": tr.number, "search_val_acc": tr.user_attrs.get("val_acc"),
             "held_out_val_acc": fin["held_out_val_acc"], "test_acc": fin["test_acc"], "macs_pct": fin["macs_pct"],
             "chosen": i == pick} for i, (tr, _, fin) in enumerate(done)]  # fmt: skip
    extra = sum(fin.get("held_out_s", 0.0) + (0.0 if i == pick else fin["finetune_s"])
                for i, (_, _, fin) in enumerate(done))  # fmt: skip
    tr, policy, fin = done[pick]
    out = dict(
        fin,
        rerank=info,
        rerank_s=extra if len(done) > 1 else 0.0,
        best_trial=tr.number,
        best_proxy_val_acc=tr.user_attrs.get("val_acc"),
        search_top1_test_acc=done[0][2]["test_acc"],
    )
    return out, policy


# ----------------------------------------------------------------------------- one model


def baseline_test_acc(b: Bench, log: Log) -> tuple[float, str]:
    """The adapted checkpoint's test accuracy: from adapt_baselines.json when it scored this very file on the
    same full test split, else measured here."""
    ckpt = Path(b.args.adapted_dir) / f"{b.name}-jpeg.th"
    js = Path(b.args.out) / "adapt_baselines.json"
    if b.args.test_images >= 10000 and js.is_file() and js.stat().st_mtime >= ckpt.stat().st_mtime:
        for r in json.loads(js.read_text()).get("rows", []):
            if r.get("model") == b.name and Path(r.get("adapted_path", "")) == ckpt:
                return float(r["adapted"]["test_acc"]), "adapt_baselines.json"
    log("  scoring the adapted baseline on the test images")
    return accuracy(b.base, b.splits.test), "measured"


def run_model(name: str, args: argparse.Namespace, splits: DataSplits, log: Log) -> dict:
    t_model = time.perf_counter()
    cands = _list(args.candidates)
    methods = [c for c in cands if c in ("abshpc", "mtd", "ga", "distfit")]
    base = load_adapted(name, args.adapted_dir).to(args.device)
    n_val, n_test = min(args.val_images, len(splits.val)), min(args.test_images, len(splits.test))
    # val is stored classes interleaved (its first n are balanced); test class by class, hence stratified.
    sub = DataSplits(splits.train, splits.val.subset(torch.arange(n_val)), stratified_subset(splits.test, n_test))
    c0 = count_cost(base, SHAPE)
    with tempfile.TemporaryDirectory(prefix=f"compare-{name}-") as tmp:
        n_held = max(0, min(args.held_out_images, len(splits.val) - n_val))
        held = splits.val.subset(torch.arange(n_val, n_val + n_held)) if n_held else None
        b = Bench(name, args, base, sub, held, c0.macs, c0.params, None, log, Path(tmp))
        b.base_ts = export_reload(base, Policy(), b.tmp / "export-base", args)
        log(f"{name}: {c0.macs / 1e6:.2f} M MACs, {c0.params / 1e6:.3f} M params")
        refs = [{"method": "baseline", "kind": "reference",
                 "macs": c0.macs, "params": c0.params, "macs_pct": 100.0, "params_pct": 100.0,
                 "search_s": 0.0, "evaluator_calls": 0, "setting": "adapted checkpoint, no fine-tune"}]  # fmt: skip
        log("  baseline+ft")
        ft = {"method": "baseline+ft", "kind": "reference", "search_s": 0.0, "evaluator_calls": 0,
              "setting": "adapted checkpoint + the final fine-tune"}  # fmt: skip
        ft.update(finish(b, apply_policy(base, Policy(), input_shape=SHAPE), Policy(), "policy:identity"))
        refs.append(ft)
        log(f"  paper strategies: {', '.join(methods) or '-'}")
        natives = run_methods(b, methods)
        budgets = []
        for frac in [float(x) for x in _list(args.budgets)]:
            budgets.append(run_budget(b, frac, natives, cands))
        log(f"  latency: {len(b.exports) + 1} TorchScript exports, {args.lat_rounds} round-robin rounds")
        lat = latency_phase(b)
        base_lat = lat["baseline"]
        refs[0]["latency_key"] = "baseline"
        for row in refs + [r for bud in budgets for r in bud["rows"] if "latency_key" in r]:
            add_latency(row, lat[row["latency_key"]], base_lat, c0.macs)
            log(f"    {row['method']:>22}: b1 {row['latency']['b1_ms']:.2f} ms, b64 {row['latency']['b64_ms']:.1f} ms, "
                f"export speed-up {row['export_speedup_b1']:.2f} / {row['export_speedup_b64']:.2f}")  # fmt: skip
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "shared", "models", "adapted_dir")}
        methods_info = {m: {k: v for k, v in d.items() if k != "policy"} | {"policy": d["policy"].to_dict()}
                        for m, d in natives.items()}  # fmt: skip
        res = {
            "model": name,
            "checkpoint": f"{name}-jpeg.th (benchmarks/adapt_baselines.py, JPEG-adapted {CHECKPOINTS[name]})",
            "data": "cifar10-jpeg.tar.gz (JPEG pixels; numbers not comparable with published CIFAR-10 tables)",
            "splits": {"train": len(sub.train.y), "val_subset": n_val, "held_out_val": n_held, "test": n_test},
            "settings": settings,
            "latency_artefact": f"{args.latency_format} export ({args.latency_memory_format}, core.export.export_model) reloaded with core.export.load_exported;"
                                " single thread; median of repeats, best of --lat-rounds round-robin rounds over every"
                                " export of the model after all fine-tunes (bench_compare.latency_phase)",
            "machine": machine(),
            "base": {"macs": c0.macs, "params": c0.params, "latency": base_lat},
            "references": refs,
            "methods": methods_info,
            "budgets": budgets,
            "total_s": time.perf_counter() - t_model,
        }  # fmt: skip
        # last: adapt_baselines.json may score this checkpoint meanwhile (saves a full test pass)
        refs[0]["test_acc"], refs[0]["test_acc_source"] = baseline_test_acc(b, log)
        return res


def run_budget(b: Bench, frac: float, natives: dict[str, dict], cands: list[str]) -> dict:
    a, log = b.args, b.log
    max_macs = frac * b.base_macs
    tag = f"{round(100 * frac)}"
    log(f"{b.name} budget {tag} % ({max_macs / 1e6:.2f} M MACs)")
    rows: list[dict] = []
    for kind in [c for c in cands if c in BASELINES]:
        log(f"  {kind}")
        row, model, policy = run_baseline(b, kind, max_macs)
        if kind == "tp_global" and "tp" in _list(a.study_seeds):
            alloc = {crit: allocation_policy(b.base, model, crit) for crit in ("l1", "fpgm")}
        key = policy_key(policy) if policy is not None else f"{kind}:{row['ratio']}"
        row.update(finish(b, model, policy, key))
        if policy is not None:
            row["policy"] = policy.to_dict()
        rows.append(row)
    seeds: list[tuple[str, Policy]] = []
    if "tp" in _list(a.study_seeds):  # main() checked that tp_global ran
        for crit, policy in alloc.items():  # scored like any row too: our filter choice vs TP's
            log(f"  TP global allocation, {crit} filters")
            row = {"method": f"tp_alloc_{crit}", "kind": "seed", "search_s": 0.0, "evaluator_calls": 0,
                   "projected": False, "policy": policy.to_dict(),
                   "setting": f"tp_global's kept-filter counts, filters chosen by {crit}"}  # fmt: skip
            model = apply_policy(b.base, policy, input_shape=SHAPE, seed=a.seed)
            row.update(finish(b, model, policy, policy_key(policy)))
            rows.append(row)
            seeds.append((f"tp_global allocation {crit}", policy))
    if "uniform" in _list(a.study_seeds):
        for crit in ("l1", "fpgm"):

            def macs_uniform(x: float, c: str = crit) -> float:
                return policy_macs(b.base, uniform_policy(b.base, x, c), SHAPE)

            r, _ = bisect_budget(macs_uniform, max_macs, iters=a.bisect_iters)
            seeds.append((f"uniform {crit} {r:.3f}", uniform_policy(b.base, r, crit)))
    if "global" in _list(a.study_seeds):
        policy, f = global_policy(b, max_macs)
        seeds.append((f"global l2 {f:.3f}", policy))
    for name, native in natives.items():
        log(f"  {name}")
        try:
            policy, projected, t, proj_s = project(b, native, max_macs)
        except SlimError as e:
            log(f"    cannot project {name}: {e}")
            rows.append({"method": name, "kind": "paper", "error": str(e), "search_s": native["search_s"]})
            continue
        row = {"method": name, "kind": "paper", "projected": projected, "projection_t": t,
               "search_s": native["search_s"] + proj_s, "evaluator_calls": native["evaluator_calls"],
               "native_macs_pct": 100.0 * native["macs"] / b.base_macs, "policy": policy.to_dict(),
               "setting": (f"projected: kept filters x{1 - t:.3f}" if projected else "native policy (under budget)")}  # fmt: skip
        model = apply_policy(b.base, policy, input_shape=SHAPE, seed=a.seed)
        row.update(finish(b, model, policy, policy_key(policy)))
        rows.append(row)
        if "methods" in _list(a.study_seeds):
            seeds.append((f"{name}{' (projected)' if projected else ''}", policy))
    for s in search_seeds(a) if "slimsearch" in cands else []:
        log(f"  slimsearch: {a.n_trials} trials, {len(seeds)} seeds, search seed {s}")
        row, ranked = run_slimsearch(b, max_macs, f"{tag}-s{s}", seeds, s)
        if "methods" in _list(a.study_seeds):
            row["seed_methods_s"] = sum(n["search_s"] for n in natives.values())
            row["search_s"] += row["seed_methods_s"]
        fin, policy = rerank(b, ranked)
        row.update(fin)
        row["search_s"] += row["rerank_s"]
        row["policy"] = policy.to_dict()
        if len(ranked) > 1:
            row["setting"] += f", best of the top {len(ranked)} on {len(b.held_out)} held-out val images"
        rows.append(row)
    return {"budget": frac, "max_macs": max_macs, "rows": rows}


# ----------------------------------------------------------------------------- --retime


def rebuild(base: nn.Module, row: dict[str, Any], settings: dict[str, Any]) -> tuple[nn.Module, Policy | None]:
    """The network a compare row measured, rebuilt from the adapted checkpoint: its policy, or Torch-Pruning at
    its recorded ratio, or the unpruned network (baseline+ft). Weights differ from the fine-tuned ones; shapes,
    and so latency, do not."""
    if row.get("policy"):
        policy = Policy.from_dict(row["policy"])
        return apply_policy(base, policy, input_shape=SHAPE, seed=settings.get("seed", 0)), policy
    if row["method"] in ("tp_l1", "tp_global"):
        return tp_prune(base, row["method"], row["ratio"], SHAPE, max_ratio=settings["tp_max_ratio"]), None
    if row["method"] == "baseline+ft":
        return apply_policy(base, Policy(), input_shape=SHAPE), Policy()
    raise SlimError(f"--retime: cannot rebuild row {row['method']!r} (no policy, no TP ratio)")


def retime(name: str, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """``--retime``: the model's compare JSON with every row's latency measured again, all rows round-robin as
    in a run (``latency_phase``), in ``--latency-memory-format``; accuracies, MACs and search times kept, the
    verdicts recomputed. Each rebuilt network must have the MACs its row recorded."""
    path = Path(args.out) / f"compare_{name}.json"
    if not path.is_file():
        raise SlimError(f"--retime: no {path} (run the comparison first)")
    res = json.loads(path.read_text())
    previous = f"{latency_how(res)}, {res['machine']['date']}"
    base = load_adapted(name, args.adapted_dir).eval()
    c0 = count_cost(base, SHAPE)
    rows = [r for r in res["references"] + [r for bud in res["budgets"] for r in bud["rows"]] if "latency_key" in r]
    with tempfile.TemporaryDirectory(prefix=f"retime-{name}-") as tmp:
        b = Bench(name, args, base, None, None, c0.macs, c0.params, None, log, Path(tmp))  # type: ignore[arg-type]
        b.base_ts = export_reload(base, Policy(), b.tmp / "export-base", args)
        for r in rows:
            if r["latency_key"] in b.exports or r["latency_key"] == "baseline":
                continue
            model, policy = rebuild(base, r, res["settings"])
            macs = count_cost(model, SHAPE).macs
            if macs != r["macs"]:
                raise SlimError(f"--retime: {name} {r['method']} rebuilds to {macs:,} MACs; its row has {r['macs']:,}")
            b.exports[r["latency_key"]] = export_reload(model, policy, b.tmp / f"export-{len(b.exports)}", args)
        log(f"{name}: {len(b.exports) + 1} networks rebuilt, {args.lat_rounds} round-robin latency rounds")
        lat = latency_phase(b)
    for r in rows:
        r.setdefault("latency_in_run", r.get("latency"))  # the run's own measurement stays in the JSON
        add_latency(r, lat[r["latency_key"]], lat["baseline"], c0.macs)
    res["base"]["latency"] = lat["baseline"]
    m = machine()
    res["latency_retimed"] = {"date": m["date"], "loadavg": m["loadavg"], "previous": previous,
                              "settings": {k: getattr(args, k) for k in ("latency_format", "latency_memory_format",
                                                                        "lat_rounds", "lat_repeats_b1", "lat_repeats_b64")}}  # fmt: skip
    res["settings"] |= res["latency_retimed"]["settings"]
    for bud in res["budgets"]:
        bud["verdict"] = verdict(res, bud)
    return res


# ----------------------------------------------------------------------------- verdicts and tables


def verdict(res: dict, bud: dict) -> dict[str, Any]:
    """slimsearch minus the best baseline (target >= +1.0 pt); at 50 %: baseline+ft minus slimsearch (<= 0.5 pt);
    slimsearch's export speed-up (>= 0.8). Several search seeds: on their mean, each seed's gap listed."""
    done = [r for r in bud["rows"] if "test_acc" in r]
    slim = [r for r in done if r["method"] == "slimsearch"]
    base = [r for r in done if r["method"] in BASELINES]
    out: dict[str, Any] = {}
    if not slim:
        return out
    accs = [r["test_acc"] for r in slim]
    acc = sum(accs) / len(accs)
    top1 = [r.get("search_top1_test_acc", r["test_acc"]) for r in slim]
    if len(slim) > 1:
        out["search_seeds"] = {"n": len(slim), "seeds": [r.get("search_seed") for r in slim],
                               "test_acc_mean": acc, "test_acc_min": min(accs), "test_acc_max": max(accs)}  # fmt: skip
    if any(len(r.get("rerank") or []) > 1 for r in slim):
        out["search_top1"] = {"test_acc_mean": sum(top1) / len(top1), "test_acc": top1}

    def gap_to(ref: float, sign: float, target: float, **extra: Any) -> dict[str, Any]:
        gaps = [sign * 100 * (a - ref) for a in accs]
        gap = sum(gaps) / len(gaps)
        g = round(gap, 9)  # a gap printed as +1.00 meets a 1.0 target
        ok = g <= target if sign < 0 else g >= target
        return (
            extra
            | {"gap_pt": gap, "target_pt": target, "met": ok}
            | ({"per_seed_gap_pt": gaps} if len(gaps) > 1 else {})
        )

    if base:
        best = max(base, key=lambda r: r["test_acc"])
        out["vs_best_baseline"] = gap_to(best["test_acc"], 1.0, 1.0, best=best["method"])
        tp = [r for r in base if r["method"].startswith("tp_")]
        if tp:
            best_tp = max(tp, key=lambda r: r["test_acc"])
            out["vs_best_tp"] = gap_to(best_tp["test_acc"], 1.0, 1.0, best=best_tp["method"])
    if abs(bud["budget"] - 0.5) < 1e-9:
        ft = next(r for r in res["references"] if r["method"] == "baseline+ft")
        out["vs_baseline_ft"] = gap_to(ft["test_acc"], -1.0, 0.5)
    b1 = sum(r["export_speedup_b1"] for r in slim) / len(slim)
    b64 = sum(r["export_speedup_b64"] for r in slim) / len(slim)
    out["export_speedup"] = {"b1": b1, "b64": b64, "target": 0.8, "met_b1": b1 >= 0.8, "met_b64": b64 >= 0.8}
    return out


def latency_note(s: dict[str, Any]) -> str:
    """The header's words for slimsearch's latency bound (runs before --latency-bound have none)."""
    if s.get("latency_bound") is None:
        return ""
    return (f", and predicted latency at batch {s['latency_batch']} <= {s['latency_bound']} x the baseline's "
            f"([constraint] max_latency_ratio, core.latency)")  # fmt: skip


def paper_note(s: dict[str, Any]) -> str:
    """The header's paper-strategy settings, only when a paper strategy ran (as a row or as study seeds)."""
    ran = set(str(s.get("candidates", "")).split(",")) & set(METHOD_CRITERION)
    if not ran and "methods" not in str(s.get("study_seeds", "")).split(","):
        return ""
    return (f" Paper strategies: ABSHPC eps {s['abshpc_epsilon']} resolution {s['abshpc_resolution'] or 'one filter'}, "
            f"MTD tol {s['mtd_tol']} ranks {s.get('mtd_rank_ratio') or 'EVBMF'}, GA pop {s['ga_pop']} gens "
            f"{s['ga_generations']}, scan rates {s['scan_rates']}; run once per model, projected per budget when "
            f"above it.")  # fmt: skip


def _per_seed(x: dict[str, Any]) -> str:
    gaps = x.get("per_seed_gap_pt")
    return f" (per seed {', '.join(f'{g:+.2f}' for g in gaps)})" if gaps else ""


def rerank_lines(rows: list[dict]) -> list[str]:
    """One line per slimsearch row chosen by ``--rerank``: each candidate's search / held-out val and test."""
    out = []
    for r in rows:
        if len(r.get("rerank") or []) < 2:
            continue
        cands = "; ".join(f"{'**' if c['chosen'] else ''}trial {c['trial']}: search {100 * c['search_val_acc']:.1f}, "
                          f"held-out {100 * c['held_out_val_acc']:.2f}, test {100 * c['test_acc']:.2f}"
                          f"{'**' if c['chosen'] else ''}" for c in r["rerank"])  # fmt: skip
        out.append(f"- rerank (search seed {r.get('search_seed')}, +{r['rerank_s']:.0f} s): {cands}; the search's "
                   f"best alone: {100 * r['search_top1_test_acc']:.2f} %")  # fmt: skip
    return out


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def markdown(results: list[dict]) -> str:
    lines = ["# Compression comparison at equal MACs", "",
             "Generated by `benchmarks/bench_compare.py` from `compare_*.json`; do not edit by hand.", "",
             "Every row starts from the JPEG-adapted checkpoint and gets the same final fine-tune (except `baseline`). "
             "Data: the CIFAR-10 JPEG archive, so accuracies compare with each other, not with published tables. "
             "Latency: single-thread CPU, TorchScript export (plain or frozen; NCHW or channels_last weights, or the faster of both per row and batch size; as each model's line says) reloaded, median; speed-up x = baseline latency / "
             "latency (all of a model's exports measured round-robin after its fine-tunes); export speed-up = speed-up x / MACs reduction x (target >= 0.8). `proxy %` = "
             "BN-recalibrated "
             "val-subset accuracy before the fine-tune (what the searches optimise).", ""]  # fmt: skip
    for res in results:
        s, m = res["settings"], res["machine"]
        ft = f"{s['steps']} steps" if s.get("steps") else f"{s['epochs']} epoch"
        lines += [f"## {res['model']} ({m['date']})", "",
                  f"Final fine-tune {ft} x batch {s['batch_size']} (lr {s['lr']} cosine, KD {s['kd']}); test "
                  f"{res['splits']['test']} images; proxy: BN recalibration {s['bn_batches']}x{s['batch_size']} "
                  f"train images, first {res['splits']['val_subset']} val images. slimsearch: {s['n_trials']} trials "
                  f"({s['sampler']}, {s['n_startup_trials']} startup, evaluator {s.get('evaluator', 'proxy')}{', fit ' + s['fit'] if s.get('fit') else ''}), seeds {s['study_seeds']}, space of "
                  f"studies/{res['model']}_cifar10.toml{''.join(f' with {o}' for o in s.get('space') or [])}{latency_note(s)}.{paper_note(s)} Machine: {m['cpus']} CPUs, {s['threads']} thread, load "
                  f"{m['loadavg'][0]:.1f}; whole run {res['total_s'] / 60:.1f} min. Latency: {latency_how(res)}.", ""]  # fmt: skip
        for bud in res["budgets"]:
            lines += [f"### {res['model']}, MACs <= {100 * bud['budget']:.0f} % ({bud['max_macs'] / 1e6:.2f} M)", "",
                      "| candidate | test top-1 % | vs baseline+ft pt | proxy % | MACs (M) | MACs % | params (M) | "
                      "lat b1 ms | lat b64 ms | speed-up b1 / b64 | export speed-up b1 / b64 | search s | "
                      "evaluator calls | how |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            ft_acc = next(r["test_acc"] for r in res["references"] if r["method"] == "baseline+ft")
            rows = [r for r in res["references"] + bud["rows"] if "test_acc" in r]
            n_slim = sum(r["method"] == "slimsearch" for r in rows)
            for r in sorted(rows, key=lambda r: -r["test_acc"]):
                proxy = f"{100 * r['proxy_val_acc']:.2f}" if "proxy_val_acc" in r else "-"
                how = r.get("setting", "")
                if r.get("reused"):
                    how += " (same policy as another row: result reused)"
                label = LABELS.get(r["method"], r["method"])
                if n_slim > 1 and r["method"] == "slimsearch":
                    label += f" (search seed {r.get('search_seed')})"
                lines.append(
                    f"| {label} | {100 * r['test_acc']:.2f} | "
                    f"{100 * (r['test_acc'] - ft_acc):+.2f} | {proxy} | {r['macs'] / 1e6:.2f} | {r['macs_pct']:.1f} | "
                    f"{r['params'] / 1e6:.3f} | {r['latency']['b1_ms']:.2f}{_layout(r, 'b1')} | "
                    f"{r['latency']['b64_ms']:.1f}{_layout(r, 'b64')} | "
                    f"{r['speedup_b1']:.2f} / {r['speedup_b64']:.2f} | {r['export_speedup_b1']:.2f} / "
                    f"{r['export_speedup_b64']:.2f} | {r['search_s']:.0f} | {r.get('evaluator_calls', 0)} | {how} |"
                )
            for r in bud["rows"]:
                if "error" in r:
                    lines.append(f"| {LABELS.get(r['method'], r['method'])} | failed: {r['error']} |")
            v = bud.get("verdict", {})
            lines.append("")
            lines += rerank_lines(bud["rows"])
            slim = "slimsearch"
            if "search_seeds" in v:
                x = v["search_seeds"]
                slim = f"slimsearch (mean of {x['n']} search seeds)"
                lines.append(f"- slimsearch over search seeds {', '.join(map(str, x['seeds']))}: mean "
                             f"{100 * x['test_acc_mean']:.2f} %, min {100 * x['test_acc_min']:.2f}, max "
                             f"{100 * x['test_acc_max']:.2f}")  # fmt: skip
            if "search_top1" in v:
                x = v["search_top1"]
                lines.append(f"- without the rerank (each search's best trial by search val): mean "
                             f"{100 * x['test_acc_mean']:.2f} % ({', '.join(f'{100 * a:.2f}' for a in x['test_acc'])})")  # fmt: skip
            if "vs_best_baseline" in v:
                x = v["vs_best_baseline"]
                lines.append(f"- {slim} minus the best baseline ({LABELS[x['best']]}): {x['gap_pt']:+.2f} pt"
                             f"{_per_seed(x)} (target >= +1.0): **{_met(x['met'])}**")  # fmt: skip
            if "vs_best_tp" in v and v["vs_best_tp"]["best"] != v.get("vs_best_baseline", {}).get("best"):
                x = v["vs_best_tp"]
                lines.append(f"- {slim} minus the best Torch-Pruning baseline ({LABELS[x['best']]}): "
                             f"{x['gap_pt']:+.2f} pt{_per_seed(x)} (target >= +1.0): **{_met(x['met'])}**")  # fmt: skip
            if "vs_baseline_ft" in v:
                x = v["vs_baseline_ft"]
                lines.append(f"- baseline+ft minus {slim}: {x['gap_pt']:+.2f} pt{_per_seed(x)} (target <= 0.5): "
                             f"**{_met(x['met'])}**")  # fmt: skip
            if "export_speedup" in v:
                x = v["export_speedup"]
                lines.append(f"- {slim} export speed-up b1 {x['b1']:.2f}, b64 {x['b64']:.2f} (target >= 0.8): "
                             f"**b1 {_met(x['met_b1'])}, b64 {_met(x['met_b64'])}**")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def latency_how(res: dict) -> str:
    """How a model's latencies were measured (format, layouts, when: the run itself or a later ``--retime``)."""
    s = res["settings"]
    layout = s.get("latency_memory_format", "contiguous")
    weights = ("NCHW and NHWC weights, each row's faster per batch size (marked nchw / nhwc)" if layout == "auto"
               else f"{layout} weights")  # fmt: skip
    how = f"{s.get('latency_format', 'torchscript')} exports ({weights}), best of {s['lat_rounds']} round-robin rounds"
    if "latency_retimed" in res:
        r = res["latency_retimed"]
        return (f"{how} over all of them, re-measured by `--retime` at {r['date']} (load {r['loadavg'][0]:.1f}) on "
                f"networks rebuilt from the rows' policies and TP ratios (the run's own: {r['previous']})")  # fmt: skip
    return f"{how} over all of them after every fine-tune"


def _layout(row: dict, batch: str) -> str:
    layout = row["latency"].get(f"{batch}_layout")
    return {"contiguous": " nchw", "channels_last": " nhwc"}.get(layout, "") if layout else ""


def print_table(res: dict) -> None:
    import pandas as pd

    for bud in res["budgets"]:
        rows = [r for r in res["references"] + bud["rows"] if "test_acc" in r]
        df = pd.DataFrame([{"candidate": r["method"], "test%": 100 * r["test_acc"], "MACs%": r["macs_pct"],
                            "params%": r["params_pct"], "b1_ms": r["latency"]["b1_ms"], "b64_ms": r["latency"]["b64_ms"],
                            "exp_sp_b1": r["export_speedup_b1"], "exp_sp_b64": r["export_speedup_b64"],
                            "search_s": r["search_s"]} for r in rows]).sort_values("test%", ascending=False)  # fmt: skip
        print(f"\n{res['model']} MACs <= {100 * bud['budget']:.0f} %")
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for k, v in bud.get("verdict", {}).items():
            print(f"  {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        (out / "compare.md").write_text(
            markdown([json.loads(p.read_text()) for p in sorted(out.glob("compare_*.json"))])
        )
        return 0

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    models = _list(args.models)
    if args.retime:
        for name in models:
            (out / f"compare_{name}.json").write_text(json.dumps(retime(name, args, log), indent=1, default=str) + "\n")
        (out / "compare.md").write_text(
            markdown([json.loads(p.read_text()) for p in sorted(out.glob("compare_*.json"))])
        )
        return 0
    if "tp" in _list(args.study_seeds) and "tp_global" not in _list(args.candidates):
        raise SystemExit("--study-seeds tp needs tp_global among --candidates (its allocation is the seed)")
    for name in models:
        if name not in CHECKPOINTS:
            raise SystemExit(f"--models: no checkpoint for {name!r}; known: {', '.join(CHECKPOINTS)}")
        load_adapted(name, args.adapted_dir)  # fail before any work when a checkpoint is missing
    splits = load_cifar(args.shared, log)
    for name in models:
        res = run_model(name, args, splits, log)
        for bud in res["budgets"]:
            bud["verdict"] = verdict(res, bud)
        (out / f"compare_{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        print_table(res)
        log(f"{name}: total {res['total_s'] / 60:.1f} min")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("compare_*.json"))]
    (out / "compare.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    run_script(main)
