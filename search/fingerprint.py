"""A study's fingerprint: everything that defines what one of its trials means.

A trial's parameters, metrics and feasibility mean something only under the space, constraint, evaluator,
data split, seeds and baseline it was run with. ``run`` stores the fingerprint in the study (Optuna: the
``fingerprint`` user attr; Ray: ``<name>-meta.json``) and refuses to resume a study whose study file now
gives another one (``check``), naming the keys that differ. What only says how much or how fast to search
(``n_trials``, ``timeout``, worker counts, sampler, storage, export settings) is not in it and may change.

Values are canonical JSON strings, so a fingerprint survives a round trip through any storage unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.search.study import StudyConfig

ATTR = "fingerprint"  # Optuna study user attr / Ray meta key
# [evaluator] keys that say how to run, not what a trial measures.
EVALUATOR_RUN_KEYS = ("workers", "ray_address", "val_batch_size", "cpus_per_trial", "gpus_per_trial")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def _fields(obj: Any) -> dict[str, Any]:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return dict(obj) if isinstance(obj, Mapping) else {}


def config_fingerprint(cfg: StudyConfig) -> dict[str, str]:
    """The keys of the study file that define a trial's meaning, as ``"[section] key" -> canonical JSON``."""
    out: dict[str, str] = {
        "[study] objectives": _canon([o.spec for o in cfg.study.objectives]),
        "[study] seed": _canon(cfg.study.seed),
    }
    m = cfg.model
    for key in ("factory", "num_classes", "in_channels", "input_size"):
        out[f"[model] {key}"] = _canon(getattr(m, key))
    d = cfg.data
    for key in ("dataset", "val_size", "seed"):
        out[f"[data] {key}"] = _canon(getattr(d, key))
    for key, value in _fields(cfg.constraint).items():
        out[f"[constraint] {key}"] = _canon(value)
    if cfg.constraint.max_latency_ratio is not None:  # the layout the latency bound predicts for
        out["[export] memory_format"] = _canon(cfg.export.memory_format)
    for key, value in _fields(cfg.space).items():
        out[f"[space] {key}"] = _canon(value)
    for key, value in _fields(cfg.evaluator).items():
        if key not in EVALUATOR_RUN_KEYS:
            out[f"[evaluator] {key}"] = _canon(value)
    s = cfg.seeds
    out["[seeds] strategies"] = _canon(list(s.strategies))
    out["[seeds] params"] = _canon({k: dict(v) for k, v in s.params.items()})
    out["[seeds] budget"] = _canon(s.budget)
    return out


def built_fingerprint(baseline_sha: str, sizes: Mapping[str, int]) -> dict[str, str]:
    """The keys known once the study context is built: the baseline's weights and the data split's sizes
    (the same study file over other files in ``[data] root`` is another study)."""
    return {"baseline weights": _canon(baseline_sha), "[data] split": _canon(dict(sizes))}


def split_sizes(splits: Any) -> dict[str, int]:
    """Train/val/test sizes and the class count of ``core.data`` splits."""
    test = getattr(splits, "test", None)
    return {
        "train": len(splits.train),
        "val": len(splits.val),
        "test": 0 if test is None else len(test),
        "classes": int(splits.train.num_classes),
    }


def differing(stored: Mapping[str, Any], current: Mapping[str, str]) -> list[str]:
    """Keys present in both whose values differ (a key one side lacks, e.g. from an older version, is skipped)."""
    return [k for k in current if k in stored and stored[k] != current[k]]


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def check(stored: Mapping[str, Any] | None, current: Mapping[str, str], name: str, where: str) -> None:
    """Refuse (``SlimError``, one line) when ``stored`` (None: an older study without one) and ``current``
    differ in any key: name the keys and the two ways out."""
    if not isinstance(stored, Mapping):
        return
    keys = differing(stored, current)
    if not keys:
        return
    shown = "; ".join(f"{k} {_short(str(stored[k]))} -> {_short(current[k])}" for k in keys[:4])
    more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
    raise SlimError(
        f"{where}: study {name!r} was run with a different study file: {shown}{more}; its trials would mean "
        f"something else. Give a new [study] name to start a new study, or revert the change to resume this one "
        f"(n_trials, timeout and worker counts may change)"
    )


def of_study(cfg: StudyConfig, sctx: Any) -> dict[str, str]:
    """The whole fingerprint of a built study (``search.context.StudyContext``): its study file's keys, the
    baseline's weights and the data split's sizes."""
    return {**config_fingerprint(cfg), **built_fingerprint(sctx.baseline_sha, split_sizes(sctx.splits))}


def check_config(stored: Mapping[str, Any] | None, cfg: StudyConfig, current: Mapping[str, str] | None = None) -> None:
    """``check`` of ``stored`` against ``current`` (default: the study file's keys alone, known before anything
    is built), naming ``cfg``'s study and file."""
    check(stored, config_fingerprint(cfg) if current is None else current, cfg.name, str(cfg.path))
