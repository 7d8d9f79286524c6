"""Export a trial's compressed model: rebuild the baseline, apply the stored policy, redo the
evaluator's recalibration / short fine-tune, optionally fine-tune longer, then write TorchScript /
torch.export / state dict with policy and metrics JSON (``core.export.export_model``).

"best" = the highest val_acc among COMPLETE trials within the MACs bound (and within ``max_macs``
when given), read from the study's backend (``search.backend``: Optuna or Ray Tune, the same records). Test
accuracy is measured now, on the test split, when the dataset has one: it never took part in the search.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from slimsearch.core import cost as core_cost
from slimsearch.core.apply import apply_policy
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.export import MEMORY_FORMATS, export_model, torchscript_program
from slimsearch.core.policy import Policy
from slimsearch.core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn
from slimsearch.search.backend import backend_for
from slimsearch.search.context import StudyContext, build_study_context, latency_layout
from slimsearch.search.records import TrialRecord, ranked
from slimsearch.search.study import EXPORT_FORMATS, StudyConfig

Log = Callable[[str], None]


@dataclass
class ExportResult:
    trial: int
    out_dir: Path
    files: dict[str, Path]
    metrics: dict[str, Any]


def parse_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """``["torchscript", "pt2,state"]`` -> ("torchscript", "pt2", "state"); unknown names are a SlimError."""
    items = [formats] if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        for f in str(item).split(","):
            f = f.strip()
            if not f:
                continue
            if f not in EXPORT_FORMATS:
                raise SlimError(f"--format: unknown format {f!r}; allowed: {', '.join(EXPORT_FORMATS)}")
            if f not in out:
                out.append(f)
    if not out:
        raise SlimError(f"--format: give at least one of {', '.join(EXPORT_FORMATS)}")
    return tuple(out)


def parse_trial(spec: str | int) -> str | int:
    """ "best" or a trial number."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise SlimError(f"--trial: trial numbers start at 0, got {spec}")
        return spec
    s = str(spec).strip()
    if s == "best":
        return s
    if not s.isdigit():
        raise SlimError(f"--trial: expected 'best' or a trial number, got {spec!r}")
    return int(s)


def select_trial(records: Sequence[TrialRecord], spec: str | int, max_macs: float | None = None) -> TrialRecord:
    """The trial to export; a missing, failed, pruned or too-large one is a SlimError saying why."""
    if spec == "best":
        return top_trials(records, 1, max_macs)[0]
    t = next((r for r in records if r.number == int(spec)), None)
    if t is None:
        raise SlimError(f"--trial {spec}: no such trial (the study has trials 0..{len(records) - 1})")
    if t.state != "COMPLETE":
        raise SlimError(f"--trial {spec}: trial is {t.state}, only COMPLETE trials can be exported"
                        + (f" ({t.reason})" if t.reason else ""))  # fmt: skip
    if not t.policy:
        raise SlimError(f"--trial {spec}: trial has no stored policy")
    macs = t.metric("macs")
    if max_macs is not None and (macs if macs is not None else math.inf) > max_macs:
        raise SlimError(f"--trial {spec}: MACs {macs:,.0f} exceed --max-macs {max_macs:,.0f}")
    return t


def top_trials(records: Sequence[TrialRecord], k: int, max_macs: float | None = None) -> list[TrialRecord]:
    """The ``k`` best feasible trials with distinct networks (``records.ranked``); none at all is a SlimError."""
    ok = ranked(records, max_macs)
    if not ok:
        bound = f" with MACs <= {max_macs:,.0f}" if max_macs is not None else ""
        raise SlimError(f"no feasible COMPLETE trial{bound} to export yet")
    return ok[:k]


def rebuild_candidate(sctx: StudyContext, cfg: StudyConfig, policy: Policy) -> torch.nn.Module:
    """The model the evaluator scored: policy applied, BN recalibrated, short fine-tune for 'finetune'.

    Mirrors ``evaluators.evaluate`` step for step under the same seed, so its val accuracy reproduces
    the trial's (up to floating-point differences between thread counts).
    """
    ev = cfg.evaluator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ev.seed)
        model = apply_policy(sctx.model, policy, input_shape=sctx.input_shape, seed=ev.seed)
        model.to(sctx.eval_ctx.device)  # the study's device, as in the evaluator
        train = sctx.splits.train
        recalibrate_bn(model, train, num_batches=ev.bn_batches, batch_size=ev.batch_size, seed=ev.seed)
        if ev.kind == "finetune":
            fcfg = FinetuneConfig(steps=ev.steps, batch_size=ev.batch_size, lr=ev.lr, seed=ev.seed, amp=ev.amp)
            finetune(model, train, fcfg, teacher=sctx.eval_ctx.teacher() if ev.kd else None)
    return model.eval()


