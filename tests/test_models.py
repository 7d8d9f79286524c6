"""Model zoo: shapes and parameter counts, public checkpoints' accuracy, factories, checkpoint errors."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import shared_path
from slimsearch.core.data import load_exact_npz
from slimsearch.core.errors import SlimError
from slimsearch.core.models import ZOO, build_model, load_checkpoint, read_state_dict
from slimsearch.core.train import evaluate

# Parameter counts of the standard CIFAR definitions (ResNets: He et al. 2016, option A).
EXPECTED_PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "vgg16": 14_724_042,
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_runs_and_has_the_expected_size(name: str) -> None:
    in_ch, size = (1, 8) if name == "smallcnn" else (3, 32)
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_ch, size, size))
    assert out.shape == (2, 7)
    if name in EXPECTED_PARAMS:
        ten_class = build_model(name)
        assert sum(p.numel() for p in ten_class.parameters()) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize(("name", "file", "floor", "reference"), [
    ("resnet56", "resnet56-4bfd9763.th", 0.925, 0.9326),
    ("resnet20", "resnet20-12fca82f.th", 0.910, 0.9173),
])  # fmt: skip
def test_public_checkpoints_score_on_exact_cifar10_pixels(name: str, file: str, floor: float, reference: float) -> None:
    ckpt = shared_path("models", file)
    ds = load_exact_npz(shared_path("data", "cifar10-test-exact-846.npz"))
    model = load_checkpoint(build_model(name), ckpt)
    acc = evaluate(model, ds, batch_size=256)
    assert acc >= floor
    assert acc == pytest.approx(reference, abs=0.002)  # SOURCE.md's figures: the definition is exact


def test_factory_path_builds_a_user_model(tmp_path, monkeypatch) -> None:
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def not_a_model():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:build", num_classes=5)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 5)
    with pytest.raises(SlimError, match="returned int"):
        build_model("mynets:not_a_model")
    with pytest.raises(SlimError, match="has no callable 'missing'"):
        build_model("mynets:missing")
    with pytest.raises(SlimError, match="cannot import 'no_such_pkg_xyz'"):
        build_model("no_such_pkg_xyz:fn")
    sys.modules.pop("mynets", None)


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(SlimError, match=r"unknown model 'resnet21'.*resnet20"):
        build_model("resnet21")


def test_checkpoint_errors_say_what_and_where(tmp_path) -> None:
    model = build_model("resnet20")
    with pytest.raises(SlimError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "missing.th")
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(SlimError, match=rf"checkpoint {corrupt} is corrupt"):
        load_checkpoint(model, corrupt)
    other = tmp_path / "vgg11.th"
    torch.save(build_model("vgg11").state_dict(), other)
    with pytest.raises(SlimError, match=r"does not fit model CifarResNet: \d+ missing keys"):
        load_checkpoint(model, other)


def test_module_prefix_and_wrappers_are_stripped(tmp_path) -> None:
    src = build_model("resnet20")
    path = tmp_path / "wrapped.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "best_prec1": 1.0}, path)
    assert all(not k.startswith("module.") for k in read_state_dict(path))
    dst = load_checkpoint(build_model("resnet20"), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
