"""Folder layouts users have: train/ + val/ + test/ in any combination, and [data] image_size resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from slimsearch.core.data import load_image_folder, load_layout, load_splits
from slimsearch.core.errors import SlimError
from slimsearch.search.cli import main
from slimsearch.search.study import study_from_dict

CLASSES = ("ant", "bee", "cat")


def _folder(root: Path, n: int = 4, size: tuple[int, int] = (6, 8), seed: int = 0, classes=CLASSES) -> None:
    """``root/<class>/<i>.png``: n RGB images per class, H×W = ``size``; class k has mean brightness 60·k."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.integers(0, 40, (*size, 3)) + 60 * k).astype(np.uint8)
            PIL.Image.fromarray(img).save(root / c / f"{i}.png")


def test_an_explicit_val_folder_is_the_val_split(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train", n=6)
    _folder(tmp_path / "d" / "val", n=3, seed=1)
    s = load_splits("imagefolder", tmp_path / "d", val_size=0.5, seed=0)
    assert len(s.train) == 18 and len(s.val) == 9 and s.test is None  # val_size unused: val/ replaces it
    assert s.val.mean == s.train.mean and s.val.std == s.train.std  # normalised with train's statistics
    assert sorted(s.val.y[:3].tolist()) == [0, 1, 2]  # interleaved: any prefix is class-balanced
    val_pixels = {bytes(x.numpy()) for x in load_image_folder(tmp_path / "d" / "val").x}
    assert {bytes(x.numpy()) for x in s.val.x} == val_pixels  # exactly the val/ images, none of train/


def test_train_val_test_in_any_combination(tmp_path: Path) -> None:
    _folder(tmp_path / "all" / "train", n=5)
    _folder(tmp_path / "all" / "validation", n=2, seed=1)
    _folder(tmp_path / "all" / "test", n=3, seed=2)
    train, val, test = load_layout(tmp_path / "all")
    assert (len(train), len(val), len(test)) == (15, 6, 9)
    _folder(tmp_path / "tt" / "train", n=5)
    _folder(tmp_path / "tt" / "test", n=3, seed=2)
    s = load_splits("imagefolder", tmp_path / "tt", val_size=3, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 3, 9)  # no val/: cut from train/
    _folder(tmp_path / "flat", n=4)
    assert [v is None for v in load_layout(tmp_path / "flat")[1:]] == [True, True]


@pytest.mark.parametrize(
    ("folders", "match"),
    [
        (("val", "test"), "has val/, test/ but no train/ folder"),
        (("train", "val", "valid"), "has both val/ and valid/"),
    ],
)
def test_bad_layouts_are_one_line(tmp_path: Path, folders: tuple[str, ...], match: str) -> None:
    for f in folders:
        _folder(tmp_path / "d" / f, n=2)
    with pytest.raises(SlimError, match=match):
        load_layout(tmp_path / "d")


def test_val_with_other_classes_is_refused(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train", n=2)
    _folder(tmp_path / "d" / "val", n=2, classes=("ant", "bee"))
    with pytest.raises(SlimError, match="class folders differ between .*train and .*val"):
        load_layout(tmp_path / "d")


def test_image_size_resizes_on_first_decode_and_caches_each_size(tmp_path: Path, monkeypatch) -> None:
    _folder(tmp_path / "mixed", n=2, size=(6, 8))
    _folder(tmp_path / "mixed", n=1, size=(12, 10), seed=5, classes=("bee",))  # overwrites bee/0.png: 12x10
    with pytest.raises(SlimError, match=r"all images must have one size, or set \[data\] image_size"):
        load_image_folder(tmp_path / "mixed")
    ds = load_image_folder(tmp_path / "mixed", image_size=(5, 7))
    assert tuple(ds.x.shape) == (6, 3, 5, 7)
    with PIL.Image.open(tmp_path / "mixed" / "bee" / "0.png") as im:
        want = np.asarray(im.convert("RGB").resize((7, 5), PIL.Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(ds.x[2].numpy(), want)  # bee/0.png resized by PIL, bilinear
    other = load_image_folder(tmp_path / "mixed", image_size=(4, 4))
    assert tuple(other.x.shape) == (6, 3, 4, 4)
    calls: list = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    again = load_image_folder(tmp_path / "mixed", image_size=(5, 7))
    assert calls == [] and torch.equal(again.x, ds.x)  # from the cache of size 5x7, not evicted by 4x4
    assert torch.equal(load_image_folder(tmp_path / "mixed", image_size=(4, 4)).x, other.x) and calls == []


def test_image_size_in_the_study_file(tmp_path: Path, capsys, monkeypatch) -> None:
    _folder(tmp_path / "imgs" / "train", n=4, size=(9, 13))
    _folder(tmp_path / "imgs" / "val", n=2, size=(9, 13), seed=1)
    base = {"study": {"name": "s"}, "model": {"factory": "resnet20", "pretrain_epochs": 1},
            "data": {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": [8, 12]}}  # fmt: skip
    cfg = study_from_dict(base, tmp_path / "s.toml")
    assert cfg.data.image_size == (8, 12)
    for bad in ([8], [8, 0], [8.5, 8], "8x8"):
        with pytest.raises(SlimError, match=r"\[data\] image_size"):
            study_from_dict({**base, "data": {**base["data"], "image_size": bad}}, tmp_path / "s.toml")
    with pytest.raises(SlimError, match="image_size: applies to image folders"):
        study_from_dict({**base, "data": {"dataset": "digits", "image_size": [8, 8]}}, tmp_path / "s.toml")
    text = (
        '[study]\nname = "s"\n[model]\nfactory = "resnet20"\npretrain_epochs = 1\n[data]\ndataset = "imagefolder"\n'
        f'root = "{tmp_path / "imgs"}"\nimage_size = [8, 12]\n'
    )
    (tmp_path / "s.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["space", str(tmp_path / "s.toml")]) == 0
    assert "model resnet20, input 3x8x12" in capsys.readouterr().out  # non-square input shape
