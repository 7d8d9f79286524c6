"""``[space]`` of a study file: which layers are searched and over which values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import CRITERIA, DECOMPOSITIONS
from slimsearch.core.schema import Key, check_fields, read_table
from slimsearch.core.tables import build_checked

# "mask" needs explicit keep indices (the GA's output), which a sampler cannot propose.
SEARCHABLE_CRITERIA = tuple(c for c in CRITERIA if c != "mask")
# The [space] keys of a study file (core.schema): types, bounds, defaults and docs/study-file.md's text.
SPACE_KEYS: tuple[Key, ...] = (
    Key(
        "prune_rate",
        "range",
        (0.0, 0.8),
        "range of each searched layer's filter prune rate (the fraction of its filters removed)",
        lo=0,
        hi=1,
        hi_open=True,
    ),
    Key(
        "criteria",
        "choices",
        ("l1",),
        "filter selection criteria to search: `l1`, `l2` (weight norms), `fpgm` "
        "(geometric median), `group` (l2 over every weight removed with a filter: coupled convs, BN, consumers), `hpc` (hybrid-pyramid clustering), `distfit` (distribution fitting), `random`",
        choices=SEARCHABLE_CRITERIA,
    ),
    Key(
        "decomposition",
        "choices",
        ("none",),
        "low-rank decompositions to search per layer: `none`, `cp` (CP by ALS), `tucker` (Tucker-2 by HOOI)",
        choices=DECOMPOSITIONS,
    ),
    Key(
        "rank_ratio",
        "range",
        (0.1, 0.9),
        "range of a decomposed layer's rank, as a fraction of its full rank",
        lo=0,
        hi=1,
        lo_open=True,
    ),
    Key("include", "strs", ("*",), "fnmatch patterns of the conv layers to search (others stay as they are)"),
    Key("exclude", "strs", (), "fnmatch patterns of conv layers never to search (each must match a layer)"),
    Key("monotone", "bool", False, "prune rates never decrease with depth"),
    Key(
        "rate_step",
        "float",
        None,
        "quantise sampled rates to multiples of this step (e.g. 0.05); unset: continuous",
        lo=0,
        hi=1,
        lo_open=True,
        hi_open=True,
    ),
    Key(
        "coupled",
        "bool",
        True,
        "prune coupled groups (convs whose outputs are tied by residual adds, e.g. a "
        "ResNet stage's stream) as one unit with one rate; false keeps them whole",
    ),
    Key(
        "coupled_rate", "range", None, "the rate range of coupled groups; unset: `prune_rate`", lo=0, hi=1, hi_open=True
    ),
    Key(
        "round_to",
        "int",
        None,
        "kept filter counts rounded to multiples of N (as Torch-Pruning's `round_to`; "
        "layers of N filters or fewer stay whole), so a network lands on the channel blocks CPU kernels process "
        "(16 floats on AVX-512); the MACs and latency bounds are checked on the rounded policy, which is the one "
        "stored; unset: no rounding",
        lo=1,
        hi=1024,
    ),
)


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
    # Kept filter counts rounded to multiples of N (core.rounding; Torch-Pruning's round_to); None = no rounding.
    round_to: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[space]") -> None:
        """Raise ``SlimError`` naming the key and the allowed values when a value is out of range (``SPACE_KEYS``)."""
        check_fields(self, SPACE_KEYS, where)
        for key in ("include", "exclude"):
            if not all(getattr(self, key)):
                raise SlimError(
                    f"{where} {key}: expected a list of non-empty fnmatch patterns, got {getattr(self, key)!r}"
                )
        if not self.include:
            raise SlimError(f'{where} include: needs at least one pattern (use ["*"] for every layer)')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "[space]") -> SpaceConfig:
        """Build from a TOML table: lists become tuples, a single string counts as a one-item list."""
        return build_checked(cls, read_table(d, SPACE_KEYS, where), where)

    def to_dict(self) -> dict[str, Any]:
        """TOML/JSON-friendly form (tuples as lists, ``rate_step`` omitted when unset)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if val is None:
                continue
            d[f.name] = list(val) if isinstance(val, tuple) else val
        return d
