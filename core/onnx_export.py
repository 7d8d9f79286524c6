"""ONNX export and ONNX Runtime programs (the optional ``slimsearch[onnx]`` extra: onnx, onnxruntime, onnxscript).

Path: ``torch.onnx.export(..., dynamo=True)``, pinned explicitly. It is torch's default and maintained exporter
since 2.9 and builds the graph from ``torch.export``, the same program our ``model.pt2`` ships, so the two
artefacts agree op for op; the TorchScript-based path (``dynamo=False``) is deprecated with TorchScript itself
(torch 2.13 warns when it is used). The dynamo path needs ``onnxscript``, so the extra installs it too.

Opset ``ONNX_OPSET`` = 18: the lowest opset the dynamo exporter emits natively (no version conversion), and
one every runtime our users name reads (ONNX Runtime >= 1.14, OpenVINO, onnx2tf for TFLite). The batch
dimension is dynamic (``batch``); a model that pins its batch size is exported static, as the pt2 is.

ONNX Runtime sessions follow its documented CPU practice: all graph optimisations on (``ORT_ENABLE_ALL``:
Conv+BN folding, Conv+Add+Relu fusion), ``intra_op_num_threads`` as asked (a study's ``[export] threads``,
default 1) and one inter-op thread, sequential execution.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from slimsearch.core.errors import SlimError
from torch import nn

__all__ = [
    "ONNX_OPSET",
    "OrtProgram",
    "check_onnx",
    "identity_onnx_bytes",
    "layer_onnx_bytes",
    "onnx_bytes",
    "ort_session",
    "require_onnx",
    "write_onnx",
]

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "output"
EXTRA_HINT = "pip install 'slimsearch[onnx]'"


def require_onnx(what: str = "format 'onnx'") -> tuple[ModuleType, ModuleType]:
    """``(onnx, onnxruntime)``; a missing package of the extra is one ``SlimError`` line naming the fix."""
    missing = []
    mods = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            mods[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SlimError(f"{what} needs {', '.join(missing)} (the onnx extra): {EXTRA_HINT}")
    return mods["onnx"], mods["onnxruntime"]


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and warns about torchvision ops it skips: keep our logs readable."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """``model`` (eval mode) as a serialized ONNX model at ``ONNX_OPSET`` with a dynamic batch dimension (static
    when the model pins its batch size), traced at ``x``'s shape."""
    require_onnx()
    x2 = torch.cat([x[:1], x[:1]], dim=0)  # batch 2: a batch of 1 would be specialised to the constant 1
    kw = {"dynamo": True, "opset_version": ONNX_OPSET, "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
          "external_data": False, "verbose": False, "optimize": True}  # fmt: skip
    with _quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **kw)
        except Exception:  # the model pins its batch size somewhere: export it static
            program = torch.onnx.export(model, (x,), **kw)
    return program.model_proto.SerializeToString()


def write_onnx(model: nn.Module, x: torch.Tensor, path: str | Path) -> None:
    """Write ``onnx_bytes(model, x)`` to ``path`` (weights inside the file: one self-contained artefact)."""
    Path(path).write_bytes(onnx_bytes(model, x))


def ort_session(model: bytes | str | Path, threads: int = 1) -> object:
    """An ONNX Runtime CPU session of ``model`` (bytes or a path) with graph optimisations on and ``threads``
    intra-op threads (module docstring)."""
    _, ort = require_onnx("ONNX Runtime")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SlimError(f"ONNX Runtime: threads must be an integer >= 1, got {threads!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class OrtProgram:
    """An ONNX Runtime session called like a module: a float tensor in, a tensor out (what ``measure_latency``
    and the export checks call). ``threads`` is the session's, not torch's."""

    def __init__(self, session: object) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name  # type: ignore[attr-defined]

    @classmethod
    def of(cls, model: nn.Module, x: torch.Tensor, threads: int = 1) -> OrtProgram:
        return cls(ort_session(onnx_bytes(model, x), threads))

    def parameters(self) -> Iterator[nn.Parameter]:
        """None (the weights live in the session): ``measure_latency`` then feeds float32 CPU inputs."""
        return iter(())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])  # type: ignore[attr-defined]


def check_onnx(path: str | Path, x: torch.Tensor, y: torch.Tensor, atol: float = 1e-5, rel: float = 1e-5) -> float:
    """Check the file at ``path``: ``onnx.checker`` (full check, shapes inferred) and an ONNX Runtime run on ``x``
    that must match ``y`` within ``atol + rel x max|y|`` (ORT folds BN and fuses ops, which changes the float
    summation order by about the output's scale times float32 epsilon per layer). Returns the max difference;
    a failure is a ``RuntimeError``."""
    onnx, _ = require_onnx()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise RuntimeError(f"export: onnx.checker rejects {Path(path).name}: {str(e).splitlines()[0][:200]}") from None
    with torch.no_grad():
        got = OrtProgram(ort_session(Path(path)))(x)
    tol = atol + rel * float(y.abs().max())
    diff = float((got - y.cpu()).abs().max()) if got.shape == y.shape else float("inf")
    if not diff <= tol:
        raise RuntimeError(f"export: ONNX Runtime output differs from the model by {diff:.3g} (tolerance {tol:.3g})")
    return diff


def identity_onnx_bytes(shape: tuple[int, ...]) -> bytes:
    """An ONNX model that returns its input (batch dynamic): what a session call costs without any op."""
    onnx, _ = require_onnx("ONNX Runtime latency")
    from onnx import TensorProto, helper

    dims = ["batch", *shape[1:]]
    graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "call",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims)])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


def layer_onnx_bytes(module: nn.Module, shape: tuple[int, ...]) -> bytes | None:
    """A conv, a linear or a stack of convs (a decomposed layer) as an ONNX model built node by node with its
    weights, batch dynamic: what the dynamo exporter emits for it (Conv / Gemm / MatMul+Add), without the second
    its export takes, which a latency table pays for every layer shape. None for anything else (export it)."""
    onnx, _ = require_onnx("ONNX Runtime latency")
    from onnx import TensorProto, helper, numpy_helper

    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    linear = len(layers) == 1 and type(layers[0]) is nn.Linear
    if not linear and not all(type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                              for m in layers):  # fmt: skip
        return None
    nodes, inits = [], []
    cur = INPUT_NAME
    for i, m in enumerate(layers):
        w = numpy_helper.from_array(m.weight.detach().cpu().numpy().astype(np.float32), f"w{i}")
        inits.append(w)
        ins = [cur, f"w{i}"]
        out = OUTPUT_NAME if i == len(layers) - 1 else f"h{i}"
        if m.bias is not None:
            inits.append(numpy_helper.from_array(m.bias.detach().cpu().numpy().astype(np.float32), f"b{i}"))
        if linear and len(shape) == 2:
            nodes.append(helper.make_node("Gemm", ins + ([f"b{i}"] if m.bias is not None else []), [out], transB=1))
        elif linear:
            inits.append(numpy_helper.from_array(m.weight.detach().cpu().numpy().T.copy().astype(np.float32), "wt"))
            mm = out if m.bias is None else "mm"
            nodes.append(helper.make_node("MatMul", [cur, "wt"], [mm]))
            if m.bias is not None:
                nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out]))
        else:
            ph, pw = m.padding  # type: ignore[misc]
            nodes.append(helper.make_node("Conv", ins + ([f"b{i}"] if m.bias is not None else []), [out],
                                          kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                          pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups))  # fmt: skip
        cur = out
    dims = ["batch", *shape[1:]]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None)],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()
