"""Bring-your-own model: the factory contract (declared parameters only, exceptions never swallowed, study-folder
imports appended to sys.path, output size checked), end to end on a 3-class image folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model, factory_kwargs
from slimsearch.search.cli import main

NETS = """\
import torch
from torch import nn

CALLS = []


def only_classes(num_classes):
    CALLS.append(("only_classes", num_classes))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def everything(num_classes, in_channels, input_size):
    CALLS.append(("everything", num_classes, in_channels, input_size))
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.Flatten(),
                         nn.Linear(4 * input_size * input_size, num_classes))


def no_params():
    CALLS.append(("no_params",))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def buggy(num_classes=10, in_channels=3):
    CALLS.append(("buggy",))
    return len(num_classes)  # TypeError inside the user's code


def needs_depth(num_classes, depth):
    return nn.Linear(depth, num_classes)
"""


@pytest.fixture
def nets(tmp_path: Path):
    (tmp_path / "usernets_fc.py").write_text(NETS)
    yield tmp_path
    sys.modules.pop("usernets_fc", None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def _calls() -> list[tuple]:
    return sys.modules["usernets_fc"].CALLS


def test_factory_gets_only_the_parameters_it_declares(nets: Path) -> None:
    model = build_model("usernets_fc:only_classes", num_classes=3, in_channels=3, input_size=8, search_dir=nets)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    build_model("usernets_fc:everything", num_classes=4, in_channels=1, input_size=6, search_dir=nets)
    build_model("usernets_fc:no_params", num_classes=3, in_channels=3, search_dir=nets)
    assert _calls() == [("only_classes", 3), ("everything", 4, 1, 6), ("no_params",)]
    assert factory_kwargs("x:f", lambda num_classes, *, input_size=2: None, {"num_classes": 5, "input_size": None}) \
        == {"num_classes": 5}  # fmt: skip


def test_a_type_error_inside_the_factory_is_reported_not_retried(nets: Path) -> None:
    with pytest.raises(SlimError, match=r"'usernets_fc:buggy' raised TypeError at usernets_fc\.py:\d+: .*len") as e:
        build_model("usernets_fc:buggy", num_classes=3, search_dir=nets)
    assert isinstance(e.value.__cause__, TypeError)  # chained: the traceback stays reachable
    assert _calls() == [("buggy",)]  # called once, never again without arguments


def test_a_parameter_slimsearch_cannot_supply_is_refused_before_the_call(nets: Path) -> None:
    with pytest.raises(SlimError, match="requires parameter 'depth'.*num_classes, in_channels, input_size"):
        build_model("usernets_fc:needs_depth", num_classes=3, search_dir=nets)
    with pytest.raises(SlimError, match="requires parameter 'input_size'.*not known here"):
        build_model("usernets_fc:everything", num_classes=3, in_channels=3, search_dir=nets)


def test_study_folder_is_appended_so_a_local_module_never_shadows_a_library(tmp_path: Path) -> None:
    (tmp_path / "tomllib.py").write_text("def build(num_classes):\n    raise RuntimeError('local shadow used')\n")
    with pytest.raises(SlimError, match="'tomllib' has no callable 'build'"):  # the standard library's tomllib
        build_model("tomllib:build", num_classes=3, search_dir=tmp_path)
    assert sys.path[-1] == str(tmp_path.resolve())
    sys.path.remove(str(tmp_path.resolve()))


def _image_folder(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cat"), n: int = 24, size: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            img[..., k] += 150  # one bright channel per class: learnable in a few steps
            Image.fromarray(img).save(root / c / f"{i}.png")


STUDY = """\
[study]
name = "byo"
n_trials = 2
n_startup_trials = 2
heartbeat_interval = 1
grace_period = 2

[model]
factory = "usernets_fc:{fn}"
pretrain_epochs = 1
pretrain_batch_size = 16

[data]
dataset = "imagefolder"
root = "imgs"
val_size = 12

[constraint]
max_macs_ratio = 0.8

[space]
prune_rate = [0.0, 0.5]
rate_step = 0.1

[evaluator]
kind = "proxy"
bn_batches = 2
batch_size = 16

[export]
formats = ["torchscript"]
"""


@pytest.fixture
def byo_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A study folder with a factory module next to the study file; the cwd and sys.path are elsewhere."""
    case = tmp_path / "case"
    case.mkdir()
    (case / "usernets_fc.py").write_text(NETS)
    _image_folder(case / "imgs")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    yield case
    sys.modules.pop("usernets_fc", None)
    while str(case) in sys.path:
        sys.path.remove(str(case))


def test_done_when_a_num_classes_only_factory_runs_on_3_classes_and_exports_3(byo_case: Path, capsys) -> None:
    study = byo_case / "study.toml"
    study.write_text(STUDY.format(fn="only_classes").replace('root = "imgs"', f'root = "{byo_case / "imgs"}"'))
    torch.set_num_threads(1)
    assert main(["run", str(study), "--no-progress", "--workers", "1"]) == 0, capsys.readouterr().err
    assert main(["export", str(study), "--trial", "best", "--out", str(byo_case / "out")]) == 0
    program = torch.jit.load(str(byo_case / "out" / "model.torchscript.pt"))
    assert program(torch.zeros(5, 3, 8, 8)).shape == (5, 3)
    manifest = json.loads((byo_case / "out" / "manifest.json").read_text())
    assert manifest["preprocessing"]["class_names"] == ["ant", "bee", "cat"]


def test_a_head_of_the_wrong_size_is_one_line_naming_both_numbers(byo_case: Path, capsys) -> None:
    study = byo_case / "study.toml"
    study.write_text(STUDY.format(fn="no_params").replace('root = "imgs"', f'root = "{byo_case / "imgs"}"'))
    code = main(["run", str(study), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "[model] factory 'usernets_fc:no_params' outputs 10 classes but the data has 3" in err[0]
    assert not (Path.cwd() / "runs").exists()  # nothing created
