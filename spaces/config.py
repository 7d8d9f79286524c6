"""``[space]`` of a study file: which layers are searched and over which values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import CRITERIA, DECOMPOSITIONS
from slimsearch.core.tables import build_checked, known_keys

# "mask" needs explicit keep indices (the GA's output), which a sampler cannot propose.
SEARCHABLE_CRITERIA = tuple(c for c in CRITERIA if c != "mask")


@dataclass(frozen=True)
class SpaceConfig:
    """Ranges and choices of the per-layer search space.

    ``include``/``exclude`` are fnmatch patterns on conv layer names; ``monotone`` makes prune
    rates non-decreasing with depth; ``rate_step`` quantises rates (e.g. 0.05). ``coupled = false`` keeps
    coupled groups (convs whose outputs are tied, e.g. a ResNet stage's residual stream) at full width
    (their layers may still be decomposed); by default each is pruned as one unit, its rate drawn from
    ``coupled_rate`` when given (a narrower range: a residual stream feeds every later block), else from
    ``prune_rate``.
    """

    prune_rate: tuple[float, float] = (0.0, 0.8)
    criteria: tuple[str, ...] = ("l1",)
    decomposition: tuple[str, ...] = ("none",)
    rank_ratio: tuple[float, float] = (0.1, 0.9)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    monotone: bool = False
    rate_step: float | None = None
    coupled: bool = True
    coupled_rate: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[space]") -> None:
        """Raise ``SlimError`` naming the key and the allowed values when a value is out of range."""
        lo, hi = _pair(self.prune_rate, f"{where} prune_rate")
        if not 0.0 <= lo <= hi < 1.0:
            raise SlimError(f"{where} prune_rate: need 0 <= low <= high < 1, got [{lo}, {hi}]")
        if self.coupled_rate is not None:
            lo, hi = _pair(self.coupled_rate, f"{where} coupled_rate")
            if not 0.0 <= lo <= hi < 1.0:
                raise SlimError(f"{where} coupled_rate: need 0 <= low <= high < 1, got [{lo}, {hi}]")
        lo, hi = _pair(self.rank_ratio, f"{where} rank_ratio")
        if not 0.0 < lo <= hi <= 1.0:
            raise SlimError(f"{where} rank_ratio: need 0 < low <= high <= 1, got [{lo}, {hi}]")
        _choices(self.criteria, SEARCHABLE_CRITERIA, f"{where} criteria")
        _choices(self.decomposition, DECOMPOSITIONS, f"{where} decomposition")
        for key in ("include", "exclude"):
            val = getattr(self, key)
            if not isinstance(val, tuple) or not all(isinstance(p, str) and p for p in val):
                raise SlimError(f"{where} {key}: expected a list of non-empty fnmatch patterns, got {val!r}")
        if not self.include:
            raise SlimError(f'{where} include: needs at least one pattern (use ["*"] for every layer)')
        for key in ("monotone", "coupled"):
            if not isinstance(getattr(self, key), bool):
                raise SlimError(f"{where} {key}: expected true or false, got {getattr(self, key)!r}")
        if self.rate_step is not None:
            step = self.rate_step
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step < 1.0:
                raise SlimError(f"{where} rate_step: expected a number in (0, 1), got {step!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "[space]") -> SpaceConfig:
        """Build from a TOML table: lists become tuples, a single string counts as a one-item list."""
        known_keys(d, cls, where)
        kw: dict[str, Any] = {}
        for key, val in d.items():
            if key in ("prune_rate", "rank_ratio", "coupled_rate"):
                kw[key] = tuple(_pair(val, f"{where} {key}"))
            elif key in ("criteria", "decomposition", "include", "exclude"):
                kw[key] = (val,) if isinstance(val, str) else tuple(val) if isinstance(val, (list, tuple)) else val
            else:
                kw[key] = val
        return build_checked(cls, kw, where)

    def to_dict(self) -> dict[str, Any]:
        """TOML/JSON-friendly form (tuples as lists, ``rate_step`` omitted when unset)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if val is None:
                continue
            d[f.name] = list(val) if isinstance(val, tuple) else val
        return d


def _pair(val: Any, where: str) -> tuple[float, float]:
    ok = (
        isinstance(val, (list, tuple))
        and len(val) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in val)
    )
    if not ok:
        raise SlimError(f"{where}: expected [low, high] (two numbers), got {val!r}")
    return float(val[0]), float(val[1])


def _choices(val: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(val, tuple) or not val:
        raise SlimError(f"{where}: expected a non-empty list of names from: {', '.join(allowed)}; got {val!r}")
    for v in val:
        if v not in allowed:
            raise SlimError(f"{where}: unknown value {v!r}; allowed: {', '.join(allowed)}")
    if len(set(val)) != len(val):
        raise SlimError(f"{where}: duplicate values in {list(val)}")
