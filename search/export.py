"""Export a trial's compressed model: rebuild the baseline, apply the stored policy, redo the
evaluator's recalibration / short fine-tune, optionally fine-tune longer, then write TorchScript /
torch.export / state dict with policy and metrics JSON (``core.export.export_model``).

"best" = the highest val_acc among COMPLETE trials within the MACs bound (and within ``max_macs``
when given). Ray Tune studies (``search.runner.uses_ray``) pick the trial from their results
(``search.ray_runner.ray_best_policy``) and then take the same rebuild/export path. Test accuracy is measured now, on the test split, when the dataset has one: it never
took part in the search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from optuna.trial import FrozenTrial, TrialState

from core.errors import SlimError
from search.study import EXPORT_FORMATS, StudyConfig

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


def select_trial(trials: Sequence[FrozenTrial], spec: str | int, max_macs: float | None = None) -> FrozenTrial:
    """The trial to export; a missing, failed, pruned or too-large one is a SlimError saying why."""
    if spec == "best":
        ok = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "ok"]
        if max_macs is not None:
            ok = [t for t in ok if t.user_attrs.get("macs", float("inf")) <= max_macs]
        if not ok:
            bound = f" with MACs <= {max_macs:,.0f}" if max_macs is not None else ""
            raise SlimError(f"no feasible COMPLETE trial{bound} to export yet")
        return max(ok, key=lambda t: (t.user_attrs.get("val_acc", 0.0), -t.user_attrs.get("macs", 0.0), -t.number))
    by_number = {t.number: t for t in trials}
    t = by_number.get(int(spec))
    if t is None:
        raise SlimError(f"--trial {spec}: no such trial (the study has trials 0..{len(trials) - 1})")
    if t.state != TrialState.COMPLETE:
        why = t.user_attrs.get("reason", "")
        raise SlimError(f"--trial {spec}: trial is {t.state.name}, only COMPLETE trials can be exported"
                        + (f" ({why})" if why else ""))  # fmt: skip
    if "policy" not in t.user_attrs:
        raise SlimError(f"--trial {spec}: trial has no stored policy")
    if max_macs is not None and t.user_attrs.get("macs", float("inf")) > max_macs:
        raise SlimError(f"--trial {spec}: MACs {t.user_attrs.get('macs'):,.0f} exceed --max-macs {max_macs:,.0f}")
    return t


def rebuild_candidate(sctx: Any, cfg: StudyConfig, policy: Any) -> torch.nn.Module:
    """The model the evaluator scored: policy applied, BN recalibrated, short fine-tune for 'finetune'.

    Mirrors ``evaluators.evaluate`` step for step under the same seed, so its val accuracy reproduces
    the trial's (up to floating-point differences between thread counts).
    """
    from core.apply import apply_policy
    from core.train import FinetuneConfig, finetune, recalibrate_bn

    ev = cfg.evaluator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ev.seed)
        model = apply_policy(sctx.model, policy, input_shape=sctx.input_shape, seed=ev.seed)
        train = sctx.splits.train
        recalibrate_bn(model, train, num_batches=ev.bn_batches, batch_size=ev.batch_size, seed=ev.seed)
        if ev.kind == "finetune":
            fcfg = FinetuneConfig(steps=ev.steps, batch_size=ev.batch_size, lr=ev.lr, seed=ev.seed)
            finetune(model, train, fcfg, teacher=sctx.model if ev.kd else None)
    return model.eval()


def export_trial(
    cfg: StudyConfig,
    trial: str | int = "best",
    formats: Sequence[str] | str | None = None,
    out_dir: str | Path | None = None,
    finetune_epochs: float | None = None,
    max_macs: float | None = None,
    *,
    log: Log | None = None,
) -> ExportResult:
    """Export ``trial`` ("best" or a number) of ``cfg``'s study; returns the files and the metrics written.

    Defaults come from [export]: formats, out (``<workdir>/export``; the model goes to
    ``<out>/trial-<n>``), finetune_epochs (a final fine-tune on the train split before export).
    """
    from core.policy import Policy
    from search.runner import load_optuna_study, open_storage, uses_ray

    fmts = parse_formats(formats if formats is not None else list(cfg.export.formats))
    spec = parse_trial(trial)
    epochs = cfg.export.finetune_epochs if finetune_epochs is None else float(finetune_epochs)
    if epochs < 0:
        raise SlimError(f"--finetune-epochs must be >= 0, got {epochs}")
    if max_macs is not None and not max_macs > 0:
        raise SlimError(f"--max-macs must be > 0, got {max_macs}")
    if uses_ray(cfg):
        number, policy, found = select_ray_trial(cfg, spec, max_macs)
        want = found.pop("baseline_sha", None)
    else:
        study = load_optuna_study(cfg, open_storage(cfg, create=False))
        ft = select_trial(study.get_trials(deepcopy=False), spec, max_macs)
        number = ft.number
        policy = Policy.from_json(ft.user_attrs["policy"], where=f"trial {ft.number} policy")
        found = {k: ft.user_attrs.get(k) for k in ("status", "val_acc", "reason")}
        want = study.user_attrs.get("slimsearch", {}).get("baseline_sha")
    out = Path(out_dir) if out_dir is not None else cfg.export_dir / f"trial-{number}"
    return export_policy(cfg, policy, number, found, fmts, out, epochs, want, log=log)


def select_ray_trial(cfg: StudyConfig, spec: str | int, max_macs: float | None = None) -> tuple[int, Any, dict]:
    """(number, Policy, search metrics + the study's baseline_sha) of a Ray study's trial ("best" or a number)."""
    from search.ray_runner import best_row, ray_best_policy, ray_study_info, ray_trials

    if spec == "best" and max_macs is not None:
        df = ray_trials(cfg)
        row = best_row(df[df["macs"].astype(float) <= max_macs])
        if row is None:
            raise SlimError(f"no feasible finished trial with MACs <= {max_macs:,.0f} to export yet")
        spec = int(row["number"])
    policy, m = ray_best_policy(cfg, spec)
    if max_macs is not None and float(m.get("macs", float("inf"))) > max_macs:
        raise SlimError(f"--trial {spec}: MACs {float(m['macs']):,.0f} exceed --max-macs {max_macs:,.0f}")
    m["baseline_sha"] = ray_study_info(cfg).get("baseline_sha")
    return int(m["number"]), policy, m


def export_policy(
    cfg: StudyConfig,
    policy: Any,
    number: int,
    found: dict[str, Any],
    fmts: Sequence[str],
    out: Path,
    epochs: float,
    baseline_sha: str | None,
    *,
    log: Log | None = None,
) -> ExportResult:
    """Rebuild trial ``number``'s model from ``policy`` (as the evaluator scored it), optionally fine-tune,
    measure and export it to ``out``. ``found``: the search's status / val_acc / reason of the trial."""
    from core.cost import count_cost, measure_latency
    from core.export import export_model
    from core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn
    from search.context import build_study_context

    log = log or (lambda s: None)
    if out.exists() and not out.is_dir():
        raise SlimError(f"--out: {out} exists and is not a directory")
    sctx = build_study_context(cfg, allow_pretrain=False)
    if baseline_sha is not None and baseline_sha != sctx.baseline_sha:
        raise SlimError(f"the baseline weights ({sctx.baseline_path}) differ from the ones the study searched on")

    if found.get("status") == "infeasible":
        log(f"note: trial {number} exceeds the study's MACs bound ({found.get('reason') or ''})")
    search_acc = None if found.get("status") == "infeasible" else found.get("val_acc")  # Ray reports 0.0 there
    shown = float("nan") if search_acc is None else float(search_acc)
    log(f"trial {number}: {policy.summary()}; search val_acc {shown:.4f}")
    t0 = time.perf_counter()
    model = rebuild_candidate(sctx, cfg, policy)
    val_rebuilt = evaluate(model, sctx.splits.val)
    metrics: dict[str, Any] = {
        "study": cfg.name,
        "trial": number,
        "search_val_acc": search_acc,
        "rebuilt_val_acc": val_rebuilt,
        "evaluator": cfg.evaluator.kind,
    }
    if epochs > 0:
        e = cfg.export
        log(f"fine-tuning for {epochs:g} epochs (lr {e.finetune_lr}, batch {e.finetune_batch_size}"
            f"{', KD from the baseline' if e.kd else ''})")  # fmt: skip
        fcfg = FinetuneConfig(epochs=epochs, lr=e.finetune_lr, batch_size=e.finetune_batch_size, seed=cfg.study.seed)
        res = finetune(model, sctx.splits.train, fcfg, teacher=sctx.model if e.kd else None,
                       log=log, log_every=200)  # fmt: skip
        # Fresh BN statistics for the final weights (the running averages lag a short fine-tune).
        recalibrate_bn(model, sctx.splits.train, num_batches=20, batch_size=e.finetune_batch_size, seed=cfg.study.seed)
        model.eval()
        metrics.update(finetune_epochs=epochs, finetune_steps=res.steps, finetune_final_loss=res.final_loss)
    cost = count_cost(model, sctx.input_shape)
    base = sctx.eval_ctx.base
    metrics.update(
        val_acc=evaluate(model, sctx.splits.val),
        macs=cost.macs, flops=cost.flops, params=cost.params,
        macs_ratio=cost.macs / base.macs, params_ratio=cost.params / base.params,
        base_macs=base.macs, base_params=base.params, base_val_acc=sctx.eval_ctx.base_val_acc,
        input_shape=list(sctx.input_shape), policy_hash=policy.hash,
        latency_ms_batch1=measure_latency(model, sctx.input_shape, batch_size=1, threads=1).median_ms,
    )  # fmt: skip
    if sctx.splits.test is not None:
        metrics["test_acc"] = evaluate(model, sctx.splits.test)
        metrics["base_test_acc"] = evaluate(sctx.model, sctx.splits.test)
    metrics["export_s"] = time.perf_counter() - t0
    files = export_model(model, policy, out, fmts, example_input=sctx.input_shape, metrics=metrics)
    return ExportResult(number, out, files, metrics)
