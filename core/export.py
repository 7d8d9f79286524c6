"""Export a compressed model: TorchScript, torch.export (.pt2), state dict + policy/metrics JSON.

Layout of an export directory (written to a temporary sibling and renamed into place, so a reader never
sees a half-written export; an earlier export is replaced only after the new one is complete, and a folder
holding anything an export does not write is refused, never replaced; the folder gets the user's umask):

- ``model.torchscript.pt`` — TorchScript (``torch.jit.script``, falling back to ``torch.jit.trace``).
  Self-contained: ``torch.jit.load`` needs only torch, not slimsearch.
- ``model.frozen.torchscript.pt`` (format ``torchscript-frozen``, on request) — the TorchScript program frozen for
  inference (``torch.jit.freeze``): BatchNorm folded into the preceding convs, weights inlined as constants.
  Faster on a CPU (no BN ops; measured in ``benchmarks/bench_apply.py``) and a little smaller; it has no
  parameters, so it cannot be fine-tuned further (use ``model.pt`` for that). Self-contained like the above.
- ``model.pt2`` — ``torch.export`` program with a dynamic batch dimension where the model allows it.
  Self-contained: ``torch.export.load(p).module()``.
- ``model.onnx`` (format ``onnx``, the ``slimsearch[onnx]`` extra) — ONNX, opset 18, dynamic batch, written by
  ``torch.onnx.export``'s dynamo path (``core.onnx_export`` says why), checked with ``onnx.checker`` and an ONNX
  Runtime run. Self-contained: needs only ``onnxruntime`` (or OpenVINO, TensorRT, onnx2tf for TFLite).
- ``model.pt`` — the state dict. NOT self-contained: a pruned/decomposed model's shapes differ from the
  zoo model's, so rebuild the architecture first: ``load_state(base_model, dir)`` re-applies
  ``policy.json`` to the base model (same architecture and original weights, which fix the EVBMF ranks
  and hence the shapes) and loads ``model.pt`` into it.
- ``policy.json``, ``metrics.json``, ``manifest.json`` (files, input shape, torch version, the input
  pipeline under ``preprocessing``: channel order, size, mean/std, class names, dataset, and ``deploy``: which
  file to ship to which runtime) and
  ``check.pt`` (an input and the expected output, used to verify reloads).

Every exported program is reloaded and compared with the model's own output before the directory is
published; a mismatch above ``atol`` is a ``RuntimeError``.

``memory_format="channels_last"`` stores the TorchScript programs' conv weights NHWC. The programs still take
ordinary (NCHW) inputs, but PyTorch's CPU convolutions (oneDNN) then run NHWC end to end. Neither layout wins
everywhere (``benchmarks/results/memory_format.md``, a 2-core AVX-512 machine): NHWC ran the unpruned CIFAR
ResNets 1.04-1.12x faster at batch 1 and 1.05-1.80x at batch 64, but ResNets pruned by a search (odd channel
counts, Tucker/CP stacks) 1.2-1.6x slower at batch 1 while still faster at batch 64; a study's
``[export] memory_format = "auto"`` times both and exports the faster. The pt2
program and the state dict stay contiguous: ``torch.export.save`` warns on NHWC weights (torch 2.13), and a
``torch.export`` program's layout is the compiler's choice downstream anyway.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import example_input_for
from slimsearch.core.policy import Policy
from torch import nn

__all__ = [
    "DEFAULT_FORMATS",
    "DEPLOY",
    "FILES",
    "FORMATS",
    "MEMORY_FORMATS",
    "export_model",
    "out_dir_problem",
    "load_exported",
    "load_state",
    "deploy_map",
    "torchscript_program",
]

FORMATS = ("pt2", "onnx", "torchscript", "torchscript-frozen", "state")
DEFAULT_FORMATS = ("pt2", "torchscript", "state")
FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "torchscript-frozen": "model.frozen.torchscript.pt",
    "pt2": "model.pt2",
    "state": "model.pt",
}
# manifest.json "deploy": runtime -> (format, how to load it); the first written format of each runtime's list wins.
DEPLOY = {
    "pytorch": (("pt2", "torch.export.load(f).module(); also AOTInductor / ExecuTorch"),),
    "onnxruntime": (("onnx", "onnxruntime.InferenceSession(f); also OpenVINO, TensorRT, onnx2tf for TFLite"),),
    "libtorch": (("torchscript-frozen", "torch.jit.load(f), inference only"), ("torchscript", "torch.jit.load(f)")),
    "finetune": (("state", "slimsearch.core.export.load_state(base_model, export_dir)"),),
}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def torchscript_program(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int] | None = None,
    *,
    frozen: bool = False,
    memory_format: str = "contiguous",
) -> torch.jit.ScriptModule:
    """The TorchScript program ``export_model`` writes for ``model`` (a copy in eval mode; ``frozen``: BN folded,
    no parameters; ``memory_format``: its conv weights' layout), in memory: what a caller times or runs without
    the files."""
    if memory_format not in MEMORY_FORMATS:
        raise SlimError(f"export: unknown memory_format {memory_format!r}; allowed: {', '.join(MEMORY_FORMATS)}")
    m = copy.deepcopy(model).eval().to(memory_format=MEMORY_FORMATS[memory_format])
    try:
        program = torch.jit.script(m)
    except Exception:  # scripting rejects much ordinary Python; a trace is fine for feed-forward CNNs
        program = torch.jit.trace(m, example_input_for(m, example_input), check_trace=False)
    if frozen:
        program = torch.jit.freeze(program)  # eval mode: folds BN into the convs
    return program


def _to_pt2(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    x2 = torch.cat([x[:1], x[:1]], dim=0)  # batch 2: a batch of 1 would be specialised to the constant 1
    try:
        program = torch.export.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception:  # the model pins its batch size somewhere: export it static
        program = torch.export.export(model, (x,))
    torch.export.save(program, str(path))


def _check(
    name: str, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, atol: float
) -> None:
    with torch.no_grad():
        got = run(x)
    if not torch.allclose(got, y, atol=atol, rtol=0):
        raise RuntimeError(f"export: reloaded {name} differs from the model by {float((got - y).abs().max()):.3g}")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=lambda v: v.item() if hasattr(v, "item") else str(v))


# Every name an export writes into its folder; an existing folder is replaced only if it holds nothing else.
WRITTEN = (*FILES.values(), "check.pt", "policy.json", "metrics.json", "manifest.json")


def out_dir_problem(out: Path, also: Sequence[str] = (), what: str = "an earlier export") -> str | None:
    """Why ``out`` may not receive an export, or None: it is new, empty, or an earlier export (a
    ``manifest.json`` and only names an export writes, plus ``also``). An export replaces such a folder
    as a whole, so it must never hold anything the user put there."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    foreign = sorted(names - {*WRITTEN, *also})
    if "manifest.json" not in names or foreign:
        shown = f" (it holds {foreign[0]!r})" if foreign else ""
        return (f"{out} is a non-empty folder that is not {what}{shown}; it would be replaced as a whole, so "
                "give a new or empty folder")  # fmt: skip
    return None


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _publish(tmp: Path, out: Path, also: Sequence[str] = ()) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing an earlier export only at the end (and
    nothing else: ``out_dir_problem``). The folder gets the user's normal permissions (mkdtemp makes 0700)."""
    os.chmod(tmp, 0o777 & ~_umask())
    problem = out_dir_problem(out, also)
    if problem:
        raise SlimError(f"export: {problem}")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    model: nn.Module,
    policy: Policy | None,
    out_dir: str | Path,
    formats: Sequence[str] = DEFAULT_FORMATS,
    example_input: torch.Tensor | Sequence[int] | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    atol: float = 1e-5,
    memory_format: str = "contiguous",
    preprocessing: Mapping[str, Any] | None = None,
    also: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``model`` in ``formats`` (pt2, onnx, torchscript, torchscript-frozen, state; by default pt2,
    torchscript, state) plus policy/metrics/manifest JSON to ``out_dir`` atomically; return format -> file path. ``model`` is
    not modified (a copy is exported in eval mode). ``example_input`` (tensor or shape, batch first) defaults to 1×C×32×32.
    ``memory_format`` (``MEMORY_FORMATS``): how the TorchScript programs lay out their weights (module docstring).
    ``preprocessing`` (``core.preprocess.preprocessing``): how to feed the programs an image, kept in the manifest.
    An existing ``out_dir`` must be empty or an earlier export (``out_dir_problem``; ``also``: further names
    the caller writes there, e.g. a method's report.json): it is checked before any work."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SlimError(f"export: unknown format {bad[0] if bad else '(none)'!r}; allowed: {', '.join(FORMATS)}")
    if memory_format not in MEMORY_FORMATS:
        raise SlimError(f"export: unknown memory_format {memory_format!r}; allowed: {', '.join(MEMORY_FORMATS)}")
    if "onnx" in formats:  # the optional extra: say so before any work
        from slimsearch.core.onnx_export import require_onnx

        require_onnx()
    out = Path(out_dir)
    problem = out_dir_problem(out, also)
    if problem:
        raise SlimError(f"export: {problem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).eval()
    x = example_input_for(m, example_input)
    with torch.no_grad():
        y = m(x)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written: dict[str, Path] = {}
        for fmt in dict.fromkeys(formats):
            path = tmp / FILES[fmt]
            if fmt in ("torchscript", "torchscript-frozen"):
                frozen = fmt == "torchscript-frozen"
                torchscript_program(m, x, frozen=frozen, memory_format=memory_format).save(str(path))
                # Folding BN and NHWC kernels change the float summation order: allow that relative to the
                # output's scale (an NHWC ResNet-20 with logits ~10 differed by 1.1e-5).
                reordered = frozen or memory_format != "contiguous"
                tol = atol + 1e-6 * float(y.abs().max()) if reordered else atol
                _check(fmt, torch.jit.load(str(path)), x, y, tol)
            elif fmt == "onnx":
                from slimsearch.core.onnx_export import check_onnx, write_onnx

                write_onnx(m, x, path)
                check_onnx(path, x, y, atol)
            elif fmt == "pt2":
                _to_pt2(m, x, path)
                _check(fmt, torch.export.load(str(path)).module(), x, y, atol)
            else:
                torch.save(m.state_dict(), path)
            written[fmt] = out / FILES[fmt]
        torch.save({"input": x.cpu(), "output": y.detach().cpu()}, tmp / "check.pt")
        (tmp / "policy.json").write_text((policy or Policy()).to_json(indent=2) + "\n")
        (tmp / "metrics.json").write_text(_json(dict(metrics or {})) + "\n")
        manifest = {
            "files": {f: FILES[f] for f in written},
            "input_shape": list(x.shape),
            "memory_format": memory_format,
            "policy_hash": (policy or Policy()).hash,
            "torch": torch.__version__,
            "self_contained": [f for f in written if f != "state"],
            "deploy": deploy_map(written),
        }
        if preprocessing is not None:
            manifest["preprocessing"] = dict(preprocessing)
        (tmp / "manifest.json").write_text(_json(manifest) + "\n")
        _publish(tmp, out, also)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def deploy_map(written: Mapping[str, object]) -> dict[str, dict[str, str]]:
    """Which written file to ship to which runtime (``DEPLOY``), for the manifest."""
    out: dict[str, dict[str, str]] = {}
    for runtime, choices in DEPLOY.items():
        for fmt, how in choices:
            if fmt in written:
                out[runtime] = {"file": FILES[fmt], "format": fmt, "load": how}
                break
    return out


def load_exported(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a self-contained export: a ``.pt2`` file, a TorchScript file, or an export directory
    (TorchScript preferred, then frozen TorchScript, then pt2). A state dict alone cannot be loaded: see
    ``load_state``."""
    p = Path(path)
    if p.is_dir():
        for fmt in ("torchscript", "torchscript-frozen", "pt2"):
            if (p / FILES[fmt]).is_file():
                return load_exported(p / FILES[fmt])
        raise SlimError(f"export directory {p} holds no TorchScript or pt2 model; for model.pt use load_state()")
    if not p.is_file():
        raise SlimError(f"exported model not found: {p}")
    if p.suffix == ".onnx":
        from slimsearch.core.onnx_export import OrtProgram, ort_session

        return OrtProgram(ort_session(p))
    if p.suffix == ".pt2":
        try:
            return torch.export.load(str(p)).module()
        except Exception as e:
            raise SlimError(f"{p} is not a readable torch.export program: {type(e).__name__}") from None
    try:
        return torch.jit.load(str(p), map_location="cpu")
    except Exception:
        raise SlimError(
            f"{p} is not a TorchScript model (a state dict needs its architecture: use load_state)"
        ) from None


def load_state(
    base_model: nn.Module, export_dir: str | Path, *, example_input: torch.Tensor | Sequence[int] | None = None
) -> nn.Module:
    """Rebuild an exported model from its state dict: apply ``policy.json`` to ``base_model`` (the model
    the policy was applied to, with its original weights) and load ``model.pt`` (``weights_only=True``)."""
    from slimsearch.core.apply import apply_policy  # apply imports the heavy graph machinery; export needs it only here

    d = Path(export_dir)
    for f in ("policy.json", FILES["state"]):
        if not (d / f).is_file():
            raise SlimError(f"export directory {d} has no {f}")
    policy = Policy.from_json((d / "policy.json").read_text(), where=str(d / "policy.json"))
    if isinstance(example_input, torch.Tensor):
        model = apply_policy(base_model, policy, example_input=example_input)
    else:
        model = apply_policy(base_model, policy, input_shape=example_input)
    state = torch.load(d / FILES["state"], map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise SlimError(f"{d / FILES['state']} does not fit the rebuilt model (wrong base model?): {first}") from None
    return model.eval()
