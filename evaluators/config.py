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
# Fields that do not change a result (where and how fast it is computed), left out of the cache key.
_NOT_IN_KEY = ("workers", "ray_address", "val_batch_size")


@dataclass(frozen=True)
class EvaluatorConfig:
    """proxy: BN recalibration on ``bn_batches`` train batches, then val accuracy (no weight update).
    finetune: ``steps`` SGD steps (KD from the baseline when ``kd``), val accuracy every ``eval_every``
    steps reported to the search (0 = only at the end)."""

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
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[evaluator]") -> None:
        """Raise ``SlimError`` naming the key when a value is wrong."""
        if self.kind not in KINDS:
            raise SlimError(f"{where} kind: unknown {self.kind!r}; allowed: {', '.join(KINDS)}")
        ints = {"steps": 1, "batch_size": 1, "bn_batches": 1, "eval_every": 0, "val_batch_size": 1,
                "latency_batch": 1, "seed": 0, "workers": 1}  # fmt: skip
        for key, least in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise SlimError(f"{where} {key}: expected an integer >= {least}, got {v!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise SlimError(f"{where} lr: expected a positive number, got {lr!r}")
        for key in ("kd", "measure_latency"):
            if not isinstance(getattr(self, key), bool):
                raise SlimError(f"{where} {key}: expected true or false, got {getattr(self, key)!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise SlimError(f'{where} ray_address: expected a string such as "auto", got {self.ray_address!r}')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "[evaluator]") -> EvaluatorConfig:
        """Build from a TOML table; unknown keys and bad values raise ``SlimError`` naming them."""
        known_keys(d, cls, where)
        kw = dict(d)
        if isinstance(kw.get("lr"), int) and not isinstance(kw.get("lr"), bool):
            kw["lr"] = float(kw["lr"])
        return build_checked(cls, kw, where)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def key(self) -> str:
        """Digest of the fields that change an evaluation's outcome (for the result cache)."""
        relevant = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        if self.kind == "proxy":  # fine-tune settings do not matter to the proxy
            for k in ("steps", "batch_size", "lr", "kd", "eval_every"):
                relevant.pop(k)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
