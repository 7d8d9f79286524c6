"""Where training and evaluation run: device names, automatic mixed precision, datasets held on the device.

``resolve_device`` turns a study's ``device`` ("auto" | "cpu" | "cuda" | "cuda:N") into a ``torch.device`` and
refuses CUDA where there is none, in one line. ``autocast`` is the training forward's mixed-precision context
(``[evaluator] amp``). ``dataset_on`` keeps one copy of a dataset's uint8 images on the device, so batches are
gathered, augmented and normalised there with no host copy per batch. Latency is never measured here: it stays
a CPU measurement (``core.cost``, ``core.latency``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from slimsearch.core.data import Dataset
from slimsearch.core.errors import SlimError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)$|^cuda:(\d+)$")
_KEEP = 8  # datasets kept on devices at once (a study uses train and val; benchmarks a few more)


def check_device_name(name: object, where: str = "device") -> str:
    """``name`` when it is one of auto, cpu, cuda, cuda:N; else a ``SlimError`` naming ``where``."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise SlimError(f"{where}: expected one of {', '.join(DEVICES)}, got {name!r}")
    return name


def resolve_device(
    name: str,
    where: str = "device",
    *,
    cuda_count: Callable[[], int] | None = None,
) -> torch.device:
    """The device of ``name``: auto = the first CUDA device when there is one, else the CPU.

    cuda / cuda:N on a machine without CUDA (or with fewer GPUs) is a ``SlimError`` in one line, so the CLI
    exits 2 before anything is written. ``cuda_count`` (default ``torch.cuda.device_count``) lets tests fake
    the GPUs a machine has.
    """
    check_device_name(name, where)
    count = (cuda_count or _cuda_count)()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", 0) if count > 0 else torch.device("cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if count == 0:
        raise SlimError(f"{where} {name}: CUDA is not available on this machine (use cpu or auto)")
    if index >= count:
        raise SlimError(f"{where} {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_amp(mode: object, where: str = "amp") -> str:
    """``mode`` when it is off, bf16 or fp16; else a ``SlimError`` naming ``where``."""
    if mode not in AMP_MODES:
        raise SlimError(f"{where}: expected one of {', '.join(AMP_MODES)}, got {mode!r}")
    return str(mode)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[object]:
    """The mixed-precision context of a training forward: ``torch.autocast`` in bf16 / fp16, nothing for off."""
    check_amp(amp)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA (its gradients underflow without one); None otherwise."""
    if amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


# id(x) -> (weak reference to the host images, device, the device copy); least recently used first.
_ON_DEVICE: OrderedDict[tuple[int, str], tuple[weakref.ref, Dataset]] = OrderedDict()


def dataset_on(ds: Dataset, device: torch.device) -> Dataset:
    """``ds`` with its images and labels on ``device`` (``ds`` itself when they are there already).

    The copy is made once per dataset and device and reused while the host images live, so a study's train
    and val sets cross to the GPU once, not once per batch. The images stay uint8 there (a CIFAR-10 train set
    is 150 MB); batches are normalised and augmented on the device (``core.data.batches``).
    """
    if ds.x.device == device and ds.y.device == device:
        return ds
    key = (id(ds.x), str(device))
    hit = _ON_DEVICE.get(key)
    if hit is not None and hit[0]() is ds.x:
        _ON_DEVICE.move_to_end(key)
        moved = hit[1]
        return moved if moved.classes == ds.classes and len(moved) == len(ds) else _move(ds, device, key)
    return _move(ds, device, key)


def _move(ds: Dataset, device: torch.device, key: tuple[int, str]) -> Dataset:
    for stale in [k for k, (ref, _) in _ON_DEVICE.items() if ref() is None]:  # their host images are gone
        del _ON_DEVICE[stale]
    moved = dataclasses.replace(ds, x=ds.x.to(device), y=ds.y.to(device))
    _ON_DEVICE[key] = (weakref.ref(ds.x), moved)
    while len(_ON_DEVICE) > _KEEP:
        _ON_DEVICE.popitem(last=False)
    return moved
