"""An exported file (TorchScript, frozen TorchScript, ``torch.export`` .pt2) as a module that ``core.cost`` can
count and time, so ``slimsearch cost`` measures what was exported: the program a user deploys.

Parameters: a TorchScript program's parameters; a frozen one has none (``torch.jit.freeze`` inlines the weights,
BN folded), so its tensor constants are counted instead; a .pt2 program's parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from slimsearch.core.errors import SlimError
from torch import nn

PROGRAM_SUFFIXES = (".pt2", ".pt", ".pth", ".torchscript", ".onnx")


class ProgramModule(nn.Module):
    """Calls a loaded program. The program is not a submodule: a .pt2 module refuses ``eval()``, and a
    TorchScript program keeps the mode it was exported in (eval)."""

    def __init__(self, program: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["program"] = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


@dataclass(frozen=True)
class LoadedProgram:
    module: ProgramModule
    kind: str  # "torchscript", "torchscript-frozen" or "pt2"
    params: int
    input_shape: tuple[int, ...] | None  # (1, C, H, W) from the export's manifest.json, when next to the file


def looks_like_program(text: str) -> bool:
    """Whether a ``slimsearch cost`` model argument names an exported file rather than a zoo name or factory."""
    return Path(text).suffix.lower() in PROGRAM_SUFFIXES or Path(text).is_file()


def _constants(graph: torch.Graph) -> int:
    n = 0
    for node in graph.findAllNodes("prim::Constant"):
        if node.output().type().kind() == "TensorType":
            n += node.t("value").numel()
    return n


def manifest_shape(path: Path) -> tuple[int, ...] | None:
    """``(1, C, H, W)`` from the ``manifest.json`` an export writes next to ``path``; None without one."""
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        shape = manifest.get("input_shape")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape):
        return (1, *shape[1:])
    return None


def load_program(path: str | Path) -> LoadedProgram:
    """Load a TorchScript or .pt2 file (``SlimError`` naming the file otherwise: a state dict, ONNX, junk). ONNX files
    are measured by ``core.onnx_cost``."""
    p = Path(path)
    if not p.is_file():
        raise SlimError(f"exported model not found: {p}")
    if p.suffix.lower() == ".onnx":
        raise SlimError(f"{p}: an ONNX file is not a torch program; read it with slimsearch.core.onnx_cost.read_onnx")
    if p.suffix.lower() == ".pt2":
        try:
            program = torch.export.load(str(p)).module()
        except Exception as e:
            raise SlimError(f"{p} is not a readable torch.export program ({type(e).__name__})") from None
        return LoadedProgram(ProgramModule(program), "pt2", sum(t.numel() for t in program.parameters()),
                             manifest_shape(p))  # fmt: skip
    try:
        script = torch.jit.load(str(p), map_location="cpu")
    except Exception:
        raise SlimError(f"{p} is neither a TorchScript program nor a .pt2 file (a state dict needs its architecture: "
                        "measure the model by name with --checkpoint)") from None  # fmt: skip
    params = sum(t.numel() for t in script.parameters())
    kind = "torchscript"
    if params == 0:
        params, kind = _constants(script.graph), "torchscript-frozen"
    return LoadedProgram(ProgramModule(script), kind, params, manifest_shape(p))
