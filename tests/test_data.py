"""slimsearch.core.data: loaders (digits, image folders + cache, archives, CIFAR pickles, .npz, synthetic), splits,
augmentation and batches."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import shared_path
from slimsearch.core import data as D
from slimsearch.core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dataset,
    augment,
    batches,
    hflip,
    load_cifar_pickle,
    load_digits_dataset,
    load_exact_npz,
    load_image_folder,
    load_splits,
    load_synthetic,
    load_train_test,
    pad_crop,
    split_train_val,
)
from slimsearch.core.errors import SlimError

# ----------------------------------------------------------------------------- helpers


def _rgb(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(arr).save(path)
    return path


def _image_folder(root: Path, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Classes 'zebra', 'ant', 'moth' (sorted: ant=0, moth=1, zebra=2) with PNG and JPEG files, 8 wide × 6 high."""
    spec = {"zebra": ["b.png", "a.png"], "ant": ["x.jpg", "c.png", "d.jpeg"], "moth": ["m.png"]}
    arrays: dict[str, list[np.ndarray]] = {}
    for k, (cls, names) in enumerate(spec.items()):
        for j, name in enumerate(sorted(names)):
            arrays.setdefault(cls, []).append(_rgb(seed + 10 * k + j))
            _save(root / cls / name, arrays[cls][-1])
    (root / "ant" / "notes.txt").write_text("not an image")  # ignored
    return arrays


def _pixels(ds: Dataset, i: int) -> np.ndarray:
    return ds.x[i].permute(1, 2, 0).numpy()


