"""``[data] factory``: a user's own data as the study's train/val(/test) ``Dataset``s.

The factory returns ``(train, val)``, ``(train, val, test)`` or a dict with those keys; each split is a
``core.data.Dataset``, a pair of tensors ``(x, y)`` (images N×C×H×W, labels N), or a map-style
``torch.utils.data.Dataset`` of ``(image, label)`` items (image: a C×H×W tensor, or an H×W×C / H×W uint8 array
or PIL image), read into memory once. uint8 images are normalised with the train split's per-channel mean/std,
as image folders are; float images are used exactly as given (stored with mean 0 and std 1/255, which the
pipeline's ``(x / 255 - mean) / std`` maps back to x). No flips (unknown whether they are valid for the data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from slimsearch.core.data import Dataset, DataSplits, channel_stats
from slimsearch.core.errors import SlimError

SPLITS = ("train", "val", "test")


def _image(item: Any, where: str) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    a = np.asarray(item)  # PIL images and arrays: H×W×C (or H×W)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise SlimError(f"{where}: an image has shape {list(a.shape)}; expected C×H×W tensors or H×W×C arrays")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _tensors(obj: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, Sequence[str] | None]:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        return obj[0], obj[1], None
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        xs, ys = [], []
        for i in range(len(obj)):  # type: ignore[arg-type]
            item = obj[i]
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise SlimError(f"{where}: item {i} is {type(item).__name__}, not an (image, label) pair")
            xs.append(_image(item[0], where))
            ys.append(int(item[1]))
        if not xs:
            raise SlimError(f"{where}: the dataset is empty")
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise SlimError(f"{where}: images of several shapes {sorted(shapes)[:3]}; resize them to one")
        return torch.stack(xs), torch.tensor(ys), getattr(obj, "classes", None)
    raise SlimError(f"{where}: got {type(obj).__name__}; expected a Dataset, (x, y) tensors or a torch Dataset")


def to_dataset(obj: Any, where: str, name: str, like: Dataset | None = None) -> Dataset:
    """One split as a ``Dataset``; ``like`` (the train split) gives val/test its classes and normalisation."""
    if isinstance(obj, Dataset):
        return obj
    x, y, classes = _tensors(obj, where)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise SlimError(f"{where}: images {list(x.shape)} and labels {list(y.shape)}; expected N×C×H×W and N")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise SlimError(f"{where}: images are {x.dtype}; expected uint8 (0..255) or float")
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise SlimError(f"{where}: negative labels; expected 0..num_classes-1")
    if like is not None:
        if x.dtype != like.x.dtype or x.shape[1:] != like.x.shape[1:]:
            raise SlimError(f"{where}: images {x.dtype} {list(x.shape[1:])} differ from train's "
                            f"{like.x.dtype} {list(like.x.shape[1:])}")  # fmt: skip
        if len(y) and int(y.max()) >= like.num_classes:
            raise SlimError(f"{where}: label {int(y.max())} but train has {like.num_classes} classes")
        return Dataset(x.contiguous(), y, like.classes, like.mean, like.std, name, flip=False)
    n_classes = int(y.max()) + 1 if len(y) else 0
    names = tuple(str(c) for c in classes) if classes is not None else tuple(str(c) for c in range(n_classes))
    if len(names) < n_classes:
        raise SlimError(f"{where}: label {n_classes - 1} but only {len(names)} class names")
    if x.dtype == torch.uint8:
        mean, std = channel_stats(x)
    else:
        x = x.float()
        mean, std = (0.0,) * x.shape[1], (1 / 255,) * x.shape[1]
    return Dataset(x.contiguous(), y, names, mean, std, name, flip=False)


def to_splits(result: Any, spec: str) -> DataSplits:
    """A data factory's return value as ``DataSplits`` (``SlimError`` naming ``[data] factory`` when malformed)."""
    where = f"[data] factory {spec!r}"
    if isinstance(result, Mapping):
        unknown = sorted(set(result) - set(SPLITS))
        if unknown or "train" not in result or "val" not in result:
            raise SlimError(f"{where} returned a dict with keys {sorted(result)}; expected train, val (and test)")
        parts = [result.get(k) for k in SPLITS]
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        parts = [*result, None][:3]
    else:
        raise SlimError(f"{where} returned {type(result).__name__}; expected (train, val), (train, val, test) "
                        "or a dict of them")  # fmt: skip
    name = spec.partition(":")[2]
    train = to_dataset(parts[0], f"{where} train", name)
    val = to_dataset(parts[1], f"{where} val", name, like=train)
    test = to_dataset(parts[2], f"{where} test", name, like=train) if parts[2] is not None else None
    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise SlimError(f"{where}: the {split} split is empty")
    return DataSplits(train, val, test)
