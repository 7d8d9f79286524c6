"""ONNX export (``core.onnx_export``, format ``onnx``): checked files for pruned, CP, Tucker and option-A shortcut
layers with a dynamic batch, a clear error without the extra, and a file that runs with only onnxruntime + numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import block_import
from nets import randomize_bn
from slimsearch.core.apply import apply_policy
from slimsearch.core.errors import SlimError
from slimsearch.core.export import export_model, load_exported
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy

SHAPE = (1, 1, 8, 8)
HALF = Policy(  # pruned, Tucker, FPGM and CP layers of the small CNN
    {
        "features.0": LayerPolicy(prune_rate=0.5),
        "features.3": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.5),
        "features.7": LayerPolicy(prune_rate=0.5, criterion="fpgm"),
        "features.10": LayerPolicy(prune_rate=0.5, decomposition="cp", rank=4),
    }
)

onnx = pytest.importorskip("onnx", reason="the onnx extra (pip install 'slimsearch[onnx]') is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

# Runs in `python -I` (no PYTHONPATH, no user site, no cwd on the path) with torch, onnx and slimsearch made
# unimportable: the .onnx file must run on onnxruntime + numpy alone.
ORT_ONLY = """
import importlib.abc, sys
BLOCK = ("torch", "onnx", "onnxscript", "slimsearch", "core", "spaces", "evaluators", "search")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
model, io_file = sys.argv[1], sys.argv[2]
data = np.load(io_file)
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = s.get_inputs()[0].name
y = s.run(None, {name: data["x"]})[0]
y7 = s.run(None, {name: np.concatenate([data["x"][:1]] * 7)})[0]
bad = [k for k in sys.modules if k.split(".")[0] in BLOCK]
print(f"{float(np.abs(y - data['y']).max())} {y7.shape[0]} {','.join(bad) or '-'}")
"""


def run_ort_only(tmp_path: Path, model_file: Path, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Max difference to ``y`` and the batch of a 7-image run, from a fresh ORT-only interpreter."""
    import numpy as np

    np.savez(tmp_path / "io.npz", x=x.numpy(), y=y.numpy())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-I", "-c", ORT_ONLY, str(model_file), str(tmp_path / "io.npz")],
                          cwd="/", env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, batch, imported = proc.stdout.split()
    assert imported == "-"
    return float(diff), int(batch)


@pytest.fixture(scope="module")
def compressed() -> torch.nn.Module:
    return apply_policy(randomize_bn(build_model("smallcnn")), HALF, input_shape=SHAPE)


def test_pruned_cp_tucker_export_is_checked_and_runs_on_onnxruntime_alone(
    compressed: torch.nn.Module, tmp_path: Path
) -> None:
    files = export_model(compressed, HALF, tmp_path / "e", formats=("pt2", "onnx"), example_input=SHAPE)
    path = files["onnx"]
    assert path.name == "model.onnx"
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [18]
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # a dynamic batch dimension
    ops = {n.op_type for n in m.graph.node}
    assert "Conv" in ops
    x = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        y = compressed(x)
    diff, batch = run_ort_only(tmp_path, path, x, y)
    assert diff <= 1e-5 + 1e-5 * float(y.abs().max()) and batch == 7
    with torch.no_grad():  # load_exported runs it too, through ONNX Runtime
        torch.testing.assert_close(load_exported(path)(x), y, atol=1e-5, rtol=1e-4)
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["files"]["onnx"] == "model.onnx" and "onnx" in manifest["self_contained"]
    assert manifest["deploy"]["onnxruntime"]["file"] == "model.onnx"
    assert manifest["deploy"]["pytorch"]["file"] == "model.pt2" and "libtorch" not in manifest["deploy"]


def test_resnet_option_a_shortcuts_export(tmp_path: Path) -> None:
    """Pruned residual streams make the option-A shortcuts gather and scatter channels; they export and match."""
    torch.manual_seed(0)  # which channels FPGM keeps, and so whether the shortcuts scatter, depends on the weights
    model = randomize_bn(build_model("resnet20"))
    policy = Policy(
        {n: LayerPolicy(prune_rate=0.4, criterion="fpgm") for n in ("conv1", "layer2.0.conv2", "layer3.0.conv2")}
        | {"layer3.1.conv1": LayerPolicy(decomposition="cp", rank=8)}
    )
    pruned = apply_policy(model, policy)
    assert pruned.layer2[0].shortcut.scatter and pruned.layer3[0].shortcut.select
    files = export_model(pruned, policy, tmp_path / "r", formats=("onnx",), example_input=(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = pruned(x)
    diff, batch = run_ort_only(tmp_path, files["onnx"], x, y)
    assert diff <= 1e-5 + 1e-5 * float(y.abs().max()) and batch == 7


def test_check_onnx_rejects_a_wrong_file(compressed: torch.nn.Module, tmp_path: Path) -> None:
    from slimsearch.core.onnx_export import check_onnx, write_onnx

    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        y = compressed(x)
    write_onnx(compressed, x, tmp_path / "m.onnx")
    assert check_onnx(tmp_path / "m.onnx", x, y) <= 1e-5 + 1e-5 * float(y.abs().max())
    with pytest.raises(RuntimeError, match="ONNX Runtime output differs"):
        check_onnx(tmp_path / "m.onnx", x, y + 1e-3 * float(y.abs().max()) + 1e-4)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="onnx.checker"):
        check_onnx(tmp_path / "bad.onnx", x, y)


def test_missing_extra_is_one_clear_line_and_writes_nothing(
    compressed: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block_import(monkeypatch, "onnxruntime")
    with pytest.raises(SlimError) as e:
        export_model(compressed, HALF, tmp_path / "e", formats=("onnx",), example_input=SHAPE)
    msg = str(e.value)
    assert "\n" not in msg and "onnxruntime" in msg and "pip install 'slimsearch[onnx]'" in msg
    assert list(tmp_path.iterdir()) == []  # no export directory, no temporary left behind


def test_cli_exports_a_checked_onnx_file_that_runs_without_torch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from helpers import make_baseline, write_study
    from slimsearch.search.cli import main

    monkeypatch.chdir(tmp_path)
    p = write_study(tmp_path, make_baseline(tmp_path_factory), n_trials=2)
    assert main(["run", str(p), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(p), "--trial", "best", "--format", "onnx"]) == 0, capsys.readouterr().err
    exp = next((tmp_path / "runs" / "tiny" / "export").iterdir())
    assert sorted(json.loads((exp / "manifest.json").read_text())["files"]) == ["onnx"]
    check = torch.load(exp / "check.pt", weights_only=True)
    diff, batch = run_ort_only(tmp_path, exp / "model.onnx", check["input"], check["output"])
    assert diff <= 1e-5 + 1e-5 * float(check["output"].abs().max()) and batch == 7
