"""EvalContext: what every evaluation of one study shares (baseline model, data, cost bound)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from slimsearch.core.cost import Cost, count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.export import MEMORY_FORMATS
from slimsearch.core.schema import check_value
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.config import CONSTRAINT_KEYS
from torch import nn


@dataclass
class EvalContext:
    """Baseline ``model`` (eval mode, never modified), ``splits`` (train/val/test; search scores on
    val), ``input_shape`` with batch dim, baseline ``base`` cost, absolute ``max_macs`` bound (None =
    unconstrained), baseline val accuracy, the ``cache`` of results (in memory by default), and the latency
    bound: predicted latency (``core.latency``) at ``latency_batch`` at most ``max_latency_ratio`` of the
    baseline's (None = unconstrained), timed with conv weights in ``latency_memory_format`` (the export's)."""

    model: nn.Module
    splits: Any  # core.data.DataSplits
    input_shape: tuple[int, ...]
    base: Cost
    max_macs: float | None = None
    base_val_acc: float | None = None
    cache: ResultCache | None = field(default_factory=ResultCache)
    max_latency_ratio: float | None = None
    latency_batch: int = 1
    latency_dir: Path | None = None
    latency_memory_format: str = "contiguous"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where trials train and score
    latency_runtime: str = "torchscript"  # core.latency.RUNTIMES: what the table, the bound and latency_ms time
    latency_threads: int = 1
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _teacher: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """Digest of the baseline weights, the train/val data, the input shape and the bounds, so a
        persistent result cache never serves results of another model, dataset or constraint."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                h.update(name.encode())
                h.update(_tensor_bytes(t))
            for part in ("train", "val"):
                ds = getattr(self.splits, part)
                h.update(_tensor_bytes(ds.x))
                h.update(_tensor_bytes(ds.y))
            bounds: tuple = (self.input_shape, self.max_macs)
            if self.max_latency_ratio is not None:
                bounds += (self.max_latency_ratio, self.latency_batch)
                if self.latency_memory_format != "contiguous":  # contiguous: the fingerprints stored before it
                    bounds += (self.latency_memory_format,)
                if (self.latency_runtime, self.latency_threads) != ("torchscript", 1):  # likewise
                    bounds += (self.latency_runtime, self.latency_threads)
            h.update(repr(bounds).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def teacher(self) -> nn.Module:
        """The baseline on ``device`` (the KD teacher): ``model`` itself on the CPU, else one copy made once.
        ``model`` stays on the CPU, where policies are applied and costs and latencies measured."""
        if self.device.type == "cpu" or _model_device(self.model) == self.device:
            return self.model
        if self._teacher is None:
            import copy

            self._teacher = copy.deepcopy(self.model).to(self.device).eval()
        return self._teacher

    def latency_table(self) -> Any:
        """The baseline's latency table at ``latency_batch`` (``core.latency``), stored in ``latency_dir`` when
        set, so every process of a study predicts from the same measurements."""
        from slimsearch.core.latency import latency_table

        return latency_table(self.model, self.input_shape, self.latency_batch, threads=self.latency_threads,
                             mode=self.latency_runtime, folder=self.latency_dir,
                             memory_format=self.latency_memory_format)  # fmt: skip


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return str(t.dtype).encode() + repr(tuple(t.shape)).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def build_context(
    model: nn.Module,
    splits: Any,
    input_shape: Sequence[int],
    *,
    max_macs_ratio: float | None = None,
    max_macs: float | None = None,
    score_baseline: bool = True,
    cache: ResultCache | str | Path | None = None,
    max_latency_ratio: float | None = None,
    latency_batch: int = 1,
    latency_dir: str | Path | None = None,
    latency_memory_format: str = "contiguous",
    device: torch.device | str | None = None,
    latency_runtime: str = "torchscript",
    latency_threads: int = 1,
) -> EvalContext:
    """Measure the baseline and fix the MACs bound: ``max_macs`` (absolute) or ``max_macs_ratio`` of the
    baseline (at most one), and the latency bound ``max_latency_ratio`` of the baseline's predicted latency
    at ``latency_batch`` (its table stored in ``latency_dir``, timed in ``latency_memory_format``). ``device``: where
    trials train and score (default: ``model``'s device; a study keeps ``model`` on the CPU and names the device). ``score_baseline`` records the baseline's val accuracy. ``cache``: a ResultCache,
    or a path for a persistent one (``*.jsonl`` file or a directory)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if max_macs is not None and max_macs_ratio is not None:
        raise SlimError("[constraint]: give max_macs_ratio or max_macs, not both")
    given = {"max_macs_ratio": max_macs_ratio, "max_macs": max_macs, "max_latency_ratio": max_latency_ratio,
             "latency_batch": latency_batch}  # fmt: skip
    for key in CONSTRAINT_KEYS:  # the study file's [constraint] table (a study file is checked by it already)
        if key.name in given:
            check_value(key, given[key.name], "[constraint]")
    if latency_memory_format not in MEMORY_FORMATS:
        raise SlimError(f"[export] memory_format: expected one of {', '.join(MEMORY_FORMATS)}, got "
                        f"{latency_memory_format!r}")  # fmt: skip
    from slimsearch.core.latency import RUNTIMES

    if latency_runtime not in RUNTIMES:
        raise SlimError(f"[export] runtime: expected one of {', '.join(RUNTIMES)}, got {latency_runtime!r}")
    if isinstance(latency_threads, bool) or not isinstance(latency_threads, int) or latency_threads < 1:
        raise SlimError(f"[export] threads: expected an integer >= 1, got {latency_threads!r}")
    if latency_runtime == "onnxruntime":
        from slimsearch.core.onnx_export import require_onnx

        require_onnx("[export] runtime = 'onnxruntime'")
    model.eval()
    base = count_cost(model, shape)
    bound = float(max_macs) if max_macs is not None else None
    if max_macs_ratio is not None:
        bound = float(max_macs_ratio) * base.macs
    if not isinstance(cache, ResultCache):
        cache = ResultCache(cache)
    lat = float(max_latency_ratio) if max_latency_ratio is not None else None
    folder = Path(latency_dir) if latency_dir is not None else None
    ctx = EvalContext(model, splits, shape, base, bound, None, cache, lat, latency_batch, folder,
                      latency_memory_format, torch.device(device) if device is not None else _model_device(model),
                      latency_runtime, latency_threads)  # fmt: skip
    if score_baseline:
        from slimsearch.core.train import evaluate

        ctx.base_val_acc = evaluate(ctx.teacher(), splits.val)  # the baseline on the trials' device
    return ctx