def _indexed(n: int, num_classes: int, seed: int = 0) -> Dataset:
    """Images whose two pixels spell their own index, so splits can be traced back to source rows."""
    idx = np.arange(n)
    x = np.stack([idx // 256, idx % 256], axis=1).astype(np.uint8).reshape(n, 1, 1, 2)
    y = np.random.default_rng(seed).integers(0, num_classes, n)
    classes = tuple(str(c) for c in range(num_classes))
    return Dataset(torch.from_numpy(x), torch.from_numpy(y), classes, (0.5,), (0.25,), "indexed")


def _ids(ds: Dataset) -> np.ndarray:
    x = ds.x.numpy().reshape(len(ds), 2).astype(np.int64)
    return x[:, 0] * 256 + x[:, 1]


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded an image although the cache should have served it")

    monkeypatch.setattr(PIL.Image, "open", boom)


def _cifar_pickle_folder(root: Path, per_batch: int = 2, n_test: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py in the original format: protocol-2 dicts with byte-string keys."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data}
        batch[b"filenames"] = [f"img_{b}_{i}.png".encode() for i in range(per_batch)]
        (root / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(data)
        ys.append(labels)
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": [1, 2, 3][:n_test]}
    test[b"data"] = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = [c.encode() for c in D.CIFAR10_CLASSES]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- built-in datasets


def test_digits_shape_labels_range() -> None:
    ds = load_digits_dataset()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.uint8
    assert ds.y.dtype == torch.int64 and ds.classes == tuple("0123456789")
    assert int(ds.x.min()) == 0 and int(ds.x.max()) == 255  # 0..16 scaled to 0..255
    assert torch.bincount(ds.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert ds.flip is False and ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 8
    assert ds.mean[0] == pytest.approx(ds.x.double().mean().item() / 255, abs=1e-9)
    assert ds.std[0] == pytest.approx(ds.x.double().std(unbiased=False).item() / 255, abs=1e-9)


def test_load_splits_digits_sizes_and_fixed_test() -> None:
    a = load_splits("digits", None, 0.1, seed=0)
    b = load_splits("digits", None, 200, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)  # 20 % test, then 10 % of 1438
    assert (len(b.train), len(b.val)) == (1238, 200)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # test never depends on seed
    assert a.train.mean == b.train.mean and a.train.flip is False


def test_synthetic_is_deterministic_balanced_and_separable() -> None:
    a = load_synthetic(n=200, num_classes=4, size=8, channels=2, seed=3)
    b = load_synthetic(n=200, num_classes=4, size=8, channels=2, seed=3)
    c = load_synthetic(n=200, num_classes=4, size=8, channels=2, seed=4)
    assert a.x.shape == (200, 2, 8, 8) and a.x.dtype == torch.uint8
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert torch.bincount(a.y).tolist() == [50, 50, 50, 50]
    # Nearest class mean, fitted on the first half, classifies the second half: the classes are learnable.
    x = a.x.flatten(1).float()
    means = torch.stack([x[:100][a.y[:100] == k].mean(0) for k in range(4)])
    pred = torch.cdist(x[100:], means).argmin(1)
    assert (pred == a.y[100:]).float().mean().item() > 0.95
    splits = load_splits("synthetic", None, 0.25, seed=0)
    assert splits.test is not None and len(splits.train) + len(splits.val) + len(splits.test) == 1000


def test_exact_npz_roundtrip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "t.npz", images=images, labels=np.arange(5), index=np.arange(5) + 100)
    ds = load_exact_npz(tmp_path / "t.npz")
    assert ds.x.shape == (5, 3, 32, 32) and ds.y.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(_pixels(ds, 3), images[3])
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD and ds.classes[0] == "airplane"
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(SlimError, match="bad.npz.*labels"):
        load_exact_npz(tmp_path / "bad.npz")


def test_exact_npz_shared() -> None:
    ds = load_exact_npz(shared_path("data", "cifar10-test-exact-846.npz"))
    assert ds.x.shape == (846, 3, 32, 32) and len(ds) == 846
    assert ds.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the original CIFAR-10 test batch order


# ----------------------------------------------------------------------------- image folders and cache


def test_image_folder_labels_pixels_and_stats(tmp_path: Path) -> None:
    arrays = _image_folder(tmp_path / "imgs")
    ds = load_image_folder(tmp_path / "imgs")
    assert ds.classes == ("ant", "moth", "zebra")
    assert ds.y.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.x.shape == (6, 3, 6, 8) and ds.x.dtype == torch.uint8
    # ant files sorted: c.png, d.jpeg, x.jpg; PNGs are lossless, JPEGs match PIL's own decoding.
    assert np.array_equal(_pixels(ds, 0), arrays["ant"][0])
    jpeg = np.asarray(PIL.Image.open(tmp_path / "imgs" / "ant" / "d.jpeg").convert("RGB"))
    assert np.array_equal(_pixels(ds, 1), jpeg)
    assert np.abs(_pixels(ds, 1).astype(int) - arrays["ant"][1]).mean() > 0  # really a lossy file
    assert np.array_equal(_pixels(ds, 3), arrays["moth"][0])
    assert np.array_equal(_pixels(ds, 4), arrays["zebra"][0]) and np.array_equal(_pixels(ds, 5), arrays["zebra"][1])
    mean = ds.x.double().mean((0, 2, 3)) / 255
    std = ds.x.double().std((0, 2, 3), unbiased=False) / 255
    assert ds.mean == pytest.approx(mean.tolist(), abs=1e-9) and ds.std == pytest.approx(std.tolist(), abs=1e-9)


def test_image_folder_converts_gray_and_rgba_to_rgb(tmp_path: Path) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    _save(tmp_path / "f" / "g" / "1.png", gray)
    rgba = np.dstack([_rgb(1), np.full((6, 8), 7, np.uint8)])
    _save(tmp_path / "f" / "g" / "2.png", rgba)
    ds = load_image_folder(tmp_path / "f")
    assert ds.x.shape == (2, 3, 6, 8)
    assert all(np.array_equal(ds.x[0, c].numpy(), gray) for c in range(3))
    assert np.array_equal(_pixels(ds, 1), rgba[..., :3])


def test_second_load_reads_cache_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image_folder(tmp_path / "imgs")
    first = load_image_folder(tmp_path / "imgs")
    _no_decoding(monkeypatch)
    second = load_image_folder(tmp_path / "imgs")
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert (first.classes, first.mean, first.std) == (second.classes, second.mean, second.std)
    cached = list((D.cache_dir() / "images").glob("*.x.npy"))
    assert any(np.array_equal(np.load(p), first.x.numpy()) for p in cached)


def test_cache_invalidates_when_a_file_is_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image_folder(tmp_path / "imgs")
    before = load_image_folder(tmp_path / "imgs")
    calls = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    new = _save(tmp_path / "imgs" / "moth" / "n.png", _rgb(99))
    after = load_image_folder(tmp_path / "imgs")
    assert len(after) == len(before) + 1 and after.y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert np.array_equal(_pixels(after, 4), _rgb(99)) and str(new) in map(str, calls)
    # The stale cache entry of this folder is gone; only the new one remains.
    prefix = D._cache_key(tmp_path / "imgs", "", False).split("-")[0]
    assert len(list((D.cache_dir() / "images").glob(f"{prefix}-*.json"))) == 1


def test_parallel_decoding_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image_folder(tmp_path / "imgs")
    serial = D._decode_all(D._list_image_folder(tmp_path / "imgs").files)
    monkeypatch.setattr(D, "_PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(D, "_DECODE_CHUNK", 2)
    monkeypatch.setenv("SLIMSEARCH_DATA_WORKERS", "2")
    parallel = D._decode_all(D._list_image_folder(tmp_path / "imgs").files)
    assert np.array_equal(serial, parallel) and serial.shape == (6, 3, 6, 8)
    (tmp_path / "imgs" / "zebra" / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SlimError, match=r"zebra/b\.png"):  # an error in a worker keeps its message
        D._decode_all(D._list_image_folder(tmp_path / "imgs").files)


def test_train_test_layout_and_class_only_layout(tmp_path: Path) -> None:
    _image_folder(tmp_path / "set" / "train", seed=0)
    test_arrays = _image_folder(tmp_path / "set" / "test", seed=50)
    train, test = load_train_test(tmp_path / "set")
    assert test is not None and len(train) == len(test) == 6 and train.name == test.name == "set"
    assert test.mean == train.mean and test.std == train.std  # test normalised with train statistics
    assert np.array_equal(_pixels(test, 0), test_arrays["ant"][0])
    only, none = load_train_test(tmp_path / "set" / "train")
    assert none is None and torch.equal(only.x, train.x)
    s = load_splits("imagefolder", str(tmp_path / "set" / "train"), 2, seed=0)
    assert s.test is None and (len(s.train), len(s.val)) == (4, 2)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar", ".zip"])
def test_archive_extracted_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    src = tmp_path / "src" / "mini-jpeg"
    _image_folder(src / "train", seed=0)
    _image_folder(src / "test", seed=50)
    stem = "mini_" + suffix.replace(".", "")  # one extraction folder per parametrisation in the shared cache
    archive = tmp_path / f"{stem}{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(src.rglob("*")):
                z.write(f, f.relative_to(src.parent))
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as t:
            t.add(src, arcname="mini-jpeg")
    train, test = load_train_test(archive)
    assert test is not None and train.classes == ("ant", "moth", "zebra") and (len(train), len(test)) == (6, 6)
    assert np.array_equal(_pixels(train, 0), _image_folder(tmp_path / "again", seed=0)["ant"][0])
    extracted = list((D.cache_dir() / "archives").glob(f"{stem}-*"))
    assert len(extracted) == 1 and not list((D.cache_dir() / "archives").glob(f".{stem}*"))  # no temp left
    _no_decoding(monkeypatch)
    monkeypatch.setattr(tarfile, "open", None)
    monkeypatch.setattr(zipfile, "ZipFile", None)
    train2, test2 = load_train_test(archive)
    assert test2 is not None and torch.equal(train.x, train2.x) and torch.equal(test.y, test2.y)
    s = load_splits("imagefolder", str(archive), 0.5, seed=0)
    assert s.test is not None and (len(s.train), len(s.val), len(s.test)) == (3, 3, 6)


# ----------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickle_roundtrip(tmp_path: Path) -> None:
    x, y = _cifar_pickle_folder(tmp_path / "cifar-10-batches-py")
    train, test = load_cifar_pickle(tmp_path / "cifar-10-batches-py")
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert np.array_equal(train.x.numpy().reshape(10, 3072), x) and train.y.tolist() == y.tolist()
    assert np.array_equal(train.x[0, 1].numpy(), x[0, 1024:2048].reshape(32, 32))  # R, G, B planes, row-major
    assert test.y.tolist() == [1, 2, 3] and train.classes == D.CIFAR10_CLASSES
    assert train.mean == IMAGENET_MEAN and test.std == IMAGENET_STD
    # The parent folder is detected too, and load_splits carves val out of train only.
    s = load_splits("cifar10", str(tmp_path), 4, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 4, 3) and s.train.name == "cifar10"
    # ... and so is the official cifar-10-python.tar.gz layout.
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train2, test2 = load_train_test(tmp_path / "cifar-10-python.tar.gz")
    assert torch.equal(train2.x, train.x) and torch.equal(test2.y, test.y)


def test_cifar100_pickle_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    for name, fine in (("train", [5, 99, 0, 42]), ("test", [7, 7, 1, 2])):
        d = {b"data": data, b"fine_labels": fine, b"coarse_labels": [0, 1, 2, 3], b"filenames": [b"a"] * 4}
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"s"] * 20}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    s = load_splits("cifar100", str(root), 1, seed=0)
    assert s.test is not None and s.train.num_classes == 100 and s.test.y.tolist() == [7, 7, 1, 2]
    assert sorted(s.train.y.tolist() + s.val.y.tolist()) == [0, 5, 42, 99]
    with pytest.raises(SlimError, match="100 classes but cifar10 needs 10"):
        load_splits("cifar10", str(root), 1)


def test_cifar_pickle_refuses_code(tmp_path: Path) -> None:
    _cifar_pickle_folder(tmp_path / "c")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(SlimError, match=r"test_batch.*refusing to load global"):
        load_cifar_pickle(tmp_path / "c")


# ----------------------------------------------------------------------------- splits


def test_split_deterministic_disjoint_sizes() -> None:
    ds = _indexed(500, 5)
    tr, va = split_train_val(ds, 100, seed=7)
    tr2, va2 = split_train_val(ds, 100, seed=7)
    _, va3 = split_train_val(ds, 100, seed=8)
    assert (len(tr), len(va)) == (400, 100)
    assert np.array_equal(_ids(va), _ids(va2)) and np.array_equal(_ids(tr), _ids(tr2))
    assert not np.array_equal(_ids(va), _ids(va3))
    assert set(_ids(tr)).isdisjoint(_ids(va)) and sorted(np.r_[_ids(tr), _ids(va)]) == list(range(500))
    assert torch.equal(va.y, ds.y[torch.from_numpy(_ids(va))])  # labels travel with their images
    assert len(split_train_val(ds, 0.25, seed=0)[1]) == 125
    # Stratified: every class gives up its share (within one image).
    counts, vcounts = torch.bincount(ds.y, minlength=5), torch.bincount(va.y, minlength=5)
    assert (vcounts.double() - counts.double() * 100 / 500).abs().max().item() <= 1.0


def test_split_val_prefix_is_stratified_even_for_class_sorted_input() -> None:
    ds = _indexed(500, 5)
    ds = dataclasses.replace(ds, y=torch.arange(500) // 100)  # stored class by class, like an image-folder archive
    _, va = split_train_val(ds, 100, seed=0)
    for k in (10, 25, 50):  # searches and benchmarks score on the first k val images
        assert torch.bincount(va.y[:k], minlength=5).tolist() == [k // 5] * 5


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -1, 500, 501, True, "10"])
def test_split_rejects_bad_val_size(bad: object) -> None:
    with pytest.raises(SlimError, match="val_size"):
        split_train_val(_indexed(500, 5), bad, seed=0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- augmentation and batches


def test_pad_crop_known_shifts_and_flips() -> None:
    x = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    full = torch.full((3,), 2)
    assert torch.equal(pad_crop(x, full, full, 2), x)  # offset (pad, pad) is the identity
    down = pad_crop(x, torch.zeros(3, dtype=torch.long), full, 2)  # content moves down by 2
    assert torch.equal(down[:, :, 2:], x[:, :, :-2]) and int(down[:, :, :2].max()) == 0
    right = pad_crop(x, full, torch.full((3,), 4), 2)  # content moves left by 2
    assert torch.equal(right[:, :, :, :-2], x[:, :, :, 2:]) and int(right[:, :, :, -2:].max()) == 0
    mask = torch.tensor([True, False, True])
    assert torch.equal(hflip(hflip(x, mask), mask), x)
    assert torch.equal(hflip(x, mask)[0], x[0].flip(-1)) and torch.equal(hflip(x, mask)[1], x[1])


def test_augment_shape_dtype_and_replayable() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(5), pad=1, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # The same draws, replayed explicitly, give the same batch.
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert torch.equal(out, hflip(pad_crop(x, dy, dx, 1), flips))
    assert torch.equal(augment(x, torch.Generator().manual_seed(5), pad=0, flip=False), x)


def test_batches_normalisation_and_order() -> None:
    x = torch.zeros(10, 2, 4, 4, dtype=torch.uint8)
    x[:, 0] = 255
    ds = Dataset(x, torch.arange(10), tuple("0123456789"), (0.5, 0.25), (0.25, 0.5), "t")
    xb, yb = next(batches(ds, 4))
    assert xb.dtype == torch.float32 and xb.shape == (4, 2, 4, 4) and yb.tolist() == [0, 1, 2, 3]
    assert torch.allclose(xb[:, 0], torch.tensor(2.0)) and torch.allclose(xb[:, 1], torch.tensor(-0.5))
    seen = torch.cat([y for _, y in batches(ds, 3, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert torch.equal(seen, torch.cat([y for _, y in batches(ds, 3, shuffle=True, seed=1)]))
    assert [len(y) for _, y in batches(ds, 4, drop_last=True)] == [4, 4]
    aug = [b for b, _ in batches(ds, 5, augment_data=True, seed=0)]
    assert [b.shape for b in aug] == [(5, 2, 4, 4)] * 2
    assert set(aug[0][:, 0].unique().tolist()) <= {2.0, -2.0}  # padding is black: (0 - 0.5) / 0.25


def test_subset_accepts_indices_and_masks() -> None:
    ds = _indexed(20, 3)
    assert _ids(ds.subset(torch.tensor([5, 2]))).tolist() == [5, 2]
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 7]] = True
    assert _ids(ds.subset(mask)).tolist() == [1, 7]


# ----------------------------------------------------------------------------- errors


def _one_line_error(fn: object, *args: object, match: str) -> str:
    with pytest.raises(SlimError, match=match) as e:
        fn(*args)  # type: ignore[operator]
    assert "\n" not in str(e.value)
    return str(e.value)


def test_error_missing_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for fn in (load_image_folder, load_train_test, load_exact_npz, load_cifar_pickle):
        _one_line_error(fn, missing, match=f"not found: {missing}")
    _one_line_error(load_splits, "cifar10", str(missing), 0.1, 0, match=str(missing))
    _one_line_error(load_splits, "cifar10", None, 0.1, 0, match="cifar10 needs a data root")


def test_error_data_path_is_a_plain_file(tmp_path: Path) -> None:
    f = tmp_path / "images.npz"
    f.write_bytes(b"x")
    _one_line_error(load_train_test, f, match=f"data path {f} is neither a folder nor a")
    _one_line_error(load_image_folder, f, match=f"image folder {f} is not a folder")


def test_error_unknown_dataset_lists_allowed() -> None:
    msg = _one_line_error(load_splits, "mnist", None, 0.1, 0, match="unknown dataset 'mnist'")
    assert all(name in msg for name in D.DATASETS)


def test_error_empty_class_folder(tmp_path: Path) -> None:
    _image_folder(tmp_path / "f")
    (tmp_path / "f" / "empty").mkdir()
    (tmp_path / "f" / "empty" / "readme.txt").write_text("x")
    _one_line_error(load_image_folder, tmp_path / "f", match=f"class folder {tmp_path / 'f' / 'empty'} has no")


def test_error_corrupt_image_names_file(tmp_path: Path) -> None:
    _image_folder(tmp_path / "f")
    bad = tmp_path / "f" / "moth" / "z.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _one_line_error(load_image_folder, tmp_path / "f", match=f"cannot decode image {bad}")


def test_error_mixed_sizes_names_file(tmp_path: Path) -> None:
    _image_folder(tmp_path / "f")
    odd = _save(tmp_path / "f" / "zebra" / "c.png", _rgb(3, h=7, w=8))
    _one_line_error(load_image_folder, tmp_path / "f", match=f"image {odd} is 8x7 but .* is 8x6")


def test_error_no_class_subfolders(tmp_path: Path) -> None:
    _save(tmp_path / "flat" / "a.png", _rgb(0))
    _one_line_error(load_image_folder, tmp_path / "flat", match=f"no class sub-folders in image folder {tmp_path}")


def test_error_corrupt_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not gzip at all" * 10)
    _one_line_error(load_train_test, junk, match=f"cannot extract archive {junk}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        payload = os.urandom(50_000)
        info = tarfile.TarInfo("x/a/1.bin")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(buf.getvalue()[:20_000])
    _one_line_error(load_train_test, truncated, match=f"cannot extract archive {truncated}")
    zjunk = tmp_path / "junk.zip"
    zjunk.write_bytes(b"PK nothing")
    _one_line_error(load_splits, "imagefolder", str(zjunk), 0.1, 0, match=f"cannot extract archive {zjunk}")
    assert not [p for p in (D.cache_dir() / "archives").glob("*") if p.name.startswith((".junk", ".cut", "junk"))]


# ----------------------------------------------------------------------------- the real archive


@pytest.mark.slow
@pytest.mark.shared
def test_real_cifar10_archive(monkeypatch: pytest.MonkeyPatch) -> None:
    archive = shared_path("data", "cifar10-jpeg.tar.gz")
    t0 = time.perf_counter()
    train, test = load_train_test(archive)
    t1 = time.perf_counter()
    assert test is not None and (len(train), len(test)) == (50000, 10000)
    assert train.classes[0] == "airplane" and train.num_classes == 10 and train.x.shape[1:] == (3, 32, 32)
    assert torch.bincount(train.y).tolist() == [5000] * 10 and torch.bincount(test.y).tolist() == [1000] * 10
    _no_decoding(monkeypatch)
    monkeypatch.setattr(tarfile, "open", None)  # a second load must not re-extract either
    t2 = time.perf_counter()
    train2, test2 = load_train_test(archive)
    t3 = time.perf_counter()
    assert test2 is not None and torch.equal(train.x, train2.x) and torch.equal(test.y, test2.y)
    s = load_splits("cifar10", str(archive), 5000, seed=0)
    t4 = time.perf_counter()
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000) and s.train.mean == IMAGENET_MEAN
    assert torch.bincount(s.val.y).tolist() == [500] * 10
    print(f"\ncifar10-jpeg: first load {t1 - t0:.2f} s, cached load {t3 - t2:.3f} s, load_splits {t4 - t3:.2f} s")


def test_digits_fast_path_equals_sklearn_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = load_digits_dataset()
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)  # force sklearn's own load_digits
    slow = load_digits_dataset()
    assert torch.equal(fast.x, slow.x) and torch.equal(fast.y, slow.y) and fast.mean == slow.mean


# ----------------------------------------------------------------------------- clean selection data (issue 22)


def test_val_from_test_takes_val_out_of_test_and_keeps_all_train() -> None:
    plain = load_splits("digits", None, 100, seed=0)
    clean = load_splits("digits", None, 100, seed=0, val_from="test")
    assert len(clean.train) == len(plain.train) + len(plain.val)  # every training image stays for fine-tuning
    assert (len(clean.val), len(clean.test)) == (100, len(plain.test) - 100)

    def rows(*xs: torch.Tensor) -> list[tuple[int, ...]]:
        return sorted(map(tuple, torch.cat(xs).flatten(1).tolist()))

    # val + the reported test images = exactly the test split; train = exactly every training image
    assert rows(clean.val.x, clean.test.x) == rows(plain.test.x)
    assert rows(clean.train.x) == rows(plain.train.x, plain.val.x)
    assert torch.bincount(clean.val.y, minlength=10).min() >= 9  # stratified


def test_val_root_is_the_val_set_with_train_normalisation(tmp_path: Path) -> None:
    _image_folder(tmp_path / "set" / "train", seed=0)
    _image_folder(tmp_path / "set" / "test", seed=50)
    held = _image_folder(tmp_path / "held", seed=90)
    s = load_splits("imagefolder", str(tmp_path / "set"), 2, seed=0, val_root=tmp_path / "held")
    assert (len(s.train), len(s.val), len(s.test)) == (6, 6, 6)  # val_size is ignored: all of val_root
    assert np.array_equal(_pixels(s.val, 0), held["ant"][0]) and s.val.mean == s.train.mean


def test_val_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SlimError, match="val_from must be one of train, test"):
        load_splits("digits", None, 10, val_from="holdout")
    _image_folder(tmp_path / "only")
    with pytest.raises(SlimError, match="needs a test split"):
        load_splits("imagefolder", str(tmp_path / "only"), 2, val_from="test")
    (tmp_path / "other" / "cat").mkdir(parents=True)
    _save(tmp_path / "other" / "cat" / "a.png", _rgb(1))
    with pytest.raises(SlimError, match="class folders"):
        load_splits("imagefolder", str(tmp_path / "only"), 2, val_root=tmp_path / "other")


def test_study_val_sources_match_core() -> None:
    from slimsearch.search.study import VAL_SOURCES

    assert VAL_SOURCES == D.VAL_SOURCES
