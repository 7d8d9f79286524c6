"""A small, fast, deterministic evaluation context (SmallCNN on sklearn digits) for tests.

``toy_context`` is a module-level factory, so ``functools.partial(toy_context, ...)`` can be sent to
spawned worker processes and Ray actors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from slimsearch.core.data import DataSplits, load_splits
from slimsearch.core.models import SmallCNN
from slimsearch.core.train import FinetuneConfig, finetune
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.context import EvalContext, build_context
from torch import nn


def toy_splits(dataset: str = "digits", val_size: int | float = 0.2, seed: int = 0) -> DataSplits:
    return load_splits(dataset, val_size=val_size, seed=seed)


def toy_input_shape(splits: DataSplits) -> tuple[int, int, int, int]:
    ds = splits.train
    return (1, ds.in_channels, ds.image_size, ds.image_size)


def toy_model(splits: DataSplits, width: int = 16) -> nn.Module:
    """An untrained SmallCNN for ``splits`` (width 16: a quarter of the zoo model's MACs)."""
    return SmallCNN(splits.train.num_classes, splits.train.in_channels, width=width)


def train_toy_model(splits: DataSplits, steps: int = 100, seed: int = 0) -> nn.Module:
    """A baseline trained for ``steps`` SGD steps (deterministic for ``seed``), in eval mode."""
    torch.manual_seed(seed)
    net = toy_model(splits)
    finetune(net, splits.train, FinetuneConfig(steps=steps, batch_size=64, lr=0.05, seed=seed))
    return net.eval()


def toy_context(
    state_path: str | Path | None = None,
    *,
    dataset: str = "digits",
    steps: int = 100,
    seed: int = 0,
    max_macs_ratio: float | None = None,
    cache: ResultCache | str | Path | None = None,
) -> EvalContext:
    """SmallCNN on ``dataset``: weights from ``state_path`` when given, else trained here."""
    splits = toy_splits(dataset, seed=seed)
    if state_path is not None:
        net = toy_model(splits)
        net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        net.eval()
    else:
        net = train_toy_model(splits, steps=steps, seed=seed)
    return build_context(net, splits, toy_input_shape(splits), max_macs_ratio=max_macs_ratio, cache=cache)