# ONNX Runtime runs a CIFAR ResNet in milliseconds, and its per-round medians wander for seconds at a time on a
# shared CPU (benchmarks/README.md, bench_runtime.py): more alternating rounds cost milliseconds.
ORT_EXPORT_ROUNDS = 10


def _best_times(
    programs: dict[Any, torch.nn.Module], input_shape: Sequence[int], batch_size: int, rounds: int, threads: int = 1
) -> dict[Any, float]:
    """Best median ms of each program over ``rounds`` round-robin measurements (``threads`` CPU threads), so all of
    them see the same machine load."""
    best = dict.fromkeys(programs, math.inf)
    for _ in range(rounds):
        for key, program in programs.items():
            ms = core_cost.measure_latency(
                program, tuple(input_shape), batch_size=batch_size, threads=threads
            ).median_ms
            best[key] = min(best[key], ms)
    return best


def program_speedup(
    model: torch.nn.Module,
    baseline: torch.nn.Module,
    input_shape: Sequence[int],
    fmts: Sequence[str],
    memory_format: str,
    rounds: int = 3,
    runtime: str = "torchscript",
    threads: int = 1,
) -> dict[str, Any]:
    """Batch-1 CPU latency (``threads`` threads) in ``runtime`` (onnxruntime: ``ort_speedup``) of ``model``'s TorchScript program (frozen when ``fmts`` has it, in the
    export's ``memory_format``) against the baseline's program made the same way: the speed-up a user gets from
    swapping the exported file for the original. Best median of ``rounds`` alternating measurements each, so
    all programs see the same machine load. ``memory_format = "auto"`` times both layouts and keeps each
    network's faster one (``memory_format`` in the result: the one to export): channels_last runs the unpruned
    ResNets faster, but pruned or decomposed ones with odd channel counts slower at batch 1 on our CPU."""
    if runtime == "onnxruntime":
        return ort_speedup(model, baseline, input_shape, memory_format, rounds, threads)
    frozen = "torchscript-frozen" in fmts
    layouts = tuple(MEMORY_FORMATS) if memory_format == "auto" else (memory_format,)
    programs = {(who, lay): torchscript_program(m, input_shape, frozen=frozen, memory_format=lay)
                for who, m in (("model", model), ("base", baseline)) for lay in layouts}  # fmt: skip
    best = _best_times(programs, input_shape, 1, rounds, threads)
    mine = min(layouts, key=lambda lay: best[("model", lay)])
    base = min(layouts, key=lambda lay: best[("base", lay)])
    kind = "torchscript-frozen" if frozen else "torchscript"
    out = {"latency_ms_batch1": best[("model", mine)], "base_latency_ms_batch1": best[("base", base)],
           "speedup_batch1": best[("base", base)] / best[("model", mine)], "latency_program": f"{kind} ({mine})",
           "memory_format": mine}  # fmt: skip
    if memory_format == "auto":
        out["base_memory_format"] = base
        out["layout_latency_ms_batch1"] = {lay: best[("model", lay)] for lay in layouts}
    return out


