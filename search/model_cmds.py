"""``slimsearch train`` and ``slimsearch cost``: commands on a model alone (no study). They import torch when
they run, so the CLI answers ``--help`` without it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from slimsearch.core.errors import SlimError


def cmd_train(a: argparse.Namespace) -> int:
    import time

    import torch
    from slimsearch.core.data import load_splits
    from slimsearch.core.models import build_model
    from slimsearch.core.train import FinetuneConfig, evaluate, finetune

    if a.epochs <= 0:
        raise SlimError("--epochs must be > 0")
    if a.root is not None and not a.root.exists():
        raise SlimError(f"--root: {a.root} does not exist")
    val_size: int | float = int(a.val_size) if a.val_size >= 1 else a.val_size
    if not val_size > 0:
        raise SlimError(f"--val-size must be a count >= 1 or a fraction in (0, 1), got {a.val_size}")
    if a.out.exists() and a.out.is_dir():
        raise SlimError(f"--out: {a.out} is a directory; give a checkpoint file name")
    if a.out.exists() and not _is_checkpoint(a.out):
        raise SlimError(
            f"--out: {a.out} exists and is not a checkpoint (it would be overwritten); give a new file name"
        )
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimError(f"--device {a.device}: CUDA is not available on this machine")
    splits = load_splits(a.data, a.root, val_size, a.seed)
    model = build_model(a.model, num_classes=a.num_classes or splits.train.num_classes,
                        in_channels=splits.train.in_channels, input_size=splits.train.image_size,
                        search_dir=Path.cwd()).to(a.device)  # fmt: skip
    cfg = FinetuneConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed)
    print(f"training {a.model} on {a.data} ({len(splits.train)} train / {len(splits.val)} val) for {a.epochs:g} epochs")
    t0 = time.perf_counter()
    finetune(model, splits.train, cfg, log=print, log_every=100)
    model.eval()
    val = evaluate(model, splits.val)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.{os.getpid()}.tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, a.out)
    test = f", test_acc {evaluate(model, splits.test):.4f}" if splits.test is not None else ""
    print(f"done in {time.perf_counter() - t0:.0f}s: val_acc {val:.4f}{test}; wrote {a.out}")
    return 0


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a state dict (an earlier ``train --out``, which may be replaced), loaded safely."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def _shape(text: str | None, model: Any, name: str) -> tuple[int, ...]:
    from torch import nn

    if text is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        c = first.in_channels if first is not None else 3
        size = 8 if name == "smallcnn" else 32
        return (1, c, size, size)
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise SlimError(f"--input-shape: expected C,H,W or N,C,H,W integers, got {text!r}") from None
    if len(dims) == 3:
        dims = (1, *dims)
    if len(dims) != 4 or min(dims) < 1:
        raise SlimError(f"--input-shape: expected C,H,W or N,C,H,W positive integers, got {text!r}")
    return (1, *dims[1:])


def cmd_cost(a: argparse.Namespace) -> int:
    import torch
    from slimsearch.core.cost import count_cost
    from slimsearch.core.models import build_model, load_checkpoint
    from slimsearch.core.program import looks_like_program

    if looks_like_program(a.model):
        return _cost_of_program(a)
    in_ch = None
    if a.input_shape:
        in_ch = _shape(a.input_shape, None, a.model)[1]
    model = build_model(a.model, num_classes=a.num_classes, in_channels=in_ch, search_dir=Path.cwd())
    if a.checkpoint is not None:
        load_checkpoint(model, a.checkpoint)
    shape = _shape(a.input_shape, model, a.model)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except Exception as e:
        raise SlimError(f"{a.model} fails on input {list(shape)}: {str(e).splitlines()[0][:200]}") from None
    cost = count_cost(model, shape)
    from slimsearch.core.latency import timed_program

    program = timed_program(model, getattr(a, "runtime", "eager"), threads=a.threads, input_shape=shape)
    _print_cost(a.model, program, shape, cost.macs, cost.params, a.threads, getattr(a, "runtime", "eager"))
    return 0


def _cost_of_program(a: argparse.Namespace) -> int:
    """``slimsearch cost FILE``: MACs, params and latency of an exported TorchScript / .pt2 program (.onnx:
    ``_cost_of_onnx``)."""
    import torch
    from slimsearch.core.cost import count_cost
    from slimsearch.core.program import load_program

    if a.checkpoint is not None:
        raise SlimError(f"--checkpoint applies to a model name, not to the exported file {a.model}")
    if Path(a.model).suffix.lower() == ".onnx":
        return _cost_of_onnx(a)
    prog = load_program(a.model)
    if a.input_shape:
        shape = _shape(a.input_shape, None, a.model)
    elif prog.input_shape is not None:
        shape = prog.input_shape
    else:
        raise SlimError(f"{a.model}: give --input-shape C,H,W (no manifest.json with an input shape next to it)")
    try:
        with torch.no_grad():
            prog.module(torch.zeros(shape))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlimError(f"{a.model} fails on input {list(shape)}: {first}") from None
    macs = count_cost(prog.module, shape).macs
    _print_cost(f"{a.model} ({prog.kind})", prog.module, shape, macs, prog.params, a.threads)
    return 0


def _cost_of_onnx(a: argparse.Namespace) -> int:
    """``slimsearch cost FILE.onnx``: MACs and params from the ONNX graph (``core.onnx_cost``), latency in an ONNX
    Runtime session with ``--threads`` intra-op threads."""
    import torch
    from slimsearch.core.onnx_cost import onnx_macs, read_onnx
    from slimsearch.core.onnx_export import OrtProgram, ort_session

    f = read_onnx(a.model)
    shape = _shape(a.input_shape, None, a.model) if a.input_shape else f.default_shape()
    if shape is None:
        raise SlimError(f"{a.model}: give --input-shape C,H,W (no manifest.json with an input shape next to it, and "
                        f"the model's input {list(f.input_dims)} has symbolic dims)")  # fmt: skip
    if not f.fits(shape):
        dims = ["batch" if d is None else d for d in f.input_dims]
        raise SlimError(f"{a.model}: input shape {list(shape)} does not fit the model's input {dims}")
    if not f.batch_dynamic and f.input_dims[0] != 1:
        raise SlimError(f"{a.model}: its batch is fixed at {f.input_dims[0]}; slimsearch cost measures batch 1 "
                        f"(export it with a dynamic batch)")  # fmt: skip
    macs = onnx_macs(f.proto, f.input_name, shape, where=a.model)
    program = OrtProgram(ort_session(f.path, a.threads))
    try:
        program(torch.zeros(shape))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlimError(f"{a.model} fails on input {list(shape)}: {first}") from None
    _print_cost(f"{a.model} (onnx)", program, shape, macs, f.params, a.threads, "onnxruntime",
                batch64=f.batch_dynamic)  # fmt: skip
    return 0


def _print_cost(
    name: str,
    model: Any,
    shape: tuple[int, ...],
    macs: int,
    params: int,
    threads: int,
    runtime: str = "",
    batch64: bool = True,
) -> None:
    """Print the cost lines; ``batch64`` False (a program whose batch is fixed at 1): latency at batch 1 only."""
    from slimsearch.core.cost import measure_latency

    lat1 = measure_latency(model, shape, batch_size=1, threads=threads)
    setting = f"{runtime + ', ' if runtime else ''}CPU, {threads} thread{'s' if threads > 1 else ''}, median"
    print(f"model   {name}   input {'x'.join(map(str, shape))}")
    print(f"MACs    {macs / 1e6:10.3f} M  ({macs:,} multiply-accumulates per image)")
    print(f"FLOPs   {2 * macs / 1e6:10.3f} M  (= 2 x MACs)")
    print(f"params  {params / 1e6:10.3f} M  ({params:,})")
    if not batch64:
        print(f"latency {lat1.median_ms:10.3f} ms at batch 1 ({setting}; the file's batch is fixed at 1)")
        return
    lat64 = measure_latency(model, shape, batch_size=64, threads=threads, repeats=5, warmup=1)
    print(f"latency {lat1.median_ms:10.3f} ms at batch 1,  {lat64.median_ms:.2f} ms at batch 64 "
          f"({lat64.median_ms / 64:.3f} ms/image; {setting})")  # fmt: skip
