"""Pre-registered comparison at real fine-tune budgets (issue 22): benchmarks/protocol.toml, cell by cell, row by row.

Every setting comes from the protocol file, which must be committed and unchanged since HEAD (else exit 2), so no
setting can be chosen after seeing a result. Results go to ``<out>/v<version>/<cell>/<row>.json``, one file per
finished row: a rerun skips the rows already there, so a killed run resumes where it stopped. After every row,
``<out>/summary.json`` (issue 22's schema, one object per cell, every protocol version's cells) and summary.md are
regenerated from all row files. Several processes can run the same cells at once: each row is claimed with a
lock file (a dead holder's lock is taken over), so two processes on two cores share a cell's rows.

Data (protocol [data]): the public checkpoints were trained on all 50k training images, so the search, the rerank and
every row's final-fine-tune choices use ``val_size`` images of the TEST split (``val_from = "test"``, core.data
.carve_val); test accuracy is reported on the other test images only, per image, for the paired bootstrap.

Rows (same final fine-tune for all: BN recalibrated on augmented batches, then core.train.final_finetune):
baseline, baseline+ft, tp_global (Torch-Pruning's progressive CIFAR recipe, core.tp_prune.tp_prune_progressive),
tp_l1 (uniform, ratio matched to the budget), fpgm (uniform, ours), tp_alloc_fpgm (tp_global's allocation, our FPGM
filters), slimsearch-s<k> (one search per search seed; top-K rerank at a shorter fine-tune on the val images the
search did not use; then the final fine-tune) and tp_global_eqc (tp_global, final fine-tune longer by the
slimsearch rows' mean search + rerank cost in steps).

  nice -n 19 python benchmarks/bench_budget.py --models resnet20 --budgets 0.5 --threads 1      # CPU, resumable
  benchmarks/gpu_budget.sh --expect-protocol BLOB                                                # protocol [gpu]
  python benchmarks/bench_budget.py --tiny --out /tmp/tiny                                       # toy scale, seconds
  python benchmarks/bench_budget.py --summary-only                                               # rebuild summary
  python benchmarks/bench_budget.py --protocol cand.toml --pilot cand --rows slimsearch-s0       # a candidate, val only

A pilot (``--pilot NAME``) is how a change to the protocol is decided before it is frozen as a new version: the
candidate file may be uncommitted, the test split is dropped before any row runs (rows carry ``val_acc`` only),
and ``<out>/pilot/NAME/summary.json`` sets each row's val accuracy beside the previous version's rows' val.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy  # noqa: E402
from slimsearch.core.cost import count_cost  # noqa: E402
from slimsearch.core.data import Dataset, DataSplits, carve_val, load_splits, load_synthetic, split_train_val  # noqa: E402
from slimsearch.core.models import build_model, load_checkpoint  # noqa: E402
from slimsearch.core.policy import Policy  # noqa: E402
from slimsearch.core.tp_prune import tp_prune, tp_prune_progressive  # noqa: E402
from slimsearch.core.train import FinetuneConfig, final_finetune, finetune, recalibrate_bn, total_steps  # noqa: E402
from slimsearch.search.slots import pid_alive  # noqa: E402

from benchmarks import budget_lib as L  # noqa: E402
from benchmarks.bench_compare import allocation_policy, uniform_policy  # noqa: E402
from benchmarks.common import CHECKPOINTS, SHAPE, log, machine, run_script, shared_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = "benchmarks/protocol.toml"
Log = Callable[[str], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default=str(REPO / PROTOCOL))
    p.add_argument("--models", default=None, help="only these models of the protocol (comma-separated)")
    p.add_argument("--budgets", default=None, help="only these budgets of the protocol (comma-separated)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (cuda: the protocol's [gpu] cells, epochs and recipe)")
    p.add_argument("--epochs", type=float, default=None, help="must equal the protocol's epochs for --device")
    p.add_argument("--expect-protocol", default=None, metavar="BLOB",
                   help="on a copy without git history: run only if the protocol file is this git blob (the id of "
                        "the committed file, `git rev-parse HEAD:benchmarks/protocol.toml` where it was committed)")  # fmt: skip
    p.add_argument(
        "--gpu-protocol",
        action="store_true",
        help="the protocol's [gpu] cells and recipe on --device cpu (with --tiny: the GPU run at toy scale)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "budget"))
    p.add_argument("--shared", default=shared_root())
    p.add_argument("--tiny", action="store_true", help="toy scale (synthetic data, random ResNet-20, few steps)")
    p.add_argument("--summary-only", action="store_true", help="only regenerate summary.json / summary.md")
    p.add_argument("--rows", default=None, help="only these rows of each cell (comma-separated, e.g. slimsearch-s0)")
    p.add_argument("--pilot", default=None, metavar="NAME",
                   help="a candidate protocol (may be uncommitted) scored on val only: the test split is dropped "
                        "before any row runs; results go to <out>/pilot/NAME/")  # fmt: skip
    p.add_argument("--reuse-from", type=int, default=None, metavar="VERSION",
                   help="copy the rows that never run the search (baselines, baseline+ft) from this earlier version's "
                        "same cell when its protocol differs from this one only in [search] and search_seeds; use it "
                        "only when no code those rows run changed between the versions")  # fmt: skip
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Batch size, learning rates and autocast of every fine-tune of a cell (final, rerank, the search's
    evaluator): [finetune] and [search] on the CPU; [gpu] with --device cuda, where big batches scale both
    learning rates linearly with the batch (Goyal et al. 2017) unless [gpu] sets them."""

    batch_size: int
    lr: float
    eval_lr: float
    amp: str = "off"


