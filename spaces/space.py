"""Model + ``[space]`` -> the per-layer search space, for Optuna (define-by-run) and Ray Tune.

Parameters (names are ``<unit>.<what>``):

- ``<unit>.rate`` (float): prune rate of a *prune unit* — one prunable layer, or a whole coupled
  group (``LayerInfo.group``: layers whose output channels are tied, e.g. by residual adds), named
  after the group, so coupled layers share ONE rate (and one ``criterion``). A group is in the space
  only when every prunable member is selected by include/exclude, since pruning it touches them all,
  and ``coupled`` is true (the default).
- ``<unit>.criterion`` (categorical): which filters stay; only when ``criteria`` has several values.
- ``<layer>.dec`` (categorical): none | cp | tucker for decomposable layers; CP is not offered for
  1×1 convs (it saves nothing there). Only when the layer has more than one choice.
- ``<layer>.rank_ratio`` (float): conditional on ``dec != none``. Optuna suggests it only then; the
  Ray param_space always holds it and ``policy_from_params`` ignores it when ``dec == none``.

A value with a single possibility (``low == high``, one criterion, one decomposition) is fixed, not a
parameter. Monotone rates: the sampler proposes independent rates and ``policy_from_params`` takes a
running maximum over the prune units in depth order (by each unit's first layer). So every rate is
non-decreasing with depth for models without interleaved coupled groups, Optuna's samplers see plain
independent parameters, and a monotone policy is its own pre-image (``params_from_policy`` round-trips).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.spaces.config import SpaceConfig
from torch import nn


@dataclass(frozen=True)
class Param:
    """One searched value. ``layers``: the conv layers it controls. ``condition``: the ``.dec``
    parameter that must be != "none" for this one to matter (rank ratios)."""

    name: str
    kind: str  # "float" | "categorical"
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    layers: tuple[str, ...] = ()
    step: float | None = None
    condition: str | None = None


@dataclass(frozen=True)
class PruneUnit:
    """A prunable layer or a coupled group: one rate (and criterion) for all its ``layers``."""

    key: str
    layers: tuple[str, ...]
    depth: int  # index of its first layer in forward order
    rate: float | Param  # a fixed value or the parameter
    criterion: str | Param


@dataclass(frozen=True)
class DecSlot:
    """Decomposition choice of one layer: fixed or searched, plus its rank ratio."""

    layer: str
    dec: str | Param
    rank_ratio: float | Param | None  # None when the layer can only be "none"


def _example_input(input_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    return torch.zeros(shape)


def _kernel_is_1x1(kernel: Any) -> bool:
    ks = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel, kernel)
    return all(int(k) == 1 for k in ks)


def _group_key(group: Any) -> str:
    return group if isinstance(group, str) else f"group{group}"


def _float_param(name: str, lo: float, hi: float, layers: tuple[str, ...], step: float | None = None,
                 condition: str | None = None) -> float | Param:  # fmt: skip
    if lo == hi:
        return lo
    if step is not None:
        hi = _snap(hi, lo, hi, step)
    return Param(name, "float", lo, hi, (), layers, step, condition)


def _snap(x: float, lo: float, hi: float, step: float | None) -> float:
    """Clip to [lo, hi] and, with a step, move to the nearest grid point lo + k·step (idempotent)."""
    x = min(max(float(x), lo), hi)
    if step is None:
        return x
    k = round((x - lo) / step + 1e-9)
    kmax = math.floor((hi - lo) / step + 1e-9)
    return round(lo + min(k, kmax) * step, 10)


@dataclass
class SearchSpace:
    """The searchable per-layer parameters of one model under one ``SpaceConfig``.

    ``layers``: the LayerInfos that appear in every policy of the space (depth order);
    ``all_layers``: every compressible-layer record of the model; ``skipped``: name -> why a
    selected layer gets no prune rate.
    """

    cfg: SpaceConfig
    layers: list[Any]
    all_layers: list[Any]
    units: list[PruneUnit]
    decs: list[DecSlot]
    skipped: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, cfg: SpaceConfig, input_shape: Sequence[int]) -> SearchSpace:
        """Inspect ``model`` (example input of ``input_shape``, batch dim optional) and build the space."""
        from slimsearch.core.graph import compressible_layers

        infos = list(compressible_layers(model, _example_input(input_shape)))
        return cls.from_layers(infos, cfg)

    @classmethod
    def from_layers(cls, infos: Sequence[Any], cfg: SpaceConfig) -> SearchSpace:
        """Build from ``core.graph.LayerInfo`` records in forward order (no model needed)."""
        infos = list(infos)
        names = [i.name for i in infos]
        selected = _select(names, cfg)
        index = {n: k for k, n in enumerate(names)}
        skipped: dict[str, str] = {}

        members: dict[str, list[Any]] = {}
        for info in infos:
            if info.prunable and info.group is not None and not cfg.coupled:
                if info.name in selected:
                    skipped[info.name] = f"not pruned: in coupled group {info.group!r} ([space] coupled = false)"
            elif info.prunable:
                key = info.name if info.group is None else _group_key(info.group)
                members.setdefault(key, []).append(info)
        units: list[PruneUnit] = []
        unit_of: dict[str, str] = {}
        lo, hi = cfg.prune_rate
        for key, group in members.items():
            layer_names = tuple(i.name for i in group)
            if len(layer_names) == 1:
                key = layer_names[0]  # a "group" of one is just the layer
            out = [n for n in layer_names if n not in selected]
            if out:
                for n in layer_names:
                    if n in selected:
                        skipped[n] = f"not pruned: coupled with excluded layer {out[0]!r}"
                continue
            r_lo, r_hi = cfg.coupled_rate if len(layer_names) > 1 and cfg.coupled_rate is not None else (lo, hi)
            rate = _float_param(f"{key}.rate", r_lo, r_hi, layer_names, cfg.rate_step)
            crit: str | Param = cfg.criteria[0]
            if len(cfg.criteria) > 1:
                crit = Param(f"{key}.criterion", "categorical", None, None, tuple(cfg.criteria), layer_names)
            units.append(PruneUnit(key, layer_names, min(index[n] for n in layer_names), rate, crit))
            unit_of.update({n: key for n in layer_names})
        units.sort(key=lambda u: u.depth)

        decs: list[DecSlot] = []
        for info in infos:
            if info.name not in selected:
                continue
            if not info.prunable and info.name not in skipped:
                skipped[info.name] = f"not pruned: {info.reason or 'not prunable'}"
            if not info.decomposable or getattr(info, "groups", 1) != 1:
                continue
            choices = tuple(d for d in cfg.decomposition if not (d == "cp" and _kernel_is_1x1(info.kernel)))
            if not choices or choices == ("none",):
                continue
            dec: str | Param = choices[0]
            if len(choices) > 1:
                dec = Param(f"{info.name}.dec", "categorical", None, None, choices, (info.name,))
            cond = dec.name if isinstance(dec, Param) else None
            rr = _float_param(f"{info.name}.rank_ratio", *cfg.rank_ratio, (info.name,), condition=cond)
            decs.append(DecSlot(info.name, dec, rr))

        in_space = set(unit_of) | {d.layer for d in decs}
        if not in_space:
            why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:3]) or "no prunable or decomposable layer"
            pw = [
                i.name for i in infos if i.name in selected and "cp" in cfg.decomposition and _kernel_is_1x1(i.kernel)
            ]
            if pw:
                why += f"; CP decomposition does not apply to 1x1 convs ({', '.join(pw[:3])})"
            raise SlimError(f"[space]: nothing to search in the selected layers ({why})")
        layers = [i for i in infos if i.name in in_space]
        return cls(cfg, layers, infos, units, decs, skipped)

    # ------------------------------------------------------------------ views
    @property
    def params(self) -> list[Param]:
        """Every parameter, in the order ``suggest`` asks for them."""
        out: list[Param] = []
        for u in self.units:
            out += [p for p in (u.rate, u.criterion) if isinstance(p, Param)]
        for d in self.decs:
            out += [p for p in (d.dec, d.rank_ratio) if isinstance(p, Param)]
        return out

    @property
    def layer_names(self) -> list[str]:
        return [i.name for i in self.layers]

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.params:
            what = p.name.rsplit(".", 1)[1]
            kinds[what] = kinds.get(what, 0) + 1
        groups = sum(1 for u in self.units if len(u.layers) > 1)
        parts = ", ".join(f"{v} {k}" for k, v in kinds.items()) or "no free parameter"
        return f"{len(self.layers)} layers, {len(self.units)} prune units ({groups} coupled groups); params: {parts}"

    # ------------------------------------------------------------------ params -> policy
    def suggest(self, trial: Any) -> Policy:
        """Optuna define-by-run: ask ``trial`` for every parameter (rank ratios only when decomposing)."""
        values: dict[str, Any] = {}
        for u in self.units:
            for p in (u.rate, u.criterion):
                if isinstance(p, Param):
                    values[p.name] = _ask(trial, p)
        for d in self.decs:
            if isinstance(d.dec, Param):
                values[d.dec.name] = _ask(trial, d.dec)
            dec = values[d.dec.name] if isinstance(d.dec, Param) else d.dec
            if dec != "none" and isinstance(d.rank_ratio, Param):
                values[d.rank_ratio.name] = _ask(trial, d.rank_ratio)
        return self.policy_from_params(values)

    def policy_from_params(self, params: Mapping[str, Any]) -> Policy:
        """Parameter values (Optuna/Ray names) -> Policy over ``self.layers``. Unknown keys are ignored;
        floats are clipped (and snapped to ``rate_step``); monotone rates get a running maximum."""

        def get(p: Param) -> Any:
            if p.name not in params:
                raise SlimError(f"search space: missing parameter {p.name!r}")
            v = params[p.name]
            if p.kind == "categorical":
                if v not in p.choices:
                    raise SlimError(f"search space: {p.name}={v!r} is not one of {list(p.choices)}")
                return v
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SlimError(f"search space: {p.name} must be a finite number, got {v!r}")
            return _snap(v, float(p.low), float(p.high), p.step)  # type: ignore[arg-type]

        rates: dict[str, float] = {}
        crits: dict[str, str] = {}
        running = 0.0
        for u in self.units:
            r = get(u.rate) if isinstance(u.rate, Param) else u.rate
            if self.cfg.monotone:
                r = running = max(running, r)
            c = get(u.criterion) if isinstance(u.criterion, Param) else u.criterion
            for n in u.layers:
                rates[n], crits[n] = r, c
        decs: dict[str, tuple[str, float | None]] = {}
        for d in self.decs:
            dec = get(d.dec) if isinstance(d.dec, Param) else d.dec
            rr = None
            if dec != "none":
                rr = get(d.rank_ratio) if isinstance(d.rank_ratio, Param) else d.rank_ratio
            decs[d.layer] = (dec, rr)
        return self._policy(rates, crits, decs)

    def _policy(self, rates: Mapping[str, float], crits: Mapping[str, str],
                decs: Mapping[str, tuple[str, float | None]]) -> Policy:  # fmt: skip
        layers = {}
        for n in self.layer_names:
            dec, rr = decs.get(n, ("none", None))
            layers[n] = LayerPolicy(
                prune_rate=float(rates.get(n, 0.0)),
                criterion=crits.get(n, "l1"),
                decomposition=dec,
                rank_ratio=None if rr is None else float(rr),
            )
        return Policy(layers)

    def uniform_policy(self, rate: float, criterion: str = "l1") -> Policy:
        """Every prune unit at ``rate`` (at most its range's top: ``coupled_rate`` may be narrower) with
        ``criterion``, nothing decomposed (a seed / baseline)."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise SlimError(f"uniform policy: rate must be in [0, 1), got {rate!r}")
        LayerPolicy(criterion=criterion).check("uniform policy")
        rates: dict[str, float] = {}
        for u in self.units:
            top = float(u.rate.high) if isinstance(u.rate, Param) else float(u.rate)  # type: ignore[arg-type]
            rates.update(dict.fromkeys(u.layers, min(float(rate), top) if len(u.layers) > 1 else float(rate)))
        return self._policy(rates, dict.fromkeys(rates, criterion), {})

    def unit_policy(self, rates: Mapping[str, float], criterion: str = "l1") -> Policy:
        """Each prune unit named in ``rates`` (by key) at its rate, at most its range's top, with ``criterion``;
        the rest unpruned, nothing decomposed (a seed)."""
        LayerPolicy(criterion=criterion).check("unit policy")
        out: dict[str, float] = {}
        for u in self.units:
            if u.key in rates and isinstance(u.rate, Param):
                out.update(dict.fromkeys(u.layers, min(float(rates[u.key]), float(u.rate.high))))
        return self._policy(out, dict.fromkeys(out, criterion), {})

    # ------------------------------------------------------------------ policy -> params
    def params_from_policy(self, policy: Policy, *, strict: bool = True, complete: bool = False) -> dict[str, Any]:
        """Policy -> parameter values, e.g. for ``study.enqueue_trial``.

        ``strict``: a policy outside the space raises ``SlimError`` saying where; otherwise it is
        projected onto the space (rates clipped/snapped and made monotone, clusters/keep turned into
        rates, unknown criteria/decompositions replaced by the first choice, missing rank ratios set
        to the middle of the range). ``complete``: include every parameter, also rank ratios of
        undecomposed layers (a full Ray Tune point), else only those Optuna would ask for.
        """

        def bad(msg: str) -> None:
            if strict:
                raise SlimError(f"policy is outside the search space: {msg}")

        if strict:
            extra = [n for n, lp in policy.layers.items() if n not in set(self.layer_names) and not lp.is_identity]
            if extra:
                bad(f"layer {extra[0]!r} is not searched (not selected, or neither prunable nor decomposable)")
        out: dict[str, Any] = {}
        info = {i.name: i for i in self.layers}
        running = 0.0
        for u in self.units:
            rates = []
            for n in u.layers:
                lp = policy.get(n)
                if lp.keep is not None or lp.clusters is not None:
                    bad(f"layer {n!r} uses clusters/keep, which the space expresses only as a prune rate")
                    n_out = int(info[n].out_channels)
                    rates.append(1.0 - lp.keep_count(n_out) / n_out)
                else:
                    rates.append(float(lp.prune_rate))
            if len(set(rates)) > 1:
                bad(f"coupled layers of {u.key!r} have different rates {rates}")
            r = rates[0]
            if isinstance(u.rate, Param):
                snapped = _snap(r, float(u.rate.low), float(u.rate.high), u.rate.step)  # type: ignore[arg-type]
                if snapped != r:
                    grid = f" with step {u.rate.step}" if u.rate.step else ""
                    bad(f"{u.rate.name}={r} is not in the range [{u.rate.low}, {u.rate.high}]{grid}")
                r = snapped
            elif r != u.rate:
                bad(f"layer {u.layers[0]!r} rate {r} differs from the fixed rate {u.rate}")
                r = u.rate
            if self.cfg.monotone:
                if r < running:
                    bad(f"{u.key!r} rate {r} is below an earlier layer's rate {running} (monotone space)")
                r = running = max(running, r)
            if isinstance(u.rate, Param):
                out[u.rate.name] = r
            crit = policy.get(u.layers[0]).criterion
            choices = u.criterion.choices if isinstance(u.criterion, Param) else (u.criterion,)
            if crit not in choices:
                bad(f"layer {u.layers[0]!r} criterion {crit!r} is not one of {list(choices)}")
                crit = choices[0]
            if isinstance(u.criterion, Param):
                out[u.criterion.name] = crit
        for d in self.decs:
            lp = policy.get(d.layer)
            dec = lp.decomposition
            choices = d.dec.choices if isinstance(d.dec, Param) else (d.dec,)
            if dec not in choices:
                bad(f"layer {d.layer!r} decomposition {dec!r} is not one of {list(choices)}")
                dec = choices[0]
            if isinstance(d.dec, Param):
                out[d.dec.name] = dec
            rr_param = d.rank_ratio if isinstance(d.rank_ratio, Param) else None
            if rr_param is None:
                if dec != "none" and lp.rank_ratio != d.rank_ratio:
                    bad(f"layer {d.layer!r} rank_ratio {lp.rank_ratio} differs from the fixed {d.rank_ratio}")
                continue
            lo, hi = float(rr_param.low), float(rr_param.high)  # type: ignore[arg-type]
            if dec != "none":
                if lp.rank_ratio is None:
                    bad(f"layer {d.layer!r} gives no rank_ratio (explicit ranks are not in the space)")
                rr = (lo + hi) / 2 if lp.rank_ratio is None else float(lp.rank_ratio)
                if _snap(rr, lo, hi, None) != rr:
                    bad(f"{rr_param.name}={rr} is not in the range [{lo}, {hi}]")
                out[rr_param.name] = _snap(rr, lo, hi, None)
            elif complete:
                out[rr_param.name] = (lo + hi) / 2
        return out

    # ------------------------------------------------------------------ Ray Tune
    def ray_param_space(self) -> dict[str, Any]:
        """Ray Tune ``param_space``: tune.uniform / tune.quniform / tune.choice for every parameter
        (rank ratios always present; ignored by ``policy_from_params`` when ``dec == none``)."""
        from ray import tune  # slow import, only when Ray is used

        space: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                space[p.name] = tune.choice(list(p.choices))
            elif p.step is not None:
                space[p.name] = tune.quniform(p.low, p.high, p.step)
            else:
                space[p.name] = tune.uniform(p.low, p.high)
        return space


def _ask(trial: Any, p: Param) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    return trial.suggest_float(p.name, p.low, p.high, step=p.step)


def _select(names: Sequence[str], cfg: SpaceConfig) -> set[str]:
    """Layers matched by some include pattern and no exclude pattern; a pattern matching no layer is an error."""
    for key in ("include", "exclude"):
        for pat in getattr(cfg, key):
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise SlimError(f"[space] {key}: pattern {pat!r} matches no conv layer (layers: {sample})")
    inc = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in cfg.include)}
    return {n for n in inc if not any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)}
