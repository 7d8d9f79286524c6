"""Preprocessing travels with the export: the manifest's record, and the README's snippets classifying image
files from an exported quickstart model exactly as the search fed it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from slimsearch.core.export import FILES, export_model
from slimsearch.core.preprocess import preprocessing
from slimsearch.search.cli import main
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def readme_snippet(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- snippet:{name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet {name}"
    return m.group(1)


def test_manifest_records_the_preprocessing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    prep = preprocessing((1, 3, 12, 10), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), ("cat", "dog"), "imagefolder", "/d")
    export_model(model, None, tmp_path / "e", formats=("torchscript",), example_input=(1, 3, 12, 10),
                 preprocessing=prep)  # fmt: skip
    got = json.loads((tmp_path / "e" / "manifest.json").read_text())["preprocessing"]
    assert got["input_shape"] == [3, 12, 10] and got["resize"] == [12, 10] and got["channel_order"] == "RGB"
    assert got["mean"] == [0.1, 0.2, 0.3] and got["std"] == [0.5, 0.6, 0.7]
    assert got["class_names"] == ["cat", "dog"] and got["dataset"] == "imagefolder" and got["data_root"] == "/d"
    with pytest.raises(ValueError, match="3 channels"):
        preprocessing((1, 3, 8, 8), (0.5,), (0.5,), ("a",), "x")


@pytest.fixture(scope="module")
def quickstart_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """studies/quickstart.toml, shortened (3 pre-training epochs, 2 trials, 1 worker, 2 fine-tune epochs), searched and exported."""
    d = tmp_path_factory.mktemp("qs")
    text = (REPO / "studies" / "quickstart.toml").read_text()
    for old, new in (("pretrain_epochs = 10", "pretrain_epochs = 3"), ("n_trials = 20", "n_trials = 2"),
                     ("steps = 30", "steps = 2"), ("workers = 2 ", "workers = 1 "), ("finetune_epochs = 5", "finetune_epochs = 2")):  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    text = text.replace('name = "quickstart"', f'name = "quickstart"\nworkdir = "{d / "runs"}"\n'
                        f'storage = "sqlite:///{d / "qs.db"}"')  # fmt: skip
    study = d / "quickstart.toml"
    study.write_text(text)
    torch.set_num_threads(1)
    assert main(["run", str(study), "--no-progress"]) == 0
    out = d / "export"
    assert main(["export", str(study), "--trial", "best", "--format", "torchscript,pt2", "--out", str(out)]) == 0
    return out


def _digit_pngs(folder: Path, n: int) -> list[tuple[Path, int, torch.Tensor]]:
    """Test-split digits as 8-bit grayscale PNG files, with their labels and the tensor the search fed."""
    from PIL import Image
    from slimsearch.core.data import load_splits

    test = load_splits("digits", None, 300, 0).test
    assert test is not None
    folder.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"digit{i}.png"
        Image.fromarray(test.x[i, 0].numpy()).save(p)
        out.append((p, int(test.y[i]), test.normalize(test.x[i : i + 1])))
    return out


def test_readme_torch_snippet_classifies_image_files_like_the_search(quickstart_export: Path, tmp_path: Path,
                                                                   capsys) -> None:  # fmt: skip
    manifest = json.loads((quickstart_export / "manifest.json").read_text())
    prep = manifest["preprocessing"]
    assert prep["input_shape"] == [1, 8, 8] and prep["channel_order"] == "L" and prep["dataset"] == "digits"
    assert prep["class_names"] == [str(c) for c in range(10)]
    program = torch.jit.load(str(quickstart_export / FILES["torchscript"]))
    code = readme_snippet("torch")
    right = 0
    for path, label, fed in _digit_pngs(tmp_path, 40):
        scope: dict = {}
        exec(code.replace('"runs/quickstart/export/trial-0", "digit.png"', f'"{quickstart_export}", "{path}"'), scope)
        printed = capsys.readouterr().out.strip()
        assert torch.allclose(scope["x"], fed, atol=1e-6)  # the snippet's tensor is the one the search used
        with torch.no_grad():
            assert printed == str(int(program(fed).argmax(1)))
        right += printed == str(label)
    assert right >= 24, f"{right}/40 right"  # a trained digits model (test_acc ~0.76), fed correctly; chance is 4
    pt2 = torch.export.load(str(quickstart_export / FILES["pt2"])).module()
    with torch.no_grad():
        assert torch.allclose(pt2(scope["x"]), program(scope["x"]), atol=1e-5)


def test_readme_onnxruntime_snippet(quickstart_export: Path, tmp_path: Path, capsys) -> None:
    if "onnx" not in FILES:
        pytest.skip("no onnx export format in core.export yet")
    pytest.importorskip("onnxruntime")
    d = tmp_path / "onnx"
    assert main(["export", str(quickstart_export.parent / "quickstart.toml"), "--format", "onnx", "--out", str(d)]) == 0
    capsys.readouterr()
    (path, label, fed), *_ = _digit_pngs(tmp_path, 1)
    code = readme_snippet("torch").replace('"runs/quickstart/export/trial-0", "digit.png"', f'"{d}", "{path}"')
    code = "\n".join(code.splitlines()[:-1]) + "\n" + readme_snippet("onnxruntime")
    scope: dict = {}
    exec(code, scope)
    program = torch.jit.load(str(quickstart_export / FILES["torchscript"]))
    assert np.allclose(scope["logits"], program(fed).detach().numpy(), atol=1e-4)
    assert capsys.readouterr().out.strip() == str(int(program(fed).argmax(1)))
