"""Pre-training a baseline that users can watch and resume: progress lines (step, loss, ETA), an atomic
checkpoint every ``[model] pretrain_checkpoint_steps`` steps in the workdir (a rerun continues from it), and a
fingerprint of the recipe stored with the result, so every later run and worker reuses it and a changed recipe
trains a new one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from slimsearch.core.errors import SlimError
from slimsearch.search.study import StudyConfig
from torch import nn

Log = Callable[[str], None]
FINGERPRINT_VERSION = 1


def partial_path(final: Path) -> Path:
    """Where the in-progress checkpoint of ``final`` lives (removed once ``final`` is written)."""
    return final.with_name(f"{final.stem}.partial{final.suffix}")


def _factory_source_sha(factory: str) -> str | None:
    """sha256 of a user factory's module file (an edited model retrains), None for zoo models."""
    if ":" not in factory:
        return None
    try:
        spec = importlib.util.find_spec(factory.partition(":")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]


def recipe_fingerprint(cfg: StudyConfig, input_shape: tuple[int, ...], splits: Any) -> str:
    """A hash of everything that decides the pre-trained weights: model (and a factory's source), data, recipe."""
    m, d, train = cfg.model, cfg.data, splits.train
    recipe = {
        "v": FINGERPRINT_VERSION,
        "factory": m.factory,
        "factory_source": _factory_source_sha(m.factory),
        "num_classes": m.num_classes or train.num_classes,
        "input_shape": list(input_shape),
        "data": [d.dataset, str(d.root) if d.root else None, d.val_size, d.seed, d.image_size, d.factory],
        "data_source": _factory_source_sha(d.factory) if d.factory else None,
        "train": [len(train), list(train.classes)],
        "recipe": [m.pretrain_epochs, m.pretrain_lr, m.pretrain_batch_size, cfg.study.seed],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_fingerprint(path: Path) -> str | None:
    """The recipe fingerprint saved with a pre-trained baseline (None: none stored, e.g. an older file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # unreadable: loading it reports the problem
    fp = obj.get("fingerprint") if isinstance(obj, dict) else None
    return fp if isinstance(fp, str) else None


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_partial(path: Path, fingerprint: str, log: Log) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        log(f"ignoring unreadable pre-training checkpoint {path} ({type(e).__name__})")
        return None
    if not isinstance(obj, dict) or obj.get("fingerprint") != fingerprint or not isinstance(obj.get("state"), dict):
        log(f"ignoring pre-training checkpoint {path}: made with another recipe")
        return None
    return obj["state"]


def pretrain(cfg: StudyConfig, model: nn.Module, splits: Any, path: Path, fingerprint: str, log: Log,
             device: str = "cpu") -> float:  # fmt: skip
    """Train ``model`` for [model] pretrain_epochs on ``device``, resuming from ``path``'s partial checkpoint when
    its recipe matches; save ``{"state_dict", "fingerprint"}`` atomically to ``path`` (``model`` back on the CPU);
    return the val accuracy."""
    from slimsearch.core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn, total_steps

    m = cfg.model
    ft = FinetuneConfig(epochs=m.pretrain_epochs, lr=m.pretrain_lr, batch_size=m.pretrain_batch_size,
                        seed=cfg.study.seed)  # fmt: skip
    n_steps = total_steps(ft, len(splits.train))
    every = m.pretrain_checkpoint_steps
    partial = partial_path(path)
    state = _read_partial(partial, fingerprint, log)
    if state is not None and not (0 < int(state.get("step", 0)) < n_steps and state.get("n_steps") == n_steps):
        state = None
    where = f"resuming at step {state['step']}/{n_steps}" if state else f"{n_steps} steps"
    log(f"pre-training a {m.factory} baseline for {m.pretrain_epochs:g} epochs ({where}; a checkpoint every "
        f"{every} steps in {partial}, kept in {path})")  # fmt: skip
    t0 = time.perf_counter()

    def save(st: dict[str, Any]) -> None:
        _atomic_save({"fingerprint": fingerprint, "state": st}, partial)

    model.to(device)
    try:
        finetune(model, splits.train, ft, log=lambda s: log(f"pre-training {s}"),
                 log_every=max(1, min(200, n_steps // 20)), checkpoint=save, checkpoint_every=every, resume=state)  # fmt: skip
    except SlimError as e:
        raise SlimError(f"{cfg.path}: [model] pre-training: {e}") from None
    # Running BN statistics of a short training lag the final weights; candidates get recalibrated
    # statistics in the evaluator, so the baseline gets them too (a fair, and better, reference).
    recalibrate_bn(model, splits.train, num_batches=20, batch_size=m.pretrain_batch_size, seed=cfg.study.seed)
    model.eval()
    acc = evaluate(model, splits.val)
    model.cpu()
    _atomic_save({"state_dict": model.state_dict(), "fingerprint": fingerprint}, path)
    partial.unlink(missing_ok=True)
    log(f"baseline trained in {time.perf_counter() - t0:.1f}s: val_acc {acc:.4f}")
    return acc