def recipe(proto: dict[str, Any], gpu: bool) -> Recipe:
    f, s = proto["finetune"], proto["search"]
    if not gpu:
        return Recipe(int(f["batch_size"]), float(f["lr"]), float(s["evaluator_lr"]))
    g = proto["gpu"]
    k = int(g["batch_size"]) / int(f["batch_size"])
    return Recipe(int(g["batch_size"]), float(g.get("lr", k * f["lr"])),
                  float(g.get("evaluator_lr", k * s["evaluator_lr"])), str(g.get("amp", "off")))  # fmt: skip


@dataclasses.dataclass
class Cell:
    """What every row of one (model, budget, epochs) cell shares."""

    model: str
    budget: float
    epochs: float
    base: nn.Module
    splits: DataSplits  # train, val (all val images: final fine-tune choices), test (reported)
    search_val: Dataset  # the search's val images
    held: Dataset  # val images the search never saw (rerank)
    base_macs: int
    proto: dict[str, Any]
    device: str
    recipe: Recipe
    tiny: bool
    log: Log

    @property
    def batch_size(self) -> int:
        return self.recipe.batch_size

    @property
    def target(self) -> float:
        return self.budget * self.base_macs

    def macs(self, m: nn.Module) -> float:
        return float(count_cost(m, SHAPE).macs)


# ----------------------------------------------------------------------------- data and models


def load_data(proto: dict[str, Any], args: argparse.Namespace) -> DataSplits:
    """The protocol's splits: val carved out of the test split (``val_from``), or a synthetic toy set (--tiny)."""
    d = proto["data"]
    if args.tiny:
        full = load_synthetic(n=900, size=32, seed=0)
        train, test = split_train_val(full, 300, seed=0)
        return carve_val(train, test, 120, seed=0, val_from="test")
    return load_splits("cifar10", Path(args.shared) / d["archive"], int(d["val_size"]), int(d["val_seed"]),
                       val_from=d["val_from"])  # fmt: skip


def load_base(model: str, proto: dict[str, Any], args: argparse.Namespace) -> nn.Module:
    if args.tiny:
        torch.manual_seed(0)
        return build_model(model).eval()
    path = Path(args.shared) / proto["models"][model].get("checkpoint", f"models/{CHECKPOINTS[model]}")
    return load_checkpoint(build_model(model), path).eval()


def search_images(proto: dict[str, Any], tiny: bool) -> int:
    """How many of the val images score the search's trials (the rest only rerank)."""
    return 60 if tiny else int(proto["search"]["val_images"])


def make_cell(
    model: str, budget: float, epochs: float, proto: dict[str, Any], args: argparse.Namespace, splits: DataSplits,
    rec: Recipe,
) -> Cell:  # fmt: skip
    base = load_base(model, proto, args).to(args.device)
    n = search_images(proto, args.tiny)
    return Cell(model, budget, epochs, base, splits, splits.val.subset(torch.arange(n)),
                splits.val.subset(torch.arange(n, len(splits.val))), int(count_cost(base, SHAPE).macs), proto,
                args.device, rec, args.tiny, log)  # fmt: skip


# ----------------------------------------------------------------------------- the final fine-tune (every row)


def ft_config(c: Cell, extra_steps: int = 0) -> FinetuneConfig:
    f, r = c.proto["finetune"], c.recipe
    if c.tiny:
        return FinetuneConfig(steps=4 + extra_steps, batch_size=32, lr=r.lr, seed=f["seed"], amp=r.amp)
    if extra_steps:
        steps = total_steps(FinetuneConfig(epochs=c.epochs, batch_size=c.batch_size), len(c.splits.train))
        return FinetuneConfig(steps=steps + extra_steps, batch_size=c.batch_size, lr=r.lr, seed=f["seed"], amp=r.amp)
    return FinetuneConfig(epochs=c.epochs, batch_size=c.batch_size, lr=r.lr, seed=f["seed"], amp=r.amp)


def weights_sha(m: nn.Module) -> str:
    """sha256 of a model's tensors (keys the search's baseline and a final fine-tune's checkpoint; kept as it was
    written before, so the studies and checkpoints of killed runs still match)."""
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in m.state_dict().values())).hexdigest()


CHECKPOINT_EVERY = 100  # final fine-tune steps between two checkpoints of a row (a killed run resumes there)


