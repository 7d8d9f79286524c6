"""Evaluation, BatchNorm recalibration and the fine-tune loop (SGD + Nesterov, lr schedule, optional KD).

``recalibrate_bn`` is the cheap proxy after pruning: surgery leaves BN running statistics that
no longer match the new activations, and recomputing them costs a few forward passes.
``finetune`` trains the model in place; the caller owns copies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from slimsearch.core.data import Dataset, batches
from slimsearch.core.device import autocast, check_amp, dataset_on, grad_scaler
from slimsearch.core.errors import SlimError
from torch import nn
from torch.optim import lr_scheduler

SCHEDULES = ("cosine", "onecycle", "constant")


class NonFiniteLoss(SlimError):
    """The training loss became NaN or infinite (usually: learning rate too high)."""


@contextmanager
def preserved_modes(*models: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, whatever the body did."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_nonempty(ds: Dataset, what: str) -> None:
    if len(ds) == 0:
        raise SlimError(f"{what}: dataset {ds.name or '(unnamed)'} is empty")


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``ds`` (eval mode, no grad; modes restored)."""
    _check_nonempty(ds, "evaluate")
    device = _device(model)
    ds = dataset_on(ds, device)  # one copy on the model's device; batches are made there
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for x, y in batches(ds, batch_size):
            pred = model(x.to(device)).argmax(dim=1)
            correct += (pred == y.to(device)).sum()
    return int(correct) / len(ds)


def recalibrate_bn(
    model: nn.Module, ds: Dataset, num_batches: int = 16, batch_size: int = 128, seed: int = 0, augment: bool = False
) -> nn.Module:
    """Reset and recompute BN running statistics from ``num_batches`` shuffled batches (augmented as in training
    when ``augment``).

    BN layers run in train mode with ``momentum=None`` (a cumulative average over the batches);
    every other module is in eval mode (dropout off); no gradients. Weights are untouched,
    modes and momenta are restored. Returns the same model.

    Weights trained on augmented batches expect the statistics of augmented images (pad-crop adds zero
    borders): on the public ResNet-20, unaugmented recalibration cost 2.2 pt of test accuracy, augmented gained
    1.7 (benchmarks/results/final_finetune.json).
    """
    _check_nonempty(ds, "recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    device = _device(model)
    ds = dataset_on(ds, device)
    momenta = [bn.momentum for bn in bns]
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for i, (x, _) in enumerate(batches(ds, batch_size, shuffle=True, augment_data=augment, seed=seed)):
                if i >= num_batches:
                    break
                model(x.to(device))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
    return model


@dataclass
class FinetuneConfig:
    """Fine-tune hyper-parameters. ``steps`` (optimizer steps) wins over ``epochs`` when set.

    ``warmup`` is the fraction of the steps spent ramping the lr up linearly (cosine, constant);
    for ``onecycle`` it is OneCycleLR's ``pct_start`` (0 means torch's default 0.3). The one-cycle
    schedule starts at lr/25 and ends at lr/25e4, keeping ``momentum`` fixed.
    """

    epochs: float | None = 1.0
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    augment: bool = True
    seed: int = 0
    grad_clip: float | None = None
    amp: str = "off"  # core.device.AMP_MODES: autocast of the training forward (bf16 / fp16)

    def __post_init__(self) -> None:
        check_amp(self.amp, "fine-tune config: amp")
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.steps is None and (self.epochs is None or not self.epochs > 0):
            problems.append(f"epochs must be > 0 when steps is not set, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.momentum >= 0 and self.weight_decay >= 0):
            problems.append(f"need lr > 0, momentum >= 0, weight_decay >= 0; got {self.lr}, {self.momentum}, "
                            f"{self.weight_decay}")  # fmt: skip
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.kd_alpha <= 1:
            problems.append(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            problems.append(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or unset, got {self.grad_clip}")
        if problems:
            raise SlimError("fine-tune config: " + "; ".join(problems))


@dataclass
class FinetuneResult:
    """``steps`` taken, mean loss of the last ≤20 steps, one ``history`` row per evaluation
    (step, val_acc, loss = mean loss since the previous row, lr), and the lr used at every step."""

    steps: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    stopped_early: bool = False


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    T: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton distillation: α·CE(student, labels) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(
        F.log_softmax(student_logits / T, dim=1),
        F.log_softmax(teacher_logits / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * ce + (1.0 - alpha) * T * T * kl


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """Optimizer steps for ``cfg`` on ``n_train`` examples (full batches only; at least 1)."""
    if cfg.steps is not None:
        return cfg.steps
    per_epoch = max(1, n_train // min(cfg.batch_size, n_train))
    return max(1, math.ceil(float(cfg.epochs or 0) * per_epoch))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, steps: int) -> lr_scheduler.LRScheduler:
    """The per-step lr schedule of ``cfg`` over ``steps`` steps (stepped once after every step)."""
    if cfg.schedule == "onecycle":
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.warmup or 0.3, cycle_momentum=False
        )
    warm = min(int(cfg.warmup * steps), steps - 1)
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warm + 1), total_iters=warm)
    if cfg.schedule == "constant":
        return ramp  # LinearLR holds end_factor=1 after the ramp
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps - warm, eta_min=0.0)
    if warm == 0:
        return cosine
    return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warm])


