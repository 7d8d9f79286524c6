"""`slimsearch cost model.onnx` (``core.onnx_cost``): MACs from the ONNX graph equal ``count_cost`` on the PyTorch
model (pruned, Tucker and CP layers, grouped convs, Gemm, MatMul, ConvTranspose), params are the file's weight
initializers, latency is an ONNX Runtime session's; bad input is one line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from helpers import block_import, cost_numbers
from nets import randomize_bn
from slimsearch.core.apply import apply_policy
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.export import FILES, export_model
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.cli import main
from torch import nn

onnx = pytest.importorskip("onnx", reason="the onnx extra (pip install 'slimsearch[onnx]') is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'slimsearch[onnx]') is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra (pip install 'slimsearch[onnx]') is not installed")

SHAPE = (1, 1, 8, 8)
HALF = Policy(  # pruned, Tucker (1x1-kxk-1x1) and CP (1x1, depthwise kx1 and 1xk, 1x1) layers of the small CNN
    {
        "features.0": LayerPolicy(prune_rate=0.5),
        "features.3": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.5),
        "features.7": LayerPolicy(prune_rate=0.25),
        "features.10": LayerPolicy(prune_rate=0.5, decomposition="cp", rank=4),
    }
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = apply_policy(randomize_bn(build_model("smallcnn", num_classes=10, in_channels=1)), HALF, input_shape=SHAPE)
    out = tmp_path_factory.mktemp("cost") / "e"
    export_model(model.eval(), HALF, out, formats=("onnx",), example_input=SHAPE)
    return out / FILES["onnx"], model


def _weights(path: Path) -> int:
    return sum(
        math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer if t.data_type != onnx.TensorProto.INT64
    )


def test_cost_of_an_onnx_export_matches_the_model(exported, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = exported
    graph = onnx.load(str(path)).graph
    groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert max(groups) == 4 and "Gemm" in {n.op_type for n in graph.node}  # CP's depthwise convs and the head
    assert main(["cost", str(path)]) == 0  # input shape from the manifest next to it
    text = capsys.readouterr().out
    macs, params, shape = cost_numbers(text)
    want = count_cost(model, SHAPE)
    assert macs == want.macs and shape == "1x1x8x8" and "(onnx)" in text
    assert macs < count_cost(build_model("smallcnn", num_classes=10, in_channels=1), SHAPE).macs
    # The exporter folds each eval-mode BN into its conv (a bias per filter instead of BN's weight and bias), as
    # torch.jit.freeze does: bn fewer numbers than the module's parameters. No other float tensor is stored.
    bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    assert params == _weights(path) == want.params - bn
    lat = re.search(r"latency +(\d+\.\d+) ms at batch 1, +(\d+\.\d+) ms at batch 64 .*onnxruntime, CPU, 1 thread", text)
    assert lat and float(lat.group(1)) > 0 and float(lat.group(2)) > 0


def test_onnx_file_without_manifest_takes_the_models_input(exported, tmp_path: Path, capsys) -> None:
    path, model = exported
    lone = tmp_path / "m.onnx"
    lone.write_bytes(path.read_bytes())
    assert main(["cost", str(lone), "--threads", "2"]) == 0  # batch dynamic, C,H,W fixed at export: 1x1x8x8
    text = capsys.readouterr().out
    assert cost_numbers(text) == (count_cost(model, SHAPE).macs, _weights(lone), "1x1x8x8") and "2 threads" in text
    assert main(["cost", str(lone), "--input-shape", "1,16,16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model's input ['batch', 1, 8, 8]" in err[0] and "m.onnx" in err[0]
    proto = onnx.load(str(lone))  # the same graph with its batch pinned: timed at batch 1 only
    for batch, name in ((1, "b1.onnx"), (2, "b2.onnx")):
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        onnx.save(proto, str(tmp_path / name))
    assert main(["cost", str(tmp_path / "b1.onnx")]) == 0
    text = capsys.readouterr().out
    assert cost_numbers(text)[0] == count_cost(model, SHAPE).macs and "batch is fixed at 1" in text
    assert "batch 64" not in text
    assert main(["cost", str(tmp_path / "b2.onnx")]) == 2
    assert "its batch is fixed at 2" in capsys.readouterr().err


class Mixed(nn.Module):
    """Grouped and transposed convs, a linear over tokens (MatMul) and one over a flat vector (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.tok = nn.Linear(6, 5)
        self.head = nn.Linear(5 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.conv(x)))  # N, 6, 8, 8
        h = self.tok(h.flatten(2).transpose(1, 2))  # N, 64, 5
        return self.head(h.flatten(1))


def test_onnx_macs_counts_grouped_transposed_convs_gemm_and_matmul(tmp_path: Path) -> None:
    from slimsearch.core.onnx_cost import onnx_macs, read_onnx
    from slimsearch.core.onnx_export import write_onnx

    torch.manual_seed(0)
    model, shape = Mixed().eval(), (1, 4, 4, 4)
    write_onnx(model, torch.randn(shape), tmp_path / "mixed.onnx")
    f = read_onnx(tmp_path / "mixed.onnx")
    ops = {n.op_type for n in f.proto.graph.node}
    assert {"Conv", "ConvTranspose", "MatMul", "Gemm"} <= ops
    hand = 8 * 16 * 2 * 9 + 8 * 16 * 3 * 4 + 64 * 6 * 5 + 320 * 3  # conv, transposed conv, tokens, head
    assert onnx_macs(f.proto, f.input_name, shape) == count_cost(model, shape).macs == hand
    assert f.params == sum(p.numel() for p in model.parameters()) and f.default_shape() == shape and f.batch_dynamic


def test_unreadable_onnx_and_missing_extra_are_one_line(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    assert main(["cost", str(tmp_path / "junk.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.onnx is not a readable ONNX model" in err[0]
    block_import(monkeypatch, "onnxruntime")
    assert main(["cost", str(exported[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs onnxruntime" in err[0] and "pip install 'slimsearch[onnx]'" in err[0]
    with pytest.raises(SlimError, match="needs onnxruntime"):
        from slimsearch.core.onnx_cost import read_onnx

        read_onnx(exported[0])