def finish(c: Cell, model: nn.Module, work: Path, extra_steps: int = 0) -> dict[str, Any]:
    """The same final fine-tune for every row, then per-image test correctness (chosen on val only).

    Every ``CHECKPOINT_EVERY`` steps the fine-tune's state goes to ``work``/final.pt; a rerun of the row (same
    network, same steps) resumes from it and ends as an uninterrupted run would, the time already spent added."""
    f = c.proto["finetune"]
    t, cpu = time.perf_counter(), time.process_time()
    model = model.to(c.device)
    cfg = ft_config(c, extra_steps)
    recalibrate_bn(model, c.splits.train, num_batches=f["bn_batches"], batch_size=cfg.batch_size, seed=cfg.seed,
                   augment=True)  # fmt: skip
    teacher = c.base.to(c.device) if f["kd"] else None
    key = [weights_sha(model), total_steps(cfg, len(c.splits.train))]  # this network, this length
    path = work / "final.pt"
    state = torch.load(path, map_location=c.device, weights_only=True) if path.is_file() else None
    if state is not None and state.get("key") != key:  # another network or length: start afresh
        state = None
    earlier = {"s": 0.0, "cpu_s": 0.0} if state is None else state["spent"]

    def save(ft: dict[str, Any]) -> None:
        spent = {"s": earlier["s"] + time.perf_counter() - t, "cpu_s": earlier["cpu_s"] + time.process_time() - cpu}
        work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".final.{os.getpid()}.tmp")
        torch.save(ft | {"key": key, "spent": spent}, tmp)
        os.replace(tmp, path)

    if state is not None:
        c.log(f"    final fine-tune resumed at step {state['finetune']['step']} ({state['tag']})")
    res = final_finetune(model, c.splits.train, c.splits.val, cfg, teacher=teacher, bn_batches=f["bn_batches"],
                         log=lambda s: c.log(f"    {s}"), log_every=200, checkpoint=save,
                         checkpoint_every=2 if c.tiny else CHECKPOINT_EVERY, resume=state)  # fmt: skip
    macs = c.macs(model)
    tol = L.within(macs, c.target, c.proto["baselines"]["macs_tolerance"]) if macs < c.base_macs else None
    return test_fields(c, model) | {"val_acc": res.val_acc, "macs": macs, "macs_ratio": macs / c.base_macs,
                                    "macs_within_tol": tol, "final_steps": res.steps, "final_choice": res.choice,
                                    "final_val_accs": res.val_accs,
                                    "final_s": earlier["s"] + time.perf_counter() - t,
                                    "final_cpu_s": earlier["cpu_s"] + time.process_time() - cpu,
                                    "final_earlier_s": earlier["s"]}  # fmt: skip


def test_fields(c: Cell, model: nn.Module) -> dict[str, Any]:
    """Per-image test correctness; nothing for a pilot (its cell has no test split)."""
    if c.splits.test is None:
        return {}
    correct = per_image(model, c.splits.test)
    return {"test_acc": float(correct.float().mean()), "n_test": len(correct), "test_correct": L.pack(correct.numpy())}


def per_image(model: nn.Module, ds: Dataset, batch_size: int = 512) -> torch.Tensor:
    """Top-1 correctness of every image of ``ds`` (bool, in order)."""
    from slimsearch.core.data import batches

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        model.eval()
        for x, y in batches(ds, batch_size):
            out.append(model(x.to(dev)).argmax(1).cpu() == y)
    return torch.cat(out)


# ----------------------------------------------------------------------------- rows


def tp_global_model(c: Cell) -> tuple[nn.Module, int]:
    b = c.proto["baselines"]
    steps = 40 if c.tiny else int(b["tp_iterative_steps"])
    return tp_prune_progressive(c.base, "tp_global", c.target, SHAPE, c.macs, steps=steps, max_ratio=b["tp_max_ratio"])


def row_baseline(c: Cell, kind: str) -> dict[str, Any]:
    b = c.proto["baselines"]
    iters = 6 if c.tiny else int(b["bisect_iters"])
    if kind == "tp_global":
        model, steps = tp_global_model(c)
        return {"setting": f"Torch-Pruning progressive global, {steps} of {b['tp_iterative_steps']} steps"}, model
    if kind == "tp_alloc_fpgm":
        pruned, _ = tp_global_model(c)
        policy = allocation_policy(c.base, pruned, "fpgm")
        model = apply_policy(c.base, policy, input_shape=SHAPE)
        return {"setting": "tp_global's kept-filter counts, FPGM filters", "policy": policy.to_dict()}, model
    if kind == "tp_l1":
        r, _ = L.closest_setting(lambda x: c.macs(tp_prune(c.base, "tp_l1", x, SHAPE, max_ratio=b["tp_max_ratio"])),
                                 c.target, 0.0, b["tp_max_ratio"], iters)  # fmt: skip
        return {"setting": f"TP uniform L1, ratio {r:.4f}", "ratio": r}, tp_prune(
            c.base, "tp_l1", r, SHAPE, max_ratio=b["tp_max_ratio"]
        )
    if kind == "fpgm":
        r, _ = L.closest_setting(lambda x: c.macs(apply_policy(c.base, uniform_policy(c.base, x, "fpgm"),
                                                               input_shape=SHAPE)), c.target, 0.0, 0.95, iters)  # fmt: skip
        policy = uniform_policy(c.base, r, "fpgm")
        return {"setting": f"uniform FPGM, rate {r:.4f}", "policy": policy.to_dict()}, apply_policy(
            c.base, policy, input_shape=SHAPE
        )
    raise SystemExit(f"protocol [baselines] rows: unknown row {kind!r}")


