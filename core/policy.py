"""Policy: what to do to each conv layer. An immutable value with validation, JSON and a hash.

Semantics of one ``LayerPolicy``:
- ``prune_rate`` r in [0, 1): remove ``floor(r * N)`` of the layer's N filters (keep at least 1).
- ``clusters``: for the clustering criteria (hpc, distfit) the number of clusters/strata, which
  is also the number of filters kept; when given it overrides ``prune_rate``'s keep count.
- ``criterion`` picks WHICH filters stay (see ``core.criteria``); ``mask`` takes ``keep``, the
  explicit indices to keep (the GA's output).
- ``decomposition`` none | cp | tucker, applied after pruning. Ranks: ``rank`` (int for CP,
  ``(R_in, R_out)`` for Tucker-2) or ``rank_ratio`` of the full rank, or, when neither is
  given, EVBMF's estimate.
Layers absent from the policy are left untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from slimsearch.core.errors import SlimError

if TYPE_CHECKING:  # torch is imported on use: reading a study file (and reporting its errors) stays fast
    from torch import nn

CRITERIA = ("l1", "l2", "fpgm", "group", "hpc", "distfit", "random", "mask")  # core.criteria.select_filters
DECOMPOSITIONS = ("none", "cp", "tucker")

Rank = int | tuple[int, int] | None


@dataclass(frozen=True)
class LayerPolicy:
    prune_rate: float = 0.0
    criterion: str = "l1"
    clusters: int | None = None
    keep: tuple[int, ...] | None = None
    decomposition: str = "none"
    rank: Rank = None
    rank_ratio: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(int(r) for r in self.rank))
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(int(i) for i in self.keep))

    @property
    def is_identity(self) -> bool:
        return self.n_removed_hint == 0 and self.decomposition == "none"

    @property
    def n_removed_hint(self) -> int:
        """Nonzero when this policy asks to remove filters at all (exact count needs N)."""
        return int(self.prune_rate > 0 or self.clusters is not None or self.keep is not None)

    def keep_count(self, n_filters: int) -> int:
        """Number of filters kept out of ``n_filters``: always in [1, n_filters], whatever the values
        (a layer never loses every filter; ``check``/``validate`` reject the values that would ask for it)."""
        if self.keep is not None:
            k = len(self.keep)
        elif self.clusters is not None:
            k = int(self.clusters)
        else:
            k = n_filters - math.floor(float(self.prune_rate) * n_filters)
        return max(1, min(k, n_filters))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prune_rate": round(float(self.prune_rate), 6), "criterion": self.criterion}
        if self.clusters is not None:
            d["clusters"] = int(self.clusters)
        if self.keep is not None:
            d["keep"] = [int(i) for i in self.keep]
        d["decomposition"] = self.decomposition
        if self.rank is not None:
            d["rank"] = list(self.rank) if isinstance(self.rank, tuple) else int(self.rank)
        if self.rank_ratio is not None:
            d["rank_ratio"] = round(float(self.rank_ratio), 6)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> LayerPolicy:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SlimError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise SlimError(f"{where}: {e}") from None

    def check(self, where: str = "layer") -> None:
        """Checks that need no model: value ranges and names."""
        if not isinstance(self.prune_rate, (int, float)) or not 0.0 <= float(self.prune_rate) < 1.0:
            raise SlimError(f"{where}: prune_rate must be in [0, 1), got {self.prune_rate!r}")
        if self.criterion not in CRITERIA:
            raise SlimError(f"{where}: unknown criterion {self.criterion!r}; allowed: {', '.join(CRITERIA)}")
        if self.criterion == "mask" and self.keep is None:
            raise SlimError(f"{where}: criterion 'mask' needs 'keep' (indices of the filters to keep)")
        if self.keep is not None and (len(self.keep) == 0 or len(set(self.keep)) != len(self.keep)):
            raise SlimError(f"{where}: 'keep' must list at least one distinct filter index")
        if self.clusters is not None and (not isinstance(self.clusters, int) or self.clusters < 1):
            raise SlimError(f"{where}: clusters must be a positive integer, got {self.clusters!r}")
        if self.decomposition not in DECOMPOSITIONS:
            raise SlimError(
                f"{where}: unknown decomposition {self.decomposition!r}; allowed: {', '.join(DECOMPOSITIONS)}"
            )
        if self.rank_ratio is not None and not 0.0 < float(self.rank_ratio) <= 1.0:
            raise SlimError(f"{where}: rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        if self.rank is not None:
            ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,)
            if self.decomposition == "cp" and isinstance(self.rank, tuple):
                raise SlimError(f"{where}: CP takes one integer rank, got {list(self.rank)}")
            if self.decomposition == "tucker" and not (isinstance(self.rank, tuple) and len(self.rank) == 2):
                raise SlimError(f"{where}: Tucker-2 takes two ranks [R_in, R_out], got {self.rank!r}")
            if any(not isinstance(r, int) or r < 1 for r in ranks):
                raise SlimError(f"{where}: ranks must be positive integers, got {self.rank!r}")


def cp_max_rank(out_c: int, in_c: int, kh: int, kw: int) -> int:
    """Upper bound on the CP rank of an out×in×kh×kw tensor: product of all dims but the largest."""
    dims = sorted((out_c, in_c, kh, kw))
    return dims[0] * dims[1] * dims[2]


@dataclass(frozen=True)
class Policy:
    """Per-layer policies keyed by the conv's qualified module name."""

    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPolicy:
        return self.layers[name]

    def get(self, name: str) -> LayerPolicy:
        return self.layers.get(name, LayerPolicy())

    def with_layer(self, name: str, lp: LayerPolicy) -> Policy:
        return Policy({**self.layers, name: lp})

    def without_identity(self) -> Policy:
        return Policy({k: v for k, v in self.layers.items() if not v.is_identity})

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {k: v.to_dict() for k, v in self.layers.items()}}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent, separators=None if indent else (",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy") -> Policy:
        if not isinstance(d, Mapping) or not isinstance(d.get("layers", {}), Mapping):
            raise SlimError(f"{where}: expected an object with a 'layers' table")
        extra = sorted(set(d) - {"layers"})
        if extra:
            raise SlimError(f"{where}: unknown key {extra[0]!r}; allowed: layers")
        layers = {}
        for name, lp in d.get("layers", {}).items():
            if not isinstance(lp, Mapping):
                raise SlimError(f"{where}: layer {name!r} must be a table, got {type(lp).__name__}")
            layers[name] = LayerPolicy.from_dict(lp, where=f"{where}: layer {name!r}")
        return cls(layers)

    @classmethod
    def from_json(cls, text: str, where: str = "policy") -> Policy:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SlimError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(d, where)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit digest of the canonical JSON (identity layers dropped)."""
        return hashlib.sha256(self.without_identity().to_json().encode()).hexdigest()[:16]

    def validate(self, model: nn.Module) -> Policy:
        """Check every layer against ``model``; return self so it chains. Raises ``SlimError``."""
        from torch import nn

        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        for name, lp in self.layers.items():
            where = f"policy: layer {name!r}"
            if name not in convs:
                near = [n for n in convs if n.endswith(name.split(".")[-1])][:3]
                hint = f" (conv layers include: {', '.join(near or list(convs)[:3])})" if convs else ""
                raise SlimError(f"{where} is not a Conv2d of {type(model).__name__}{hint}")
            lp.check(where)
            conv = convs[name]
            out_c, in_g, kh, kw = conv.weight.shape
            if lp.keep is not None and max(lp.keep) >= out_c:
                raise SlimError(f"{where}: keep index {max(lp.keep)} out of range for {out_c} filters")
            if lp.clusters is not None and lp.clusters > out_c:
                raise SlimError(f"{where}: clusters={lp.clusters} exceeds the layer's {out_c} filters")
            if lp.decomposition == "none":
                continue
            if conv.groups != 1:
                raise SlimError(
                    f"{where}: {lp.decomposition} decomposition of a grouped conv (groups={conv.groups}) is not supported"
                )
            if lp.decomposition == "cp" and kh * kw == 1:
                raise SlimError(f"{where}: CP decomposition of a 1x1 conv saves nothing; use 'tucker' or 'none'")
            if isinstance(lp.rank, int) and lp.decomposition == "cp":
                full = cp_max_rank(out_c, in_g, kh, kw)
                if lp.rank > full:
                    raise SlimError(f"{where}: CP rank {lp.rank} exceeds the full rank {full}")
            if isinstance(lp.rank, tuple):
                r_in, r_out = lp.rank
                if r_in > in_g or r_out > out_c:
                    raise SlimError(
                        f"{where}: Tucker ranks {list(lp.rank)} exceed the full ranks [{in_g}, {out_c}] (in, out)"
                    )
        return self

    def summary(self) -> str:
        """Short human text, e.g. for tables: mean rate and decomposition counts."""
        if not self.layers:
            return "identity"
        rates = [lp.prune_rate for lp in self.layers.values()]
        dec = [lp.decomposition for lp in self.layers.values() if lp.decomposition != "none"]
        parts = [f"{len(self.layers)} layers", f"mean rate {sum(rates) / len(rates):.2f}"]
        if dec:
            parts.append(f"cp {dec.count('cp')} tucker {dec.count('tucker')}")
        return ", ".join(parts)


def rate_for_removed(removed: int, n: int) -> float:
    """The smallest 6-decimal prune rate r with floor(r·n) == removed.

    Policies serialise rates to 6 decimals; removed/n itself (e.g. 1/3 -> 0.333333) could floor to one
    filter fewer after a JSON round trip, so the rate is rounded UP onto the 6-decimal grid and checked.
    """
    if not 0 <= removed < n:
        raise SlimError(f"cannot remove {removed} of {n} filters (must keep at least one)")
    if removed == 0:
        return 0.0
    r = math.ceil(removed * 1_000_000 / n) / 1_000_000
    while math.floor(r * n) < removed:
        r = round(r + 1e-6, 6)
    while math.floor(r * n) > removed:  # defensive: float noise in the product
        r = round(r - 1e-6, 6)
    return r


def replace_layer(lp: LayerPolicy, **changes: Any) -> LayerPolicy:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return replace(lp, **changes)