def _train_batches(ds: Dataset, cfg: FinetuneConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless full batches, a fresh deterministic shuffle (and augmentation) per epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(ds))
    while True:
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        yield from batches(ds, bs, shuffle=True, augment_data=cfg.augment, seed=epoch_seed, drop_last=True)


def finetune(
    model: nn.Module,
    train_ds: Dataset,
    cfg: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_ds: Dataset | None = None,
    eval_every: int | None = None,
    on_eval: Callable[[int, float], bool] | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    resume: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train ``model`` IN PLACE with SGD (+Nesterov) under ``cfg``'s lr schedule; return what happened.

    With a ``teacher`` (kept in eval mode, no grad) the loss is ``kd_loss``; otherwise label-smoothed CE.
    Every ``eval_every`` steps the model is scored on ``val_ds`` and ``on_eval(step, val_acc)`` is
    called; it returning True stops training (early stop / Optuna pruning). ``log`` receives a line
    every ``log_every`` steps. Deterministic for a given ``cfg.seed`` (global RNG state is restored).
    A NaN/inf loss raises ``NonFiniteLoss``; the model is then left mid-training.

    ``checkpoint(state)`` is called every ``checkpoint_every`` steps (not after the last) with everything a
    rerun needs; ``resume=state`` continues from it: the same model, optimizer, schedule, RNG and batches
    (the data stream is replayed up to the step), so a resumed run ends with the weights of an
    uninterrupted one.
    """
    cfg = cfg or FinetuneConfig()
    _check_nonempty(train_ds, "finetune")
    if eval_every is not None and (eval_every < 1 or val_ds is None):
        missing = "" if val_ds is not None else " and val_ds is missing"
        raise SlimError(f"finetune: eval_every must be >= 1 with a val_ds; got eval_every={eval_every}{missing}")
    if on_eval is not None and eval_every is None:
        raise SlimError("finetune: on_eval is given but eval_every is not, so it would never be called")
    device = _device(model)
    train_ds = dataset_on(train_ds, device)  # the images cross to the device once, not per batch
    scaler = grad_scaler(device, cfg.amp)
    n_steps = total_steps(cfg, len(train_ds))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,  # torch rejects Nesterov without momentum
        weight_decay=cfg.weight_decay,
    )
    scheduler = build_scheduler(optimizer, cfg, n_steps)
    result = FinetuneResult(steps=0, final_loss=float("nan"))
    losses: list[float] = []
    since_eval: list[float] = []
    t0 = time.perf_counter()
    rng_devices = [device] if device.type == "cuda" else []
    teachers = [teacher] if teacher is not None else []
    with torch.random.fork_rng(devices=rng_devices), preserved_modes(model, *teachers):
        torch.manual_seed(cfg.seed)
        model.train()
        if teacher is not None:
            teacher.eval()
        data = _train_batches(train_ds, cfg)
        start = 0
        if resume is not None:
            start = _restore(resume, model, optimizer, scheduler, n_steps)
            for _ in range(start):  # the batches an uninterrupted run would have taken
                next(data)
            losses = list(resume.get("losses", []))
        for step in range(start + 1, n_steps + 1):
            x, y = next(data)
            x, y = x.to(device), y.to(device)
            with autocast(device, cfg.amp):
                logits = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x.to(_device(teacher))).to(device)
                    loss = kd_loss(logits, t_logits, y, cfg.kd_alpha, cfg.kd_temperature, cfg.label_smoothing)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"fine-tune step {step}/{n_steps}: loss is {value} (lr={optimizer.param_groups[0]['lr']:.3g}); "
                    "lower the learning rate or set grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None and cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            result.lrs.append(lr)
            losses.append(value)
            since_eval.append(value)
            result.steps = step
            if checkpoint is not None and checkpoint_every > 0 and step % checkpoint_every == 0 and step < n_steps:
                checkpoint({"step": step, "n_steps": n_steps, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": torch.get_rng_state(), "losses": losses[-20:]})  # fmt: skip
            if log is not None and (step % log_every == 0 or step == n_steps):
                elapsed = time.perf_counter() - t0
                eta = elapsed / (step - start) * (n_steps - step)
                log(f"step {step}/{n_steps} loss {value:.4f} lr {lr:.4g} eta {eta:.0f}s")
            if eval_every is not None and val_ds is not None and step % eval_every == 0:
                acc = evaluate(model, val_ds)
                row = {"step": step, "val_acc": acc, "loss": sum(since_eval) / len(since_eval), "lr": lr}
                result.history.append(row)
                since_eval = []
                if on_eval is not None and on_eval(step, acc):
                    result.stopped_early = True
                    break
    tail = losses[-20:]
    result.final_loss = sum(tail) / len(tail) if tail else float("nan")
    return result


def _restore(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: lr_scheduler.LRScheduler, n_steps: int) -> int:  # fmt: skip
    """Load a ``finetune`` checkpoint state into the training objects; return its step."""
    step = int(state["step"])
    if int(state["n_steps"]) != n_steps or not 0 < step < n_steps:
        raise SlimError(f"fine-tune checkpoint at step {step} of {state['n_steps']} does not fit a run of {n_steps}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return step


@dataclass
class FinalResult:
    """What ``final_finetune`` kept: ``choice`` (one of ``val_accs``' keys), its ``val_acc``, the val accuracy of
    every variant it scored, and the optimizer ``steps`` it spent (all variants together)."""

    choice: str
    val_acc: float
    val_accs: dict[str, float]
    steps: int


def final_finetune(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    bn_batches: int = 20,
    log: Callable[[str], None] | None = None,
    log_every: int = 200,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    resume: Mapping[str, Any] | None = None,
) -> FinalResult:
    """The final fine-tune that never leaves a model worse on val than it came in: fine-tune IN PLACE and keep
    the variant with the best val accuracy (ties: the earlier, simpler one) among the model as it came
    (``start``), fine-tuned with its trained BN statistics (``ft``) or with them recalibrated on augmented
    batches (``ft+bn``), and, with a ``teacher``, the same two after a KD fine-tune (``kd``, ``kd+bn``).

    Why: recalibrating after training with unaugmented batches lost 4 pt, and KD from a teacher weaker on the
    user's data than the student pulled the student down (issue 22); val decides instead of a fixed recipe.
    A teacher doubles the cost (two fine-tunes from the same start).

    ``checkpoint(state)`` every ``checkpoint_every`` steps gets what a rerun needs (the start, the variants
    scored so far, the running fine-tune's ``finetune`` checkpoint; its tensors are the live ones: save them at
    once); ``resume=state`` continues from it and ends as an uninterrupted run would.
    """
    import copy

    start = copy.deepcopy(model.state_dict()) if resume is None else resume["start"]
    accs: dict[str, float] = {"start": evaluate(model, val_ds)} if resume is None else dict(resume["accs"])
    states: dict[str, dict[str, torch.Tensor]] = {"start": start} if resume is None else dict(resume["states"])
    steps = 0 if resume is None else int(resume["steps"])
    for tag, t in [("ft", None), ("kd", teacher)] if teacher is not None else [("ft", None)]:
        if tag in accs:  # scored before the interruption
            continue
        model.load_state_dict(start)
        here = resume["finetune"] if resume is not None and resume.get("tag") == tag else None

        def save(ft_state: dict[str, Any], tag: str = tag, done: int = steps) -> None:
            if checkpoint is not None:
                checkpoint({"start": start, "accs": dict(accs), "states": dict(states), "steps": done, "tag": tag,
                            "finetune": ft_state})  # a snapshot: accs and states grow after it  # fmt: skip

        res = finetune(model, train_ds, cfg, teacher=t, log=log, log_every=log_every,
                       checkpoint=save if checkpoint is not None else None, checkpoint_every=checkpoint_every,
                       resume=here)  # fmt: skip
        steps += res.steps
        accs[tag], states[tag] = evaluate(model, val_ds), copy.deepcopy(model.state_dict())
        recalibrate_bn(model, train_ds, num_batches=bn_batches, batch_size=cfg.batch_size, seed=cfg.seed, augment=True)
        accs[f"{tag}+bn"], states[f"{tag}+bn"] = evaluate(model, val_ds), copy.deepcopy(model.state_dict())
    order = list(accs)
    choice = max(order, key=lambda k: (accs[k], -order.index(k)))
    model.load_state_dict(states[choice])
    model.eval()
    if log is not None:
        log("final fine-tune: kept " + choice + " (val " + ", ".join(f"{k} {v:.4f}" for k, v in accs.items()) + ")")
    return FinalResult(choice=choice, val_acc=accs[choice], val_accs=accs, steps=steps)