def study_config(c: Cell, work: Path, seed: int, ckpt: Path) -> Any:
    """A StudyConfig from the protocol's [search] and studies/<model>_cifar10.toml's [space] (the data fields are
    bookkeeping: the search runs on ``c.search_val``). A protocol's own ``[search.space]`` table replaces the study
    file's whole [space], and ``[search.seed_params]`` adds seed-strategy options (e.g. tp_global_criterion), so a
    version can change the space without touching the shipped study files."""
    import tomllib
    from slimsearch.search.study import study_from_dict

    s = c.proto["search"]
    study_file = REPO / "studies" / f"{c.model}_cifar10.toml"
    toml = tomllib.loads(study_file.read_text())
    n_trials = 3 if c.tiny else int(s["n_trials"])
    raw: dict[str, Any] = {
        "study": {"name": f"budget_{c.model}_{seed}", "storage": f"sqlite:///{work}/study.db", "workdir": str(work),
                  "sampler": s["sampler"], "n_trials": n_trials,
                  "n_startup_trials": min(int(s["n_startup_trials"]), n_trials), "seed": seed, "pruner": "none"},
        "model": {"factory": c.model, "checkpoint": str(ckpt)},
        "data": {"dataset": "synthetic"},
        "constraint": {"max_macs": float(c.target), "fit": s["fit"]}
                      | ({"fit_tolerance": float(s["fit_tolerance"])} if "fit_tolerance" in s else {}),
        "space": dict(s.get("space", toml["space"])),
        "seeds": {"strategies": list(s["seed_strategies"])} | {k: toml["seeds"][k] for k in ("uniform_rates",)
                                                                 if k in toml.get("seeds", {})}
                 | dict(s.get("seed_params", {})),
        "evaluator": {"kind": "finetune", "steps": 2 if c.tiny else int(s["evaluator_steps"]),
                      "batch_size": 32 if c.tiny else c.batch_size, "lr": c.recipe.eval_lr, "amp": c.recipe.amp,
                      "kd": bool(s["evaluator_kd"]), "bn_batches": int(s["bn_batches"]), "seed": 0},
    }  # fmt: skip
    return study_from_dict(raw, study_file)


def rerank_length(c: Cell) -> int:
    """Fine-tune steps of one rerank candidate: ``rerank_fraction`` of the final fine-tune's."""
    final_steps = total_steps(ft_config(c), len(c.splits.train))
    return 2 if c.tiny else max(1, round(float(c.proto["search"]["rerank_fraction"]) * final_steps))


def rerank_acc(c: Cell, m: nn.Module) -> float:
    """A rerank candidate's score: BN recalibrated on augmented batches, ``rerank_length`` steps of the final
    fine-tune's recipe, top-1 on the val images the search never saw. Trains ``m`` in place."""
    f = c.proto["finetune"]
    m = m.to(c.device)
    recalibrate_bn(m, c.splits.train, num_batches=f["bn_batches"], batch_size=c.batch_size, augment=True)
    finetune(m, c.splits.train, FinetuneConfig(steps=rerank_length(c), batch_size=c.batch_size, lr=c.recipe.lr,
                                               seed=f["seed"], amp=c.recipe.amp))  # fmt: skip
    return float(per_image(m, c.held).float().mean())


def spent_so_far(work: Path) -> dict[str, float]:
    """Search time spent by earlier, killed runs of this row (``work``/spent.json), zeros for a fresh row."""
    f = work / "spent.json"
    return json.loads(f.read_text()) if f.is_file() else {"search_s": 0.0, "search_cpu_s": 0.0, "restarts": 0}


