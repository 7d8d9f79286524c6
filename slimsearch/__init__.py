"""slimsearch: search per-layer CNN compression policies (pruning, clustering, CP/Tucker) under a MACs or
latency bound, with Optuna or Ray Tune.

The Python API is a thin layer over what the command line runs::

    import slimsearch

    cfg = slimsearch.load_study("studies/quickstart.toml")       # or a dict, and model=/data= objects
    summary = slimsearch.run_study(cfg)                           # = slimsearch run
    result = slimsearch.export_trial(cfg, "best")                 # = slimsearch export --trial best
    small = slimsearch.apply_policy(net, policy, input_shape=(1, 3, 32, 32))
    print(slimsearch.count_cost(small, (1, 3, 32, 32)).macs)

Names are imported on first use, so ``import slimsearch`` does not import torch. The repository keeps its
four rooms at the top level (core <- spaces <- evaluators <- search); the installed distribution maps them
under this one package: ``slimsearch.core``, ``slimsearch.spaces``, ``slimsearch.evaluators`` and
``slimsearch.search``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.core.apply import apply_policy
    from slimsearch.core.cost import Cost, count_cost
    from slimsearch.core.data import Dataset, DataSplits, load_splits
    from slimsearch.core.errors import SlimError
    from slimsearch.core.policy import LayerPolicy, Policy
    from slimsearch.search.export import ExportResult
    from slimsearch.search.study import StudyConfig

__all__ = [
    "Cost",
    "DataSplits",
    "Dataset",
    "LayerPolicy",
    "Policy",
    "SlimError",
    "StudyConfig",
    "__version__",
    "apply_policy",
    "count_cost",
    "export_trial",
    "load_splits",
    "load_study",
    "run_study",
]

# name -> module it lives in; imported on first attribute access (PEP 562).
_LAZY = {
    "apply_policy": "slimsearch.core.apply",
    "Cost": "slimsearch.core.cost",
    "count_cost": "slimsearch.core.cost",
    "Dataset": "slimsearch.core.data",
    "DataSplits": "slimsearch.core.data",
    "load_splits": "slimsearch.core.data",
    "SlimError": "slimsearch.core.errors",
    "LayerPolicy": "slimsearch.core.policy",
    "Policy": "slimsearch.core.policy",
    "StudyConfig": "slimsearch.search.study",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _splits(data: Any) -> DataSplits:
    """``data`` as ``DataSplits``: given as such, or as (train, val) / (train, val, test) ``Dataset``s."""
    from slimsearch.core.data import Dataset, DataSplits
    from slimsearch.core.errors import SlimError

    if isinstance(data, DataSplits):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(d, Dataset) for d in data):
        return DataSplits(data[0], data[1], data[2] if len(data) == 3 else None)
    raise SlimError(
        "data must be a slimsearch.DataSplits or a (train, val[, test]) tuple of slimsearch.Dataset, got "
        f"{type(data).__name__}"
    )


def load_study(study: str | Path | Mapping[str, Any], *, model: nn.Module | None = None,
               data: DataSplits | Sequence[Dataset] | None = None) -> StudyConfig:  # fmt: skip
    """Read and validate a study: a TOML file path, or the same tables as a dict (``{"study": {...}, ...}``).

    ``model``: an ``nn.Module`` to compress instead of ``[model] factory``/``checkpoint`` (then ``[model]`` is
    optional): its weights are the baseline, or the start of ``[model] pretrain_epochs`` of training; it is
    copied, never changed. ``data``: ``DataSplits`` (or a ``(train, val[, test])`` tuple of ``Dataset``, uint8
    N x C x H x W images) instead of ``[data] dataset``. Such objects live in this process: ``run_study``
    evaluates in it (one worker) and backend ray needs import paths. Bad input raises ``SlimError``.
    """
    from slimsearch.core.errors import SlimError
    from slimsearch.search.study import parse_toml, study_from_dict

    if model is not None:
        from torch import nn

        if not isinstance(model, nn.Module):
            raise SlimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    splits = None if data is None else _splits(data)
    if isinstance(study, Mapping):
        return study_from_dict(study, "<dict>", module=model, splits=splits)
    return study_from_dict(parse_toml(study), study, module=model, splits=splits)


def _in_memory(cfg: StudyConfig) -> bool:
    return cfg.model.module is not None or cfg.data.splits is not None


def run_study(cfg: StudyConfig, *, workers: int | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, ray_address: str | None = None) -> Any:  # fmt: skip
    """Create or resume ``cfg``'s study and run it to ``[study] n_trials`` (``slimsearch run``); returns the run's
    summary (``counted``, ``n_trials``, ``best``: the best feasible trial's numbers, ``wall_s``, ``done``).

    ``workers``: evaluating processes (default ``[evaluator] workers``); ``ray_address``: a Ray cluster
    (backend ray). A study with an in-memory model or data runs in this process.
    """
    from slimsearch.core.errors import SlimError
    from slimsearch.search.backend import OptunaBackend, backend_for

    backend = backend_for(cfg, ray_address=ray_address, to_run=True)
    if _in_memory(cfg):
        if not isinstance(backend, OptunaBackend):
            raise SlimError("an in-memory model or data cannot go to Ray workers: give [model] factory and "
                            "[data] dataset instead")  # fmt: skip
        if workers not in (None, 1):
            raise SlimError(
                f"an in-memory model or data is evaluated in this process: workers must be 1, got {workers}"
            )
        workers = 1
    return backend.run(workers=workers, progress=progress, log=log)


def export_trial(cfg: StudyConfig, trial: str | int = "best", *, formats: Sequence[str] | None = None,
                 out: str | Path | None = None, finetune_epochs: float | None = None, top_k: int | None = None,
                 max_macs: float | None = None, log: Callable[[str], None] | None = None) -> ExportResult:  # fmt: skip
    """Export ``trial`` (``"best"`` or a trial number) as ``slimsearch export`` does: rebuild its policy on the
    baseline, fine-tune it (``[export] finetune_epochs`` unless given), write the programs and ``metrics.json``.

    Returns the trial number, output folder, files by format and the metrics (``val_acc``, ``test_acc``,
    ``macs``, ``macs_ratio``, ``params``, speed-up). Defaults come from ``[export]``.
    """
    from slimsearch.search.export import export_trial as export

    return export(cfg, trial, formats, out, finetune_epochs, max_macs, top_k=top_k, log=log)
