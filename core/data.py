"""Datasets held in memory as uint8 tensors; batches are normalised (and augmented) on the fly.

Sources: scikit-learn digits (the embedded default), CIFAR-10/100 python-pickle folders, image
folders (one sub-folder per class, optionally under train/ and test/, optionally packed in a
.tar.gz/.tar/.zip archive), the exact-pixel CIFAR-10 .npz, and synthetic class patterns for tests.
Decoded image folders and extracted archives are cached under ``cache_dir()`` so that only the first
load pays for JPEG decoding.

Tensor-only augmentation (pad-crop, horizontal flip), so torchvision is never needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from slimsearch.core.errors import SlimError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_CACHE_VERSION = 1
_DECODE_CHUNK = 1024  # files per worker task
_PARALLEL_MIN_FILES = 4096  # below this a process pool costs more than it saves


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
        """The images at ``idx`` (integer indices or a bool mask), copied."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().view(-1)
        idx = idx.view(-1).long()
        # index_select copies whole rows; x[idx] gathers element-wise and is ~5x slower on 50k images.
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        return Dataset(x, y, self.classes, self.mean, self.std, self.name, self.flip)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float batch normalised with this dataset's mean/std."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class DataSplits:
    """Train (fine-tuning), val (search scores) and test (final report only; None when absent)."""

    train: Dataset
    val: Dataset
    test: Dataset | None


# ----------------------------------------------------------------------------- augmentation


def pad_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad each image by ``pad`` and crop the original size at offset (dy[i], dx[i]) in 0..2*pad.

    Offset (pad, pad) is the identity; (0, 0) shifts the content down-right by ``pad``.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = (dy.to(dev).view(n, 1) + torch.arange(h, device=dev).view(1, h)).view(n, 1, h, 1)
    cols = (dx.to(dev).view(n, 1) + torch.arange(w, device=dev).view(1, w)).view(n, 1, 1, w)
    return padded[
        torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols
    ]


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``mask`` (bool, N) is set."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random pad-and-crop (zero padding) and optional horizontal flip of a uint8 batch, on ``x``'s device.

    The random numbers come from the CPU ``generator`` whatever the device, so a batch is augmented alike on
    every device (and the CPU stream is the same as before device support).
    """
    n = x.shape[0]
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        x = pad_crop(x, dy, dx, pad)
    if flip:
        x = hflip(x, torch.rand(n, generator=generator) < 0.5)
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
    """Yield normalised float batches ``(x, y)`` on the device of ``ds.x``; deterministic for a given ``seed``.

    Order and augmentation draw from a CPU generator; a dataset on the GPU (``core.device.dataset_on``) is
    gathered, augmented and normalised there, with only the batch's indices crossing from the host.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    pad = max(1, ds.image_size // 8)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        dev_idx = idx.to(ds.x.device)
        x = ds.x.index_select(0, dev_idx)
        if augment_data:
            x = augment(x, g, pad, ds.flip)
        yield ds.normalize(x), ds.y.index_select(0, dev_idx.to(ds.y.device))


# ----------------------------------------------------------------------------- helpers

_PROGRESS: list[Callable[[str], None]] = []  # innermost last: where extraction/decoding progress lines go
PROGRESS_EVERY_S = 5.0


@contextlib.contextmanager
def progress_to(log: Callable[[str], None]) -> Iterator[None]:
    """Within the block, archive extraction and first decodes (the slow, one-time steps) report progress to
    ``log``: a line when they start, about every ``PROGRESS_EVERY_S`` seconds, and when they end."""
    _PROGRESS.append(log)
    try:
        yield
    finally:
        _PROGRESS.pop()


class _Progress:
    """Progress lines of one long step: ``update(done)`` logs at most every ``PROGRESS_EVERY_S`` seconds."""

    def __init__(self, what: str, total: int | None, unit: str) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.t0 = self.last = time.perf_counter()
        self.log = _PROGRESS[-1] if _PROGRESS else None

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.log is None or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last, elapsed = now, now - self.t0
        if final:
            self.log(f"{self.what}: {done} {self.unit} in {elapsed:.1f}s")
        elif self.total:
            eta = elapsed / max(done, 1) * (self.total - done)
            self.log(f"{self.what}: {done}/{self.total} {self.unit} ({done / self.total:.0%}, {elapsed:.0f}s, "
                     f"ETA {eta:.0f}s)")  # fmt: skip
        else:
            self.log(f"{self.what}: {done} {self.unit} ({elapsed:.0f}s)")