def row_slimsearch(c: Cell, seed: int, work: Path) -> dict[str, Any]:
    """One search (sampler seed ``seed``) + top-K rerank + the final fine-tune; its cost in steps and CPU seconds.

    The study lives in ``work`` (kept until the row is written), so a killed run resumes the search where it stopped:
    the finished trials are kept, the times already spent are added from ``spent.json``. A resumed search's sampler
    continues with a new random stream (``search.runner``), so it is a different draw of the same protocol."""
    from optuna.trial import FrozenTrial, TrialState
    from slimsearch.evaluators.cache import ResultCache
    from slimsearch.evaluators.context import build_context
    from slimsearch.search.context import StudyContext
    from slimsearch.search.export import top_trials
    from slimsearch.search.optuna_study import record_from_trial
    from slimsearch.search.records import trial_line
    from slimsearch.search.runner import open_storage, prepare_study, trial_loop
    from slimsearch.spaces.space import SearchSpace

    s = c.proto["search"]
    t, cpu = time.perf_counter(), time.process_time()
    work.mkdir(parents=True, exist_ok=True)
    before = spent_so_far(work)

    def spent() -> dict[str, float]:
        return {"search_s": before["search_s"] + time.perf_counter() - t,
                "search_cpu_s": before["search_cpu_s"] + time.process_time() - cpu,
                "restarts": before["restarts"] + int(resumed)}  # fmt: skip

    def on_trial(ft: FrozenTrial) -> None:
        c.log(f"    {trial_line(record_from_trial(ft))}")
        write_json(work / "spent.json", spent())

    resumed = (work / "study").is_dir()
    ckpt = work / "base.th"
    torch.save(c.base.state_dict(), ckpt)
    cfg = study_config(c, work / "study", seed, ckpt)
    splits = DataSplits(c.splits.train, c.search_val, None)
    ectx = build_context(c.base, splits, SHAPE, max_macs=c.target, score_baseline=False, cache=ResultCache())
    space = SearchSpace.build(c.base, cfg.space, SHAPE)
    sctx = StudyContext(cfg, c.base, splits, SHAPE, ectx, space, ckpt, weights_sha(c.base)[:16])
    study = prepare_study(cfg, sctx, open_storage(cfg), log=lambda x: c.log(f"    {x}"))
    if resumed:
        c.log(f"    resumed: {len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))} trials kept")
    trial_loop(study, sctx, cfg, on_trial=on_trial)
    trials = study.get_trials(deepcopy=False)
    ev = cfg.evaluator
    scored = [tr for tr in trials if tr.user_attrs.get("val_acc") is not None and not tr.user_attrs.get("cached")]
    search_steps = L.cost_steps(len(scored) * ev.steps,
                                len(scored) * (ev.bn_batches * ev.batch_size + len(c.search_val)), c.batch_size)  # fmt: skip
    by_number = {tr.number: tr for tr in trials}
    ranked = [by_number[r.number] for r in top_trials([record_from_trial(tr) for tr in trials], int(s["rerank"]))]
    total = spent()
    search_s, search_cpu = total["search_s"], total["search_cpu_s"]
    t, cpu = time.perf_counter(), time.process_time()
    rer, rerank_steps = [], 0.0
    f = c.proto["finetune"]
    r_steps = rerank_length(c)
    for tr in ranked if len(ranked) > 1 else []:
        policy = Policy.from_json(tr.user_attrs["policy"])
        acc = rerank_acc(c, apply_policy(c.base, policy, input_shape=SHAPE))
        rerank_steps += L.cost_steps(r_steps, f["bn_batches"] * c.batch_size + len(c.held), c.batch_size)
        rer.append({"trial": tr.number, "search_val_acc": tr.user_attrs.get("val_acc"), "held_out_val_acc": acc})
        c.log(f"    rerank trial {tr.number}: held-out val {100 * acc:.2f} %")
    pick = max(range(len(rer)), key=lambda i: (rer[i]["held_out_val_acc"], -i)) if rer else 0
    chosen = ranked[pick]
    rerank_s, rerank_cpu = time.perf_counter() - t, time.process_time() - cpu
    policy = Policy.from_json(chosen.user_attrs["policy"])
    row = {"setting": f"{len(trials)} trials {s['sampler']}, finetune:{ev.steps}, rerank {len(rer)} x {r_steps} steps",
           "seed": seed, "policy": policy.to_dict(), "best_trial": chosen.number, "rerank": rer,
           "search_steps": search_steps, "rerank_steps": rerank_steps, "cost_steps": search_steps + rerank_steps,
           "search_s": search_s, "search_cpu_s": search_cpu, "rerank_s": rerank_s, "rerank_cpu_s": rerank_cpu,
           "n_trials": len(trials), "evaluated_trials": len(scored), "search_restarts": total["restarts"],
           "earlier_runs_s": before["search_s"]}  # fmt: skip
    return row | finish(c, apply_policy(c.base, policy, input_shape=SHAPE), work)


def row_equal_compute(c: Cell, done: dict[str, dict[str, Any]], work: Path) -> dict[str, Any] | None:
    """tp_global with the slimsearch rows' mean search + rerank cost added to its final fine-tune (None until every
    search seed's row is finished)."""
    seeds = c.proto["models"][c.model]["search_seeds"]
    lead = [done.get(f"slimsearch-s{s}") for s in seeds]
    if any(r is None for r in lead):
        return None
    extra = round(sum(r["cost_steps"] for r in lead) / len(lead))  # type: ignore[index]
    model, steps = tp_global_model(c)
    return {"setting": f"tp_global + {extra} extra fine-tune steps (slimsearch's mean search + rerank cost)",
            "cost_steps": float(extra)} | finish(c, model, work, extra_steps=extra)  # fmt: skip


