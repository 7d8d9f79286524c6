"""Datasets held in memory as uint8 tensors; batches are normalised (and augmented) on the fly.

Tensor-only augmentation (pad-crop, horizontal flip), so torchvision is never needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` (uint8, N×C×H×W) with labels ``y`` (int64, N) and their normalisation."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    flip: bool = True  # horizontal flips are a valid augmentation (not for digits)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, idx: torch.Tensor) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.classes, self.mean, self.std, self.name, self.flip)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float batch normalised with this dataset's mean/std."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random pad-and-crop (zero padding) and optional horizontal flip of a uint8 batch."""
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
        x = padded[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment_data: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches ``(x, y)``; deterministic for a given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    pad = max(1, ds.image_size // 8)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        x = ds.x[idx]
        if augment_data:
            x = augment(x, g, pad, ds.flip)
        yield ds.normalize(x), ds.y[idx]