def cache_dir() -> Path:
    """Where decoded image folders and extracted archives live: $SLIMSEARCH_CACHE or ~/.cache/slimsearch."""
    env = os.environ.get("SLIMSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimsearch"


def channel_stats(x: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in 0..1 units; chunked to bound memory."""
    if x.shape[0] == 0:
        raise SlimError("cannot compute mean/std of an empty dataset")
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        b = x[start : start + chunk].to(torch.float64)
        total += b.sum((0, 2, 3))
        squares += (b * b).sum((0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _existing(root: str | Path, what: str) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise SlimError(f"{what} not found: {p}")
    return p


def _digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temp file in the same folder and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_archive(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES)


def _visible_dirs(root: Path) -> list[Path]:
    return sorted(
        (Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "__MACOSX"))),
        key=lambda p: p.name,
    )


# ----------------------------------------------------------------------------- built-in datasets


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1797 8×8 digits (shipped with sklearn, no download), scaled 0..16 -> 0..255."""
    x, y = _digits_arrays()
    x = torch.from_numpy(np.rint(x * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8))
    mean, std = channel_stats(x)
    classes = tuple(str(c) for c in range(10))
    return Dataset(x, torch.from_numpy(y.astype(np.int64)), classes, mean, std, "digits", flip=False)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797×64 pixels 0..16, labels). Reads sklearn's bundled CSV the way ``load_digits`` does, because
    importing sklearn.datasets (scipy and all) costs seconds on every default run; falls back to it.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


def load_synthetic(
    n: int = 1000, num_classes: int = 10, size: int = 16, channels: int = 3, seed: int = 0, noise: float = 0.15
) -> Dataset:
    """Deterministic class-conditional images: a smooth random template per class plus Gaussian noise.

    Balanced labels; ``noise`` is the pixel noise std as a fraction of 255. A small CNN learns it in
    a few hundred steps, which is what unit tests need.
    """
    if n < 1 or num_classes < 1 or size < 1 or channels < 1 or noise < 0:
        raise SlimError(
            f"synthetic dataset needs n, num_classes, size, channels >= 1 and noise >= 0, got "
            f"n={n} num_classes={num_classes} size={size} channels={channels} noise={noise}"
        )
    rng = np.random.default_rng(seed)
    low = max(2, size // 4)
    coarse = torch.from_numpy(rng.uniform(0, 255, (num_classes, channels, low, low)))
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()
    y = rng.permutation(np.arange(n) % num_classes)
    pixels = templates[y] + rng.normal(0.0, noise * 255, (n, channels, size, size))
    x = torch.from_numpy(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    mean, std = channel_stats(x)
    classes = tuple(str(c) for c in range(num_classes))
    return Dataset(x, torch.from_numpy(y.astype(np.int64)), classes, mean, std, "synthetic", flip=False)


def load_exact_npz(path: str | Path) -> Dataset:
    """The exact-pixel CIFAR-10 test subset (.npz with images N×32×32×3 uint8, labels), ImageNet-normalised."""
    p = _existing(path, "CIFAR-10 .npz file")
    try:
        with np.load(p) as z:
            images, labels = z["images"], z["labels"]
    except KeyError as e:
        raise SlimError(f"{p} lacks key {e} (needs images and labels)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SlimError(f"cannot read .npz {p}: {_one_line(e)}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(labels) != len(images):
        raise SlimError(f"{p}: images must be N×H×W×3 uint8 with N labels, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD, "cifar10-exact", flip=True)


# ----------------------------------------------------------------------------- CIFAR python pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts/lists/numpy arrays, the contents of the CIFAR batches: a data folder cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch/meta dict with str keys (the originals are Python 2 pickles with byte-string keys)."""
    if not path.is_file():
        raise SlimError(f"CIFAR pickle file missing: {path}")
    try:
        with path.open("rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise SlimError(f"cannot read CIFAR pickle {path}: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise SlimError(f"CIFAR pickle {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _pickle_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise SlimError(f"CIFAR pickle {path} lacks 'data' or '{label_key}'")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise SlimError(f"CIFAR pickle {path}: data must be N×3072 uint8 with N labels, got {data.shape} {data.dtype}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(values: list[Any]) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _pickle_kind(root: Path) -> str | None:
    if (root / "data_batch_1").is_file() and (root / "batches.meta").is_file():
        return "cifar10"
    if (root / "train").is_file() and (root / "meta").is_file():
        return "cifar100"
    return None


def load_cifar_pickle(root: str | Path) -> tuple[Dataset, Dataset]:
    """(train, test) from ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) or
    ``cifar-100-python`` (train, test, meta; fine labels), ImageNet-normalised.
    """
    p = _existing(root, "CIFAR pickle folder")
    kind = _pickle_kind(p)
    if kind == "cifar10":
        meta_key, label_key = "label_names", "labels"
        parts = sorted(p.glob("data_batch_*"), key=lambda f: int(re.sub(r"\D", "", f.name) or 0))
        train_parts = [_pickle_batch(f, label_key) for f in parts]
        test_part = _pickle_batch(p / "test_batch", label_key)
        meta = _read_pickle(p / "batches.meta")
    elif kind == "cifar100":
        meta_key, label_key = "fine_label_names", "fine_labels"
        train_parts = [_pickle_batch(p / "train", label_key)]
        test_part = _pickle_batch(p / "test", label_key)
        meta = _read_pickle(p / "meta")
    else:
        raise SlimError(f"{p} is not a CIFAR pickle folder (needs data_batch_1 + batches.meta, or train + meta)")
    if meta_key not in meta:
        raise SlimError(f"CIFAR meta file in {p} lacks '{meta_key}'")
    classes = _names(meta[meta_key])

    def make(x: np.ndarray, y: np.ndarray) -> Dataset:
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise SlimError(f"CIFAR pickle folder {p}: labels outside 0..{len(classes) - 1}")
        return Dataset(torch.from_numpy(x), torch.from_numpy(y), classes, IMAGENET_MEAN, IMAGENET_STD, kind)

    train = make(np.concatenate([x for x, _ in train_parts]), np.concatenate([y for _, y in train_parts]))
    return train, make(*test_part)


# ----------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class _Listing:
    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray
    stats: str  # "count|total size|newest mtime" of the files and folders


def _cache_key(root: Path, fingerprint: str, frozen: bool, size: tuple[int, int] | None = None) -> str:
    """Cache file stem ``<hash of path>-<hash of path and content fingerprint>``; the prefix finds stale files.

    ``frozen`` (caller-given fingerprints) get their own prefix so the two kinds never evict each other, and so
    does each resize ``size`` (one cache per size: a study at another image_size keeps the first one's).
    """
    resolved = str(root.resolve())
    sized = "" if size is None else f"|{size[0]}x{size[1]}"
    prefix = _digest(f"{'frozen' if frozen else 'stat'}|{resolved}{sized}", 12)
    return f"{prefix}-{_digest(f'v{_CACHE_VERSION}|{resolved}|{fingerprint}')}"


def _list_image_folder(root: Path) -> _Listing:
    """Class folders (sorted names = labels) and their image files (sorted), with size/mtime statistics."""
    if not root.is_dir():
        raise SlimError(f"image folder {root} is not a folder (archives go through load_train_test/load_splits)")
    class_dirs = _visible_dirs(root)
    if not class_dirs:
        raise SlimError(f"no class sub-folders in image folder {root} (expected one folder of images per class)")
    files: list[str] = []
    labels: list[int] = []
    total, newest = 0, root.stat().st_mtime_ns
    for label, d in enumerate(class_dirs):
        newest = max(newest, d.stat().st_mtime_ns)
        names: list[str] = []
        # One pass, no per-entry lambdas: this loop is most of a cached load of 60k images.
        for e in os.scandir(d):
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                st = e.stat()
                total += st.st_size
                if st.st_mtime_ns > newest:
                    newest = st.st_mtime_ns
                names.append(e.name)
        if not names:
            raise SlimError(f"class folder {d} has no {'/'.join(IMAGE_EXTENSIONS)} images")
        names.sort()
        prefix = f"{d}{os.sep}"
        files += [prefix + n for n in names]
        labels += [label] * len(names)
    classes = tuple(d.name for d in class_dirs)
    return _Listing(root, classes, tuple(files), np.asarray(labels, dtype=np.int64), f"{len(files)}|{total}|{newest}")


def _decode(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """H×W×3 RGB uint8 of one image file; resized (bilinear) to ``size`` = (H, W) when given and different."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(rgb)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise SlimError(f"cannot decode image {path}: {_one_line(e)}") from None


def _decode_chunk(
    paths: list[str], first: str, shape: tuple[int, ...], size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode ``paths`` into one H×W×3 array per image; every image must have the shape of ``first``."""
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, p in enumerate(paths):
        a = _decode(p, size)
        if a.shape != shape:
            raise SlimError(
                f"image {p} is {a.shape[1]}x{a.shape[0]} but {first} is {shape[1]}x{shape[0]}; "
                "all images must have one size, or set [data] image_size = [H, W] to resize them"
            )
        out[i] = a
    return out


def _workers() -> int:
    env = os.environ.get("SLIMSEARCH_DATA_WORKERS")
    if env:
        if not env.isdigit():
            raise SlimError(f"SLIMSEARCH_DATA_WORKERS must be a positive integer, got {env!r}")
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 8)


def _decode_all(files: tuple[str, ...], size: tuple[int, int] | None = None) -> np.ndarray:
    """N×3×H×W uint8 of all files (resized to ``size``, when given); a process pool over chunks when there are
    many (PIL decoding holds the GIL)."""
    first = files[0]
    shape = _decode(first, size).shape
    chunks = [list(files[i : i + _DECODE_CHUNK]) for i in range(0, len(files), _DECODE_CHUNK)]
    workers = min(_workers(), len(chunks))
    progress = _Progress(f"decoding {Path(first).parent.parent}", len(files), "images")
    if progress.log is not None:
        progress.log(f"decoding {len(files)} images under {Path(first).parent.parent} once (then cached)")
    if workers > 1 and len(files) >= _PARALLEL_MIN_FILES:
        # fork: workers need only PIL and numpy, and must not pay for re-importing torch.
        ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = []
            for part in pool.map(_decode_chunk, chunks, repeat(first), repeat(shape), repeat(size)):
                parts.append(part)
                progress.update(sum(len(p) for p in parts))
    else:
        parts = []
        for c in chunks:
            parts.append(_decode_chunk(c, first, shape, size))
            progress.update(sum(len(p) for p in parts))
    progress.update(len(files), final=True)
    x = np.empty((len(files), shape[2], shape[0], shape[1]), dtype=np.uint8)
    start = 0
    for part in parts:
        x[start : start + len(part)] = part.transpose(0, 3, 1, 2)
        start += len(part)
    return x


def _cache_files(key: str) -> tuple[Path, Path, Path]:
    d = cache_dir() / "images"
    return d / f"{key}.x.npy", d / f"{key}.y.npy", d / f"{key}.json"


def _read_cached(key: str, name: str) -> Dataset | None:
    x_path, y_path, meta_path = _cache_files(key)
    try:
        meta = json.loads(meta_path.read_text())  # written last: its presence means x and y are complete
        x = np.load(x_path, mmap_mode="c")  # copy-on-write map: instant, pages come in on first touch
        y = np.load(y_path)
        classes, mean, std = tuple(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y) or len(x) != meta.get("count"):
        return None
    return Dataset(torch.from_numpy(x), torch.from_numpy(y), classes, mean, std, name)


def _write_cache(key: str, root: Path, ds: Dataset) -> None:
    x_path, y_path, meta_path = _cache_files(key)
    meta = {"root": str(root.resolve()), "count": len(ds), "classes": list(ds.classes), "mean": ds.mean, "std": ds.std}
    try:
        _atomic_write(x_path, lambda f: np.save(f, ds.x.numpy()))
        _atomic_write(y_path, lambda f: np.save(f, ds.y.numpy()))
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    except OSError:
        return  # a read-only or full cache only costs speed
    for old in x_path.parent.glob(f"{key.split('-')[0]}-*"):  # stale versions of this folder
        if not old.name.startswith(f"{key}.") and old.suffix in (".npy", ".json"):
            with contextlib.suppress(OSError):
                old.unlink()


def load_image_folder(
    root: str | Path, fingerprint: str | None = None, image_size: tuple[int, int] | None = None
) -> Dataset:
    """Images under ``root/<class>/*.{jpg,jpeg,png}`` as RGB uint8; labels follow sorted class names.

    Decoded once, then cached under ``cache_dir()`` keyed by (resolved path, file count, total size,
    newest mtime): adding, removing or touching a file invalidates the cache. A caller that knows the
    folder is immutable (an extracted archive) passes its own ``fingerprint`` instead, so a cached load
    need not stat every file. mean/std are this folder's per-channel statistics. ``image_size`` = (H, W)
    resizes every image (bilinear) as it is decoded; each size has its own cache.
    """
    p = _existing(root, "image folder")
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    if fingerprint is not None and (hit := _read_cached(_cache_key(p, fingerprint, True, size), p.name)) is not None:
        return hit
    listing = _list_image_folder(p)
    key = _cache_key(p, listing.stats if fingerprint is None else fingerprint, fingerprint is not None, size)
    hit = _read_cached(key, p.name)
    if hit is not None and hit.classes == listing.classes and np.array_equal(hit.y.numpy(), listing.labels):
        return hit
    x = torch.from_numpy(_decode_all(listing.files, size))
    mean, std = channel_stats(x)
    ds = Dataset(x, torch.from_numpy(listing.labels), listing.classes, mean, std, p.name)
    _write_cache(key, p, ds)
    return ds


# ----------------------------------------------------------------------------- archives and layouts


def extract_archive(path: str | Path) -> Path:
    """Extract a .tar.gz/.tgz/.tar/.zip once into ``cache_dir()/archives`` and return the folder.

    Extraction goes to a temp folder that is renamed into place, so a crash never leaves half a tree.
    """
    p = _existing(path, "archive")
    st = p.stat()
    key = _digest(f"v{_CACHE_VERSION}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    stem = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", "", p.name, flags=re.IGNORECASE)
    dest = cache_dir() / "archives" / f"{stem}-{key}"
    if dest.is_dir():
        return dest
    made = [d for d in (dest.parent.parent, dest.parent) if not d.exists()]  # removed again if it fails
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    progress = _Progress(f"extracting {p.name}", None, "files")
    if progress.log is not None:
        progress.log(f"extracting {p} ({st.st_size / 1e6:.0f} MB) once into {dest.parent}")
    ok = False
    try:
        try:
            n = 0
            if p.name.lower().endswith(".zip"):
                with zipfile.ZipFile(p) as z:
                    names = z.namelist()
                    progress.total = len(names)
                    for n, name in enumerate(names, 1):
                        z.extract(name, tmp)  # zipfile drops absolute paths and '..' itself
                        progress.update(n)
            else:
                with tarfile.open(p) as t:
                    for n, member in enumerate(t, 1):  # streamed: a .tar.gz is read once
                        if hasattr(tarfile, "data_filter"):
                            t.extract(member, tmp, filter="data")  # refuses links/paths escaping tmp
                        else:
                            t.extract(member, tmp)
                        progress.update(n)
            progress.update(n, final=True)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
            raise SlimError(f"cannot extract archive {p}: {_one_line(e)}") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # otherwise another process finished first: use theirs
                raise
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(made) if not ok else ():  # a refused archive leaves no empty cache folders
            with contextlib.suppress(OSError):
                d.rmdir()
    return dest


def _resolve_root(root: Path) -> tuple[Path, str | None]:
    """The folder that holds the data (archives extracted, lone wrapper folders entered), and for an
    extracted archive an id of its immutable content (the extraction folder's name).
    """
    archive_id = None
    if _is_archive(root):
        root = extract_archive(root)
        archive_id = root.name
    elif not root.is_dir():
        raise SlimError(f"data path {root} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    while True:
        if _pickle_kind(root) or (root / "train").is_dir():
            return root, archive_id
        for child in ("cifar-10-batches-py", "cifar-100-python"):
            if _pickle_kind(root / child):
                return root / child, archive_id
        dirs = _visible_dirs(root)
        has_files = any(e.is_file() and not e.name.startswith(".") for e in os.scandir(root))
        if len(dirs) == 1 and not has_files and _visible_dirs(dirs[0]):
            root = dirs[0]  # e.g. cifar10-jpeg/ at the top of the archive
            continue
        return root, archive_id


SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def split_folders(root: Path) -> dict[str, Path]:
    """The split sub-folders of ``root`` (``SPLIT_FOLDERS``: train/, val/ (or valid/, validation/), test/) that exist."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_FOLDERS.items():
        hits = [root / n for n in names if (root / n).is_dir()]
        if len(hits) > 1:
            raise SlimError(f"{root} has both {hits[0].name}/ and {hits[1].name}/; keep one validation folder")
        if hits:
            found[split] = hits[0]
    return found


def load_layout(
    root: str | Path, image_size: tuple[int, int] | None = None
) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, val, test) from a CIFAR pickle folder, a folder with train/ and any of val/, test/ (class folders
    in each), a folder of class folders (train only), or an archive holding any of these. val and test are None
    when absent. Image-folder val and test sets are normalised with the train set's mean/std and must have its
    class folders. ``image_size`` = (H, W) resizes image folders as they are decoded (``load_image_folder``).
    """
    p, archive_id = _resolve_root(_existing(root, "data path"))
    if _pickle_kind(p):
        if image_size is not None:
            raise SlimError(f"{p} holds CIFAR pickles (32x32 arrays): image_size applies to image folders")
        train, test = load_cifar_pickle(p)
        return train, None, test

    def folder(sub: Path) -> Dataset:
        return load_image_folder(sub, None if archive_id is None else f"archive:{archive_id}:{sub.name}", image_size)

    splits = split_folders(p)
    if "train" not in splits:
        if splits:
            names = ", ".join(f"{d.name}/" for d in splits.values())
            raise SlimError(f"{p} has {names} but no train/ folder (train/ is needed next to val/ or test/)")
        return folder(p), None, None
    train = dataclasses.replace(folder(splits["train"]), name=p.name)
    out: list[Dataset | None] = []
    for split in ("val", "test"):
        if split not in splits:
            out.append(None)
            continue
        ds = folder(splits[split])
        if ds.classes != train.classes:
            raise SlimError(f"class folders differ between {splits['train']} and {splits[split]}")
        out.append(dataclasses.replace(ds, mean=train.mean, std=train.std, name=p.name))
    return train, out[0], out[1]


def load_train_test(root: str | Path) -> tuple[Dataset, Dataset | None]:
    """(train, test) of ``load_layout`` (a val/ folder is left out: use ``load_layout`` or ``load_splits``)."""
    train, _, test = load_layout(root)
    return train, test


# ----------------------------------------------------------------------------- splits


def split_train_val(ds: Dataset, val_size: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic, class-stratified split into (train, val); ``val_size`` is a count or a fraction in (0, 1).

    Each class gives up its share of val images (within one image), chosen by a seeded permutation. val comes
    classes interleaved (every prefix is stratified too); train keeps the input order.
    """
    n = len(ds)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise SlimError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise SlimError(f"val_size fraction must be in (0, 1), got {val_size}")
        k = int(round(val_size * n))
    else:
        k = int(val_size)
    if not 0 <= k < n:
        raise SlimError(f"val_size {val_size} leaves no training images in {ds.name or 'dataset'} of {n} images")
    if k == 0:
        raise SlimError(f"val_size {val_size} selects no validation image of the {n} in {ds.name or 'dataset'}; "
                        f"give a count >= 1 or a fraction >= {1 / n:.2g}")  # fmt: skip
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    y = ds.y.numpy()[perm]
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n) - starts[y[order]]
    # Interleave classes by relative rank: the first k positions hold each class in proportion.
    key = (rank + 0.5) / counts[y]
    chosen = perm[np.lexsort((np.arange(n), key))[:k]]
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    # val keeps the interleaved order, so any prefix of it (a search's val subset) is class-balanced too.
    return ds.subset(torch.from_numpy(np.flatnonzero(~is_val))), ds.subset(torch.from_numpy(chosen))


def load_splits(
    dataset: str = "digits",
    root: str | Path | None = None,
    val_size: int | float = 0.1,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    *,
    val_from: str = "train",
    val_root: str | Path | None = None,
) -> DataSplits:
    """Train/val/test for a study. val comes out of the train set (by ``seed``); search scores on val only.

    digits/synthetic: a fixed 20 % test split (seed 0), then val from the rest. cifar10/cifar100/
    imagefolder: ``root`` is a pickle folder, an image folder (train/ with any of val/ and test/, or class
    folders only: no test) or an archive of one; an explicit val/ folder is the val split (``val_size`` is
    then unused). CIFAR uses ImageNet mean/std (what the pretrained checkpoints expect); other image folders
    use their train set's per-channel statistics. ``image_size`` = (H, W): image folders resized on decode. ``val_from`` / ``val_root``: see ``carve_val`` (without a val/ folder).
    """
    if dataset not in DATASETS:
        raise SlimError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    test: Dataset | None
    val: Dataset | None = None
    if dataset in ("digits", "synthetic"):
        if image_size is not None:
            raise SlimError(f"image_size applies to image folders, not to the built-in {dataset} dataset")
        full = load_digits_dataset() if dataset == "digits" else load_synthetic()
        train, test = split_train_val(full, 0.2, seed=0)
    else:
        if root is None:
            raise SlimError(f"dataset {dataset} needs a data root (pickle folder, image folder or archive)")
        train, val, test = load_layout(root, image_size)
        if dataset != "imagefolder":
            want = 10 if dataset == "cifar10" else 100
            if train.num_classes != want:
                raise SlimError(f"{root} has {train.num_classes} classes but {dataset} needs {want}")
            train = dataclasses.replace(train, mean=IMAGENET_MEAN, std=IMAGENET_STD, name=dataset)
            if test is not None:
                test = dataclasses.replace(test, mean=IMAGENET_MEAN, std=IMAGENET_STD, name=dataset)
            if val is not None:
                val = dataclasses.replace(val, mean=IMAGENET_MEAN, std=IMAGENET_STD, name=dataset)
    if val is not None:
        return DataSplits(train, interleave_classes(val, seed), test)
    return carve_val(train, test, val_size, seed, val_from=val_from, val_root=val_root)


VAL_SOURCES = ("train", "test")


def carve_val(
    train: Dataset,
    test: Dataset | None,
    val_size: int | float,
    seed: int = 0,
    *,
    val_from: str = "train",
    val_root: str | Path | None = None,
) -> DataSplits:
    """Where the search's val images come from: ``val_root`` (a folder / archive of class folders, all of it),
    else ``val_size`` images of ``val_from``: "train" (the default; held out of fine-tuning) or "test" (test
    keeps only the rest, so reported accuracy never counts an image the search chose on).

    Why: a user's checkpoint was usually trained on all of its training images, so val carved out of them
    is training data for the unpruned network, and choosing compressions on it favours memorisation.
    """
    if val_from not in VAL_SOURCES:
        raise SlimError(f"val_from must be one of {', '.join(VAL_SOURCES)}, got {val_from!r}")
    if val_root is not None:
        extra, more = load_train_test(val_root)
        if more is not None:
            raise SlimError(f"val_root {val_root}: expected one folder of class folders, found train/ and test/")
        if extra.classes != train.classes:
            raise SlimError(f"val_root {val_root}: class folders {list(extra.classes)} differ from the "
                            f"training data's {list(train.classes)}")  # fmt: skip
        if extra.x.shape[1:] != train.x.shape[1:]:
            raise SlimError(f"val_root {val_root}: images are {tuple(extra.x.shape[1:])}, training images "
                            f"{tuple(train.x.shape[1:])}")  # fmt: skip
        val = dataclasses.replace(extra, mean=train.mean, std=train.std, name=train.name, flip=train.flip)
        return DataSplits(train, val, test)
    if val_from == "test":
        if test is None:
            raise SlimError("val_from = 'test' needs a test split, and this dataset has none")
        rest, val = split_train_val(test, val_size, seed)
        return DataSplits(train, val, rest)
    train, val = split_train_val(train, val_size, seed)
    return DataSplits(train, val, test)


def interleave_classes(ds: Dataset, seed: int = 0) -> Dataset:
    """All of ``ds`` in split_train_val's val order: classes interleaved by a seeded permutation, so any prefix
    (a search's val subset) is class-balanced, as a val split cut from train is."""
    n = len(ds)
    perm = np.random.default_rng(seed).permutation(n)
    y = ds.y.numpy()[perm]
    counts = np.bincount(y)
    seen = np.zeros_like(counts)
    rank = np.empty(n, dtype=np.float64)
    for i, c in enumerate(y):  # rank of each image within its class, in permuted order
        rank[i], seen[c] = seen[c], seen[c] + 1
    key = (rank + 0.5) / counts[y]
    return ds.subset(torch.from_numpy(perm[np.lexsort((np.arange(n), key))]))