def plan(c: Cell) -> list[str]:
    """Row names of a cell in run order (the equal-compute row last: it needs the searches' cost)."""
    seeds = c.proto["models"][c.model]["search_seeds"]
    return ["baseline", "baseline+ft", *c.proto["baselines"]["rows"], *[f"slimsearch-s{s}" for s in seeds],
            L.EQUAL_COMPUTE]  # fmt: skip


def run_row(c: Cell, name: str, done: dict[str, dict[str, Any]], work: Path) -> dict[str, Any] | None:
    """Row ``name`` of cell ``c`` (``done``: the cell's finished rows; ``work``: the row's scratch folder, kept
    across killed runs), or None while it waits for other rows."""
    if name == "baseline":
        return ({"method": "baseline", "setting": "checkpoint as loaded", "macs": c.base_macs, "macs_ratio": 1.0,
                "cost_steps": 0.0, "val_acc": float(per_image(c.base.to(c.device), c.splits.val).float().mean())}
                | test_fields(c, c.base))  # fmt: skip
    if name == "baseline+ft":
        return {"method": name, "setting": "checkpoint + the final fine-tune", "cost_steps": 0.0} | finish(
            c, copy.deepcopy(c.base), work
        )
    if name.startswith("slimsearch-s"):
        return {"method": L.LEAD} | row_slimsearch(c, int(name.removeprefix("slimsearch-s")), work)
    if name == L.EQUAL_COMPUTE:
        r = row_equal_compute(c, done, work)
        return None if r is None else {"method": name} | r
    info, model = row_baseline(c, name)
    return {"method": name, "cost_steps": 0.0} | info | finish(c, model, work)


