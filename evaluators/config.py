"""``[evaluator]`` of a study file: how a candidate policy is scored."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.tables import build_checked, known_keys

KINDS = ("proxy", "finetune")
AMP_MODES = ("off", "bf16", "fp16")  # = core.device.AMP_MODES (not imported: reading a study file skips torch)
# Fields that do not change a result (where and how fast it is computed), left out of the cache key.
_NOT_IN_KEY = ("workers", "ray_address", "val_batch_size", "cpus_per_trial", "gpus_per_trial")
PER_GPU = "per-gpu"  # workers: one per visible GPU


@dataclass(frozen=True)
class EvaluatorConfig:
    """proxy: BN recalibration on ``bn_batches`` train batches, then val accuracy (no weight update).
    finetune: ``steps`` SGD steps (KD from the baseline when ``kd``), val accuracy every ``eval_every``
    steps reported to the search (0 = only at the end). ``amp``: autocast of the fine-tune's forward (bf16 /
    fp16 / off). ``workers``: a count or "per-gpu"; ``cpus_per_trial`` / ``gpus_per_trial`` (fractions pack
    trials on a GPU): the Ray resources of one trial (None = 0, or 1 when the study's device is cuda). Where
    trials run (the study's device, workers, resources) is not part of the result cache key; ``amp`` is."""

    kind: str = "proxy"
    steps: int = 100
    batch_size: int = 128
    lr: float = 0.01
    kd: bool = False
    bn_batches: int = 10
    eval_every: int = 0
    val_batch_size: int = 512
    measure_latency: bool = False
    latency_batch: int = 1
    seed: int = 0
    workers: int | str = 1
    ray_address: str | None = None
    amp: str = "off"
    cpus_per_trial: int = 1
    gpus_per_trial: float | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[evaluator]") -> None:
        """Raise ``SlimError`` naming the key when a value is wrong."""
        if self.kind not in KINDS:
            raise SlimError(f"{where} kind: unknown {self.kind!r}; allowed: {', '.join(KINDS)}")
        ints = {"steps": 1, "batch_size": 1, "bn_batches": 1, "eval_every": 0, "val_batch_size": 1,
                "latency_batch": 1, "seed": 0, "workers": 1, "cpus_per_trial": 1}  # fmt: skip
        if self.workers == PER_GPU:
            ints.pop("workers")
        for key, least in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                alt = f' or "{PER_GPU}"' if key == "workers" else ""
                raise SlimError(f"{where} {key}: expected an integer >= {least}{alt}, got {v!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise SlimError(f"{where} lr: expected a positive number, got {lr!r}")
        for key in ("kd", "measure_latency"):
            if not isinstance(getattr(self, key), bool):
                raise SlimError(f"{where} {key}: expected true or false, got {getattr(self, key)!r}")
        if self.amp not in AMP_MODES:
            raise SlimError(f"{where} amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        g = self.gpus_per_trial
        if g is not None and (
            isinstance(g, bool) or not isinstance(g, (int, float)) or not (0 <= g and math.isfinite(g))
        ):
            raise SlimError(f"{where} gpus_per_trial: expected a number >= 0 (0.25 packs 4 trials on a GPU), got {g!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise SlimError(f'{where} ray_address: expected a string such as "auto", got {self.ray_address!r}')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "[evaluator]") -> EvaluatorConfig:
        """Build from a TOML table; unknown keys and bad values raise ``SlimError`` naming them."""
        known_keys(d, cls, where)
        kw = dict(d)
        for key in ("lr", "gpus_per_trial"):
            if isinstance(kw.get(key), int) and not isinstance(kw.get(key), bool):
                kw[key] = float(kw[key])
        return build_checked(cls, kw, where)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def key(self) -> str:
        """Digest of the fields that change an evaluation's outcome (for the result cache)."""
        relevant = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        if relevant["amp"] == "off":  # the keys written before amp existed stay valid
            relevant.pop("amp")
        if self.kind == "proxy":  # fine-tune settings do not matter to the proxy
            for k in ("steps", "batch_size", "lr", "kd", "eval_every"):
                relevant.pop(k)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def worker_count(self, gpus: int) -> int:
        """Local worker processes: ``workers``, or with "per-gpu" one per visible GPU (``gpus``; at least one)."""
        return max(1, int(gpus)) if self.workers == PER_GPU else int(self.workers)