def ort_speedup(
    model: torch.nn.Module,
    baseline: torch.nn.Module,
    input_shape: Sequence[int],
    memory_format: str,
    rounds: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """``program_speedup`` in ONNX Runtime: both networks' ONNX exports as ORT sessions (graph optimisations on,
    ``threads`` intra-op threads), best median of ``rounds`` alternating batch-1 measurements. ORT picks its own
    layout, so the export's ``memory_format`` (contiguous for ``auto``) only concerns its TorchScript files."""
    from slimsearch.core.latency import timed_program

    programs = {who: timed_program(m, "onnxruntime", threads=threads, input_shape=input_shape)
                for who, m in (("model", model), ("base", baseline))}  # fmt: skip
    best = _best_times(programs, input_shape, 1, rounds, threads)
    return {"latency_ms_batch1": best["model"], "base_latency_ms_batch1": best["base"],
            "speedup_batch1": best["base"] / best["model"], "latency_program": "onnxruntime",
            "memory_format": "contiguous" if memory_format == "auto" else memory_format}  # fmt: skip


def bound_check(
    model: torch.nn.Module,
    baseline: torch.nn.Module,
    input_shape: Sequence[int],
    fmts: Sequence[str],
    layouts: tuple[str, str],
    batch_size: int,
    max_ratio: float,
    rounds: int = 3,
    runtime: str = "torchscript",
    threads: int = 1,
) -> dict[str, Any]:
    """The study's latency bound checked on the export, in ``runtime`` with ``threads`` threads: ``model``'s program (in ``layouts[0]``, the exported
    layout) against the baseline's (in ``layouts[1]``, the layout the bound's table times) at the bound's
    batch size. The search only predicted it (``core.latency``: 3-11 % error for NCHW tables, more for NHWC
    ones), so the export says what it measures."""
    from slimsearch.core.latency import timed_program

    frozen = "torchscript-frozen" in fmts
    if runtime == "onnxruntime":
        programs = {who: timed_program(m, "onnxruntime", threads=threads, input_shape=input_shape)
                    for who, m in (("model", model), ("base", baseline))}  # fmt: skip
    else:
        programs = {who: torchscript_program(m, input_shape, frozen=frozen, memory_format=lay)
                    for who, m, lay in (("model", model, layouts[0]), ("base", baseline, layouts[1]))}  # fmt: skip
    best = _best_times(programs, input_shape, batch_size, rounds, threads)
    ratio = best["model"] / best["base"]
    return {"bound_latency_batch": batch_size, "bound_latency_ms": best["model"], "bound_base_latency_ms": best["base"],
            "bound_latency_ratio": ratio, "max_latency_ratio": max_ratio, "bound_latency_met": ratio <= max_ratio}  # fmt: skip


def export_trial(
    cfg: StudyConfig,
    trial: str | int = "best",
    formats: Sequence[str] | str | None = None,
    out_dir: str | Path | None = None,
    finetune_epochs: float | None = None,
    max_macs: float | None = None,
    *,
    top_k: int | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export ``trial`` ("best" or a number) of ``cfg``'s study; returns the files and the metrics written.

    Defaults come from [export]: formats, out (``<workdir>/export``; the model goes to
    ``<out>/trial-<n>``), finetune_epochs (a final fine-tune on the train split before export), top_k.
    ``top_k`` > 1 (with "best" and a final fine-tune): the search's val accuracy after a few steps is a noisy
    ranking, so the ``top_k`` best trials (distinct networks) all get the final fine-tune and the one with
    the best val accuracy after it is exported; ``metrics["top_k"]`` lists every candidate. The study's
    top_k applies only where it can (trial "best", a final fine-tune); an explicit one must.
    """
    fmts = parse_formats(formats if formats is not None else list(cfg.export.formats))
    if "onnx" in fmts:  # the optional extra: say so before the rebuild and fine-tune, not after
        from slimsearch.core.onnx_export import require_onnx

        require_onnx()
    spec = parse_trial(trial)
    epochs = cfg.export.finetune_epochs if finetune_epochs is None else float(finetune_epochs)
    if epochs < 0:
        raise SlimError(f"--finetune-epochs must be >= 0, got {epochs}")
    if max_macs is not None and not max_macs > 0:
        raise SlimError(f"--max-macs must be > 0, got {max_macs}")
    if top_k is None:
        top_k = cfg.export.top_k if spec == "best" and epochs > 0 else 1
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SlimError(f"--top-k must be an integer >= 1, got {top_k!r}")
    if top_k > 1 and spec != "best":
        raise SlimError(f"--top-k ranks the best trials: use it with --trial best, not --trial {spec}")
    if top_k > 1 and epochs <= 0:
        raise SlimError("--top-k chooses after the final fine-tune: give --finetune-epochs > 0 "
                        "(or [export] finetune_epochs); without it every candidate keeps its search val accuracy")  # fmt: skip
    backend = backend_for(cfg)
    records = backend.records()  # a study that never ran: SlimError
    picks: list[tuple[int, Policy, dict[str, Any]]] = []
    for r in top_trials(records, top_k, max_macs) if spec == "best" else [select_trial(records, spec, max_macs)]:
        policy = Policy.from_json(r.policy, where=f"trial {r.number} policy")
        picks.append((r.number, policy, {"status": r.status, "val_acc": r.metric("val_acc"), "reason": r.reason}))
    want = backend.info().baseline.get("baseline_sha")
    return export_policies(cfg, picks, fmts, None if out_dir is None else Path(out_dir), epochs, want, log=log)


def finalize(
    sctx: StudyContext, cfg: StudyConfig, policy: Policy, epochs: float, log: Log
) -> tuple[torch.nn.Module, dict]:
    """Trial's model as the evaluator scored it (val accuracy ``rebuilt_val_acc``), then the optional final
    fine-tune (never worse on val, ``core.train.final_finetune``); ``val_acc`` after it. Trained on the study's
    device; returned on the CPU, where the export's latency is measured."""
    from slimsearch.core.train import FinetuneConfig, evaluate, final_finetune

    model = rebuild_candidate(sctx, cfg, policy)
    metrics: dict[str, Any] = {"rebuilt_val_acc": evaluate(model, sctx.splits.val)}
    if epochs > 0:
        e = cfg.export
        log(f"fine-tuning for {epochs:g} epochs (lr {e.finetune_lr}, batch {e.finetune_batch_size}"
            f"{', and again with KD from the baseline' if e.kd else ''}; val keeps the best)")  # fmt: skip
        fcfg = FinetuneConfig(epochs=epochs, lr=e.finetune_lr, batch_size=e.finetune_batch_size, seed=cfg.study.seed,
                              amp=cfg.evaluator.amp)  # fmt: skip
        # Never worse on val than the candidate itself: trained or recalibrated BN statistics, KD or not (core.train).
        res = final_finetune(model, sctx.splits.train, sctx.splits.val, fcfg,
                             teacher=sctx.eval_ctx.teacher() if e.kd else None, log=log)  # fmt: skip
        metrics.update(finetune_epochs=epochs, finetune_steps=res.steps, finetune_choice=res.choice)
    metrics["val_acc"] = evaluate(model, sctx.splits.val) if epochs > 0 else metrics["rebuilt_val_acc"]
    return model.cpu(), metrics


def export_policies(
    cfg: StudyConfig,
    picks: Sequence[tuple[int, Policy, dict[str, Any]]],
    fmts: Sequence[str],
    out: Path | None,
    epochs: float,
    baseline_sha: str | None,
    *,
    log: Log | None = None,
) -> ExportResult:
    """Rebuild each of ``picks`` ((number, policy, the search's status / val_acc / reason), best first) as the
    evaluator scored it, optionally fine-tune, keep the best val accuracy (the first on ties), measure it and
    export it to ``out`` (default ``<export out>/trial-<n>``)."""
    log = log or (lambda s: None)
    if out is not None:
        check_export_out(out, cfg.name, "--out")
    sctx = build_study_context(cfg, allow_pretrain=False)
    if baseline_sha is not None and baseline_sha != sctx.baseline_sha:
        raise SlimError(f"the baseline weights ({sctx.baseline_path}) differ from the ones the study searched on")

    t0 = time.perf_counter()
    best: tuple[torch.nn.Module, dict[str, Any], int, Policy] | None = None
    ranking: list[dict[str, Any]] = []
    for number, policy, found in picks:
        if found.get("status") == "infeasible":
            log(f"note: trial {number} exceeds the study's MACs bound ({found.get('reason') or ''})")
        search_acc = None if found.get("status") == "infeasible" else found.get("val_acc")  # Ray reports 0.0 there
        shown = float("nan") if search_acc is None else float(search_acc)
        log(f"trial {number}: {policy.summary()}; search val_acc {shown:.4f}")
        model, m = finalize(sctx, cfg, policy, epochs, log)
        m = {"study": cfg.name, "trial": number, "search_val_acc": search_acc} | m | {"evaluator": cfg.evaluator.kind}
        if len(picks) > 1:
            log(f"trial {number}: val_acc {m['val_acc']:.4f} after the fine-tune")
            ranking.append({k: m.get(k) for k in ("trial", "search_val_acc", "rebuilt_val_acc", "val_acc")})
        if best is None or m["val_acc"] > best[1]["val_acc"]:
            best = (model, m, number, policy)
    assert best is not None  # picks is never empty
    model, metrics, number, policy = best
    if ranking:
        metrics["top_k"] = ranking
        log(f"kept trial {number} of the top {len(picks)} (best val_acc after the fine-tune)")
    cost = count_cost(model, sctx.input_shape)
    base = sctx.eval_ctx.base
    metrics.update(
        macs=cost.macs, flops=cost.flops, params=cost.params,
        macs_ratio=cost.macs / base.macs, params_ratio=cost.params / base.params,
        base_macs=base.macs, base_params=base.params, base_val_acc=sctx.eval_ctx.base_val_acc,
        input_shape=list(sctx.input_shape), policy_hash=policy.hash,
    )  # fmt: skip
    metrics["export_s"] = time.perf_counter() - t0
    out = out if out is not None else cfg.export_dir / f"trial-{number}"
    check_export_out(out, cfg.name, "[export] out")
    files = write_export(sctx, cfg, model, policy, out, fmts, metrics)
    return ExportResult(number, out, files, metrics)


def check_export_out(out: Path, study: str, where: str, also: Sequence[str] = ()) -> None:
    """``out`` must be new, empty, or an earlier export of this study (``core.export.out_dir_problem``): an
    export replaces its folder, so a user's folder, or another study's export, is refused, never removed."""
    import json

    from slimsearch.core.export import out_dir_problem
    from slimsearch.search.paths import check_writable_dir

    problem = out_dir_problem(out, also)
    if problem:
        raise SlimError(f"{where}: {problem}")
    check_writable_dir(out.parent, where)
    try:
        other = json.loads((out / "metrics.json").read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        other = None
    if (out / "manifest.json").is_file() and other not in (None, study):
        raise SlimError(f"{where}: {out} holds an export of study {other!r}, not of {study!r}; give a new or empty "
                        "folder")  # fmt: skip


def write_export(
    sctx: StudyContext,
    cfg: StudyConfig,
    model: torch.nn.Module,
    policy: Policy,
    out: Path,
    fmts: Sequence[str],
    metrics: dict[str, Any],
    also: Sequence[str] = (),
) -> dict[str, Path]:
    """Add the test accuracies (when the data has a test split), the measured program speed-up
    (``program_speedup``) and, with a latency bound, its measured ratio (``bound_check``) to ``metrics`` (in
    place), then write the export (``core.export.export_model``, in the
    study's memory format, or the faster one with ``auto``); format -> path."""
    runtime, threads = getattr(cfg.export, "runtime", "torchscript"), getattr(cfg.export, "threads", 1)
    rounds = ORT_EXPORT_ROUNDS if runtime == "onnxruntime" else 3
    metrics.update(program_speedup(model, sctx.model, sctx.input_shape, fmts, cfg.export.memory_format, rounds,
                                   runtime=runtime, threads=threads))  # fmt: skip
    if cfg.constraint.max_latency_ratio is not None:
        layouts = (metrics["memory_format"], latency_layout(cfg))
        metrics.update(bound_check(model, sctx.model, sctx.input_shape, fmts, layouts, cfg.constraint.latency_batch,
                                   cfg.constraint.max_latency_ratio, rounds, runtime=runtime, threads=threads))  # fmt: skip
    metrics["latency_threads"] = threads
    macs_ratio = count_cost(model, sctx.input_shape).macs / sctx.eval_ctx.base.macs
    metrics["export_speedup_batch1"] = metrics["speedup_batch1"] * macs_ratio
    if sctx.splits.test is not None:  # scored on the study's device (``model`` itself on the CPU)
        metrics["test_acc"] = evaluate(copy.deepcopy(model).to(sctx.eval_ctx.device), sctx.splits.test)
        metrics["base_test_acc"] = evaluate(sctx.eval_ctx.teacher(), sctx.splits.test)
    return export_model(model, policy, out, fmts, example_input=sctx.input_shape, metrics=metrics,
                        memory_format=metrics["memory_format"], preprocessing=study_preprocessing(sctx),
                        also=also)  # fmt: skip


def study_preprocessing(sctx: Any) -> dict[str, Any]:
    """The input pipeline of the study's training data, for the export's manifest (``core.preprocess``)."""
    from slimsearch.core.preprocess import preprocessing

    d, train = sctx.cfg.data, sctx.splits.train
    return preprocessing(sctx.input_shape, train.mean, train.std, train.classes, d.dataset,
                         str(d.root) if d.root is not None else None)  # fmt: skip