def write_json(path: Path, obj: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Atomically: a killed run never leaves a half-written row (which would be skipped as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_rows(cell_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(cell_dir.glob("*.json"))}


BUDGET_FREE = ("baseline", "baseline+ft")  # rows that do not depend on the budget: one run serves every budget


def reusable_row(cdir: Path, name: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    """A budget-free row already run in a sibling cell with the same model, epochs, device and protocol, or None."""
    if name not in BUDGET_FREE:
        return None
    same = ("version", "protocol_sha", "model", "epochs", "device")
    for sib in sorted(p for p in cdir.parent.iterdir() if p.is_dir() and p != cdir):
        row, sib_meta = sib / f"{name}.json", sib / "cell.json"
        if row.is_file() and sib_meta.is_file():
            m = json.loads(sib_meta.read_text())
            if all(m.get(k) == meta[k] for k in same):
                return json.loads(row.read_text()) | {"reused_from": sib.name}
    return None


SEARCH_ONLY = ("version", "search")  # protocol keys no search-free row reads (besides models.<m>.search_seeds)


def search_free_settings(proto: dict[str, Any], model: str, gpu: bool = False) -> dict[str, Any]:
    """The protocol as a row that never runs the search sees it: without [search], the version and every model's
    search seeds, and without the other models; a CPU cell (``gpu`` False) without [gpu] too."""
    drop = {*SEARCH_ONLY, "models", *(() if gpu else ("gpu",))}
    out = {k: v for k, v in proto.items() if k not in drop}
    return out | {"model": {k: v for k, v in proto["models"][model].items() if k != "search_seeds"}}


def reusable_from_version(
    old_cdir: Path, name: str, meta: dict[str, Any], proto: dict[str, Any], old_proto: dict[str, Any]
) -> dict[str, Any] | None:
    """Row ``name`` of an earlier version's same cell, to serve this version unchanged, or None: only a row that
    never runs the search (or a search row ``search_row_without_rerank`` derives), only from a cell on the same
    model, budget, epochs, device and data sizes, and only when the two protocols agree on everything but [search]
    and the search seeds."""
    if name == L.EQUAL_COMPUTE:
        return None
    row, old_meta = old_cdir / f"{name}.json", old_cdir / "cell.json"
    if not (row.is_file() and old_meta.is_file()):
        return None
    m = json.loads(old_meta.read_text())
    if any(m.get(k) != meta[k] for k in ("model", "budget", "epochs", "device", "data")):
        return None
    gpu = old_cdir.name.endswith("-gpu")
    if search_free_settings(old_proto, meta["model"], gpu) != search_free_settings(proto, meta["model"], gpu):
        return None
    old = json.loads(row.read_text())
    if name.startswith("slimsearch-s"):
        old = search_row_without_rerank(old, proto["search"], old_proto["search"])
        if old is None:
            return None
    return old | {"reused_from": f"v{m['version']}/{old_cdir.name}", "reused_protocol_sha": old.get("protocol_sha")}


RERANK_KEYS = ("rerank", "rerank_fraction")


def search_row_without_rerank(
    row: dict[str, Any], search: dict[str, Any], old_search: dict[str, Any]
) -> dict[str, Any] | None:
    """An earlier search row as a protocol without the rerank (``rerank = 1``) would have produced it, or None.

    Only when the two [search] tables differ in the rerank alone and the earlier run's rerank kept its search's top
    trial: the search is deterministic for a given seed (the v3-norerank pilot reproduced v2-fit's trials one for
    one), and without a rerank the top trial goes to the same final fine-tune, so the network, its accuracies and
    the search's cost are the same; the rerank's steps and seconds are dropped from the cost."""
    drop = {k: v for k, v in search.items() if k not in RERANK_KEYS}
    if int(search.get("rerank", 1)) != 1 or drop != {k: v for k, v in old_search.items() if k not in RERANK_KEYS}:
        return None
    rer = row.get("rerank") or []
    if rer and row.get("best_trial") != rer[0]["trial"]:  # the rerank moved the pick: another network
        return None
    setting = row["setting"].split(", rerank")[0]
    return row | {"setting": setting, "rerank": [], "rerank_steps": 0.0, "cost_steps": row["search_steps"],
                  "rerank_s": 0.0, "rerank_cpu_s": 0.0, "wall_s": row.get("wall_s", 0.0) - row.get("rerank_s", 0.0),
                  "derived": "the earlier row without its rerank, which had kept the search's top trial"}  # fmt: skip


def claim_row(cdir: Path, name: str) -> Path | None:
    """A lock file that makes this process the only one running row ``name`` of ``cdir`` (several processes can share
    a cell's rows), or None while a live process holds it. A dead holder's lock (killed run) is taken over."""
    lock = cdir / f".{name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and pid_alive(pid):
                return None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def write_summary(out: Path, n_boot: int) -> list[dict[str, Any]]:
    """summary.json + summary.md from every protocol version's finished rows under ``out``."""
    summary = []
    for vdir in sorted(out.glob("v*")):
        for cdir in sorted(p for p in vdir.iterdir() if p.is_dir()):
            meta = cdir / "cell.json"
            rows = {k: v for k, v in read_rows(cdir).items() if k != "cell"}
            if not meta.is_file() or not rows:
                continue
            m = json.loads(meta.read_text())
            cell = L.summarize_cell(m["model"], m["budget"], m["epochs"], m["protocol_sha"], rows, n_boot)
            summary.append(cell | {"version": int(m["version"])})
    write_json(out / "summary.json", [L.schema_only(c) for c in summary])
    (out / "summary.md").write_text(L.summary_markdown(summary) + "\n")
    try:
        L.plot_summary(summary, out / "summary.png")
    except ImportError as e:  # a bare GPU machine may lack matplotlib: the rows and summary.json are what matter there
        log(f"summary.png not drawn ({e})")
    return summary


def write_pilot_summary(out: Path, pilot: str, version: int) -> list[dict[str, Any]]:
    """``<out>/pilot/<pilot>/summary.json``: every finished pilot row's val accuracy beside the val accuracy of the
    same cell's rows in the committed protocol ``v<version - 1>`` (what a candidate is compared with; no test)."""
    pdir = out / "pilot" / pilot
    table = []
    for cdir in sorted(p for p in pdir.iterdir() if p.is_dir()):
        ref = read_rows(out / f"v{version - 1}" / cdir.name)
        for name, row in read_rows(cdir).items():
            if name != "cell":
                table.append({"cell": cdir.name, "row": name, "val_acc": row.get("val_acc"),
                              "macs_ratio": row.get("macs_ratio"), "cost_steps": row.get("cost_steps"),
                              "reference_val_acc": {k: row_val(r) for k, r in ref.items()
                                                    if k != "cell"}})  # fmt: skip
    write_json(pdir / "summary.json", table)
    for t in table:
        log(f"pilot {pilot} {t['cell']} {t['row']}: val {t['val_acc']}  (v{version - 1}: {t['reference_val_acc']})")
    return table


def row_val(row: dict[str, Any]) -> float | None:
    """A row's final val accuracy; for rows written before ``val_acc`` was recorded, the final fine-tune's val
    accuracy of the variant it kept."""
    if row.get("val_acc") is not None:
        return float(row["val_acc"])
    accs, choice = row.get("final_val_accs"), row.get("final_choice")
    return accs[choice] if accs and choice else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    proto_path = Path(args.protocol).resolve()
    proto = L.load_protocol(proto_path)
    out = Path(args.out)
    n_boot = 200 if args.tiny else int(proto["stats"]["bootstrap"])
    if args.summary_only:
        write_summary(out, n_boot)
        return 0
    sha = "tiny" if args.tiny else "pilot-" + hashlib.sha256(proto_path.read_bytes()).hexdigest()[:10]
    if not args.tiny and args.pilot is None and args.expect_protocol is not None:
        sha = L.blob_sha(proto_path)  # a copy without git (a GPU machine): the committed file named by its blob id
        if sha != args.expect_protocol:
            raise SystemExit(f"error: {proto_path} is not the protocol --expect-protocol names "
                             f"(blob {sha}, expected {args.expect_protocol})")  # fmt: skip
    elif not args.tiny and args.pilot is None:
        try:
            rel = str(proto_path.relative_to(REPO))
        except ValueError:
            raise SystemExit(f"{proto_path}: the protocol must be a file of this repository ({REPO})") from None
        problem = L.protocol_problem(REPO, rel)
        if problem:
            raise SystemExit(f"error: {problem}")
        sha = L.protocol_sha(REPO, rel)
    old_vdir = out / f"v{args.reuse_from}"
    if args.reuse_from is not None and not 0 < args.reuse_from < int(proto["version"]):
        raise SystemExit(f"error: --reuse-from {args.reuse_from}: not an earlier version than {proto['version']}")
    old_proto = None if args.reuse_from is None else L.version_protocol(REPO, old_vdir)
    code = L.code_rev(REPO)  # read once: the code this process imported
    gpu = args.device.startswith("cuda") or args.gpu_protocol
    rec = recipe(proto, gpu)
    todo = [cl for cl in (L.gpu_cells(proto) if gpu else L.cells(proto))
            if (args.models is None or cl[0] in args.models.split(","))
            and (args.budgets is None or any(abs(cl[1] - float(b)) < 1e-9 for b in args.budgets.split(",")))]  # fmt: skip
    if args.epochs is not None and any(e != args.epochs for _, _, e in todo):
        raise SystemExit(f"error: --epochs {args.epochs:g} is not what {PROTOCOL} fixes for --device {args.device}")
    if not todo:
        raise SystemExit("error: no protocol cell matches --models / --budgets")
    splits = load_data(proto, args)
    if args.pilot is not None:  # a candidate is chosen on val only: no row of a pilot can see a test image
        splits = DataSplits(splits.train, splits.val, None)
    n_search = search_images(proto, args.tiny)
    log(f"data: train {len(splits.train)}, val {len(splits.val)} (search {n_search}, rerank {len(splits.val) - n_search}), "
        f"test {len(splits.test) if splits.test is not None else 'none (pilot)'}")  # fmt: skip
    vdir = out / f"v{proto['version']}" if args.pilot is None else out / "pilot" / args.pilot
    for model, budget, epochs in todo:
        cell = make_cell(model, budget, epochs, proto, args, splits, rec)
        cdir = (
            vdir / L.cell_name(model, budget, epochs + 0.0)
            if not gpu
            else vdir / (L.cell_name(model, budget, epochs) + "-gpu")
        )
        meta = {"version": proto["version"], "protocol_sha": sha, "model": model, "budget": budget, "epochs": epochs,
                "device": args.device, "machine": machine(), "data": {"train": len(splits.train), "val": len(splits.val),
                "test": len(splits.test) if splits.test is not None else 0}, "recipe": dataclasses.asdict(rec)}  # fmt: skip
        if not (cdir / "cell.json").is_file():
            write_json(cdir / "cell.json", meta)
        for name in plan(cell):
            if args.rows is not None and name not in args.rows.split(","):
                continue
            path = cdir / f"{name}.json"
            if path.is_file():
                log(f"{cdir.name} {name}: done (resumed)")
                continue
            reused = reusable_row(cdir, name, meta)
            if reused is None and old_proto is not None:
                reused = reusable_from_version(old_vdir / cdir.name, name, meta, proto, old_proto)
            if reused is not None:
                write_json(path, reused | ({"protocol_sha": sha} if "reused_protocol_sha" in reused else {}))
                log(f"{cdir.name} {name}: the same row as {reused['reused_from']}")
                continue
            lock = claim_row(cdir, name)
            if lock is None:
                log(f"{cdir.name} {name}: another process runs it")
                continue
            try:
                if path.is_file():  # finished by another process between the check above and the claim
                    continue
                log(f"{cdir.name} {name}")
                t = time.perf_counter()
                work = cdir / f".work-{name}"
                row = run_row(cell, name, read_rows(cdir), work)
                if row is None:
                    log(f"  {name}: waits for the search rows")
                    continue
                wall = time.perf_counter() - t + row.get("earlier_runs_s", 0.0) + row.get("final_earlier_s", 0.0)
                write_json(path, row | {"wall_s": wall, "protocol_sha": sha, "code": code})
                shutil.rmtree(work, ignore_errors=True)
            finally:
                lock.unlink(missing_ok=True)
            acc = f"test {100 * row['test_acc']:.2f} %" if "test_acc" in row else f"val {100 * row['val_acc']:.2f} %"
            log(f"  {name}: {acc}, MACs {100 * row['macs_ratio']:.1f} %")
            if args.pilot is None:
                write_summary(out, n_boot)
    if args.pilot is None:
        write_summary(out, n_boot)
    else:
        write_pilot_summary(out, args.pilot, int(proto["version"]))
    return 0


if __name__ == "__main__":
    run_script(main)
