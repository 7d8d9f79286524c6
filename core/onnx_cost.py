"""MACs and params of an ONNX file, read from its graph, so ``slimsearch cost model.onnx`` measures the file a user
deploys to ONNX Runtime (the ``slimsearch[onnx]`` extra; ``core.onnx_export`` writes such files).

MACs follow ``core.cost``'s convention (the matrix-multiply family only, per image): after ONNX shape inference at
the given input shape (batch 1), ``Conv`` counts ``prod(output) x C_in/groups x prod(kernel)`` (its weight's shape
after the first dim, so grouped and depthwise convs cost what ``torch.utils.flop_counter`` says), ``ConvTranspose``
``prod(input) x C_out/groups x prod(kernel)``, ``Gemm`` and ``MatMul`` ``prod(output) x K``. Bias adds, BN,
activations, pooling and element-wise ops are not counted, as in ``core.cost``.

Params: the elements of the graph's initializers, except int64 ones, which ONNX uses only for shape, axes and index
operands (Reshape's shape, ReduceMean's axes, Slice, Pad), never for weights. The exporter folds each eval-mode
BatchNorm into the conv before it (a bias per filter instead of BN's weight and bias), so a model with BN has
fewer params here than ``count_cost`` gives for the PyTorch module, as a frozen TorchScript program does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimsearch.core.errors import SlimError
from slimsearch.core.onnx_export import require_onnx
from slimsearch.core.program import manifest_shape

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto

__all__ = ["OnnxFile", "onnx_macs", "onnx_params", "read_onnx"]

INT64 = 7  # onnx.TensorProto.INT64


@dataclass(frozen=True)
class OnnxFile:
    """A loaded ONNX model with what ``slimsearch cost`` needs to measure it."""

    path: Path
    proto: ModelProto
    input_name: str
    input_dims: tuple[int | None, ...]  # the model's input, None for a symbolic (dynamic) dim
    params: int
    manifest_shape: tuple[int, ...] | None  # (1, C, H, W) from the export's manifest.json, when next to the file

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.input_dims) and self.input_dims[0] is None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` fits the model's input, the batch dim aside."""
        dims = self.input_dims
        return len(dims) == len(shape) and all(d in (None, v) for d, v in zip(dims[1:], shape[1:], strict=True))

    def default_shape(self) -> tuple[int, ...] | None:
        """The shape to measure at when none is given: the manifest's, else the model's input with batch 1 (None
        when a dim other than the batch is symbolic)."""
        if self.manifest_shape is not None:
            return self.manifest_shape
        rest = self.input_dims[1:]
        if not self.input_dims or any(d is None for d in rest):
            return None
        return (1, *rest)  # type: ignore[arg-type]


def read_onnx(path: str | Path) -> OnnxFile:
    """Load the ONNX file at ``path`` (``SlimError`` naming it when missing, unreadable or not one input)."""
    onnx, _ = require_onnx(f"measuring {Path(path).name}")
    p = Path(path)
    if not p.is_file():
        raise SlimError(f"exported model not found: {p}")
    try:
        proto = onnx.load(str(p))
    except Exception as e:
        raise SlimError(f"{p} is not a readable ONNX model ({type(e).__name__})") from None
    if proto.functions:  # nodes of model-local functions are counted where they are called
        import onnx.inliner

        proto = onnx.inliner.inline_local_functions(proto)
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        raise SlimError(f"{p}: slimsearch cost measures models with one tensor input; this one has {len(inputs)}")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in inputs[0].type.tensor_type.shape.dim)  # fmt: skip
    return OnnxFile(p, proto, inputs[0].name, dims, onnx_params(proto), manifest_shape(p))


def onnx_params(proto: ModelProto) -> int:
    """Elements of the initializers that are not int64 (module docstring)."""
    return sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type != INT64)


def onnx_macs(proto: ModelProto, input_name: str, input_shape: tuple[int, ...], where: str = "model") -> int:
    """Multiply-accumulates of one run of ``proto`` at ``input_shape`` (its ``input_name`` pinned to it), counted
    from the shapes ONNX shape inference gives (module docstring). ``where`` names the model in errors."""
    onnx, _ = require_onnx(f"measuring {where}")
    model = type(proto)()
    model.CopyFrom(proto)
    for inp in model.graph.input:
        if inp.name == input_name:
            shape = inp.type.tensor_type.shape
            del shape.dim[:]
            for v in input_shape:
                shape.dim.add().dim_value = int(v)
    del model.graph.value_info[:]  # the exporter's shapes at its example input: inferred again at this one
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlimError(f"{where}: ONNX shape inference fails at input {list(input_shape)}: {first}") from None
    g = model.graph
    shapes: dict[str, tuple[int, ...] | None] = {t.name: tuple(t.dims) for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else None
        known = (
            dims is not None and vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims)
        )
        shapes.setdefault(vi.name, tuple(d.dim_value for d in dims) if known else None)  # type: ignore[union-attr]

    def shape_of(node: NodeProto, name: str) -> tuple[int, ...]:
        s = shapes.get(name)
        if s is None:
            raise SlimError(f"{where}: no static shape for {name!r} of {node.op_type} node {node.name!r} at input "
                            f"{list(input_shape)}; cannot count its MACs")  # fmt: skip
        return s

    macs = 0
    for node in g.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else ""
        if op == "Conv":
            macs += math.prod(shape_of(node, node.output[0])) * math.prod(shape_of(node, node.input[1])[1:])
        elif op == "ConvTranspose":
            macs += math.prod(shape_of(node, node.input[0])) * math.prod(shape_of(node, node.input[1])[1:])
        elif op == "Gemm":
            a = shape_of(node, node.input[0])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            macs += math.prod(shape_of(node, node.output[0])) * a[0 if trans_a else 1]
        elif op == "MatMul":
            macs += math.prod(shape_of(node, node.output[0])) * shape_of(node, node.input[0])[-1]
    return macs
