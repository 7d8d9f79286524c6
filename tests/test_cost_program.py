"""`slimsearch cost FILE` measures an exported program (TorchScript, frozen TorchScript, .pt2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import cost_numbers
from slimsearch.core.cost import count_cost
from slimsearch.core.export import FILES, export_model
from slimsearch.core.models import build_model
from slimsearch.core.program import load_program
from slimsearch.search.cli import main
from torch import nn


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1).eval()
    for m in model.modules():  # distinct folded biases (all-zero ones would be stored once by TorchScript)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    out = tmp_path_factory.mktemp("cost") / "e"
    export_model(model, None, out, formats=("torchscript", "torchscript-frozen", "pt2"), example_input=(1, 1, 8, 8))
    return out, model


@pytest.mark.parametrize("fmt", ["torchscript", "torchscript-frozen", "pt2"])
def test_cost_of_an_exported_file_matches_the_model(exported, fmt: str, capsys) -> None:
    out, model = exported
    torch.set_num_threads(1)
    assert main(["cost", str(out / FILES[fmt])]) == 0  # input shape from the manifest next to it
    text = capsys.readouterr().out
    macs, params, shape = cost_numbers(text)
    want = count_cost(model, (1, 1, 8, 8))
    assert macs == want.macs == 1_493_632 and shape == "1x1x8x8" and f"({fmt})" in text
    bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Frozen: BN folded into the convs (a bias per filter instead of BN's weight and bias): bn fewer numbers.
    assert params == (want.params - bn if fmt == "torchscript-frozen" else want.params)
    assert re.search(r"latency +\d+\.\d+ ms at batch 1", text)


def test_cost_of_a_file_without_manifest_needs_an_input_shape(exported, tmp_path: Path, capsys) -> None:
    out, _ = exported
    lone = tmp_path / "m.pt2"
    lone.write_bytes((out / FILES["pt2"]).read_bytes())
    assert main(["cost", str(lone)]) == 2
    assert "give --input-shape C,H,W" in capsys.readouterr().err
    assert main(["cost", str(lone), "--input-shape", "1,8,8"]) == 0
    assert cost_numbers(capsys.readouterr().out)[0] == 1_493_632
    assert load_program(lone).input_shape is None


def test_cost_refuses_a_state_dict_and_junk_in_one_line(tmp_path: Path, capsys) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "state.pt")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    for f, needle in (("state.pt", "neither a TorchScript program nor a .pt2 file"),
                      ("junk.pt2", "not a readable torch.export program")):  # fmt: skip
        assert main(["cost", str(tmp_path / f), "--input-shape", "3,8,8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and f in err[0]
