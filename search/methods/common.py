"""Pieces shared by the four methods: the result value, a counting/memoising accuracy wrapper, exact rate
encoding, the per-layer sensitivity scan and whole-model cost reports.

The methods take VALUES and CALLABLES (a model, layer names, ``acc(policy) -> float``), never a study, so
they run the same under the search runner, the ``slimsearch method`` command and synthetic tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy, rate_for_removed
from torch import nn

Acc = Callable[[Policy], float]

DEFAULT_SCAN_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class MethodResult:
    """What a method returns: the policy, a JSON-serialisable report and the step-by-step history."""

    method: str
    policy: Policy
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "policy": self.policy.to_dict(), "report": self.report, "history": self.history}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)


class CountingAcc:
    """Wraps ``acc(policy)``: memoises by ``policy.hash`` and counts the distinct evaluations made.

    Accepts an evaluator returning a float or an object with ``status`` and ``metrics["val_acc"]`` (an
    ``EvalResult``); a non-"ok" result counts as accuracy 0.0 so the step is rejected, never raised.
    """

    def __init__(self, acc: Callable[[Policy], Any]) -> None:
        self._acc = acc
        self._memo: dict[str, float] = {}
        self.calls = 0

    def __call__(self, policy: Policy) -> float:
        key = policy.hash
        if key not in self._memo:
            self.calls += 1
            self._memo[key] = as_accuracy(self._acc(policy))
        return self._memo[key]


def as_accuracy(value: Any) -> float:
    """A float accuracy from a float or an ``EvalResult``-like object (status "ok" else 0.0)."""
    if isinstance(value, (int, float)):
        acc = float(value)
    else:
        status = getattr(value, "status", "ok")
        metrics = getattr(value, "metrics", None)
        if status != "ok" or not isinstance(metrics, Mapping) or "val_acc" not in metrics:
            return 0.0
        acc = float(metrics["val_acc"])
    if not math.isfinite(acc):
        raise SlimError(f"accuracy evaluator returned a non-finite value {acc!r}")
    return acc


def conv_modules(model: nn.Module, layers: Iterable[str]) -> dict[str, nn.Conv2d]:
    """The named convs of ``model`` (in the order given); SlimError naming the first missing one."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    out = {}
    for name in layers:
        if name not in convs:
            raise SlimError(f"layer {name!r} is not a Conv2d of {type(model).__name__}")
        out[name] = convs[name]
    return out


def default_layers(model: nn.Module, example_input: torch.Tensor, kind: str = "prunable") -> list[str]:
    """Names of the compressible convs of ``model`` in forward order (``kind``: prunable | decomposable).

    Prunable means prunable alone: the methods prune one layer at a time, and a coupled group's members (e.g. a
    ResNet stage's residual stream) can only be pruned together."""
    from slimsearch.core.graph import compressible_layers  # local: core.graph is only needed when layers are not given

    if kind not in ("prunable", "decomposable"):
        raise SlimError(f"layer kind must be 'prunable' or 'decomposable', got {kind!r}")
    infos = compressible_layers(model, example_input)
    return [i.name for i in infos if getattr(i, kind) and (kind == "decomposable" or i.group is None)]


def single_layer_policy(name: str, n: int, rate: float, criterion: str) -> Policy:
    """Policy pruning only ``name`` (N = ``n`` filters) at ``rate`` with ``criterion``."""
    removed = min(n - 1, math.floor(rate * n))
    return Policy({name: LayerPolicy(prune_rate=rate_for_removed(removed, n), criterion=criterion)})


def sensitivity_scan(
    model: nn.Module,
    layers: Sequence[str],
    acc: Acc,
    *,
    rates: Sequence[float] = DEFAULT_SCAN_RATES,
    criterion: str = "l1",
    a0: float | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy drop a0 − acc when each layer ALONE is pruned at each rate: {layer: {"0.1": drop, ...}}."""
    convs = conv_modules(model, layers)
    if a0 is None:
        a0 = acc(Policy())
    out: dict[str, dict[str, float]] = {}
    for name, conv in convs.items():
        out[name] = {f"{r:g}": a0 - acc(single_layer_policy(name, conv.out_channels, r, criterion)) for r in rates}
    return out


def admissible_rate(drops: Mapping[str, float], tol: float) -> float:
    """Largest scanned rate such that it and every smaller scanned rate drop ≤ ``tol`` (0.0 if none).

    [inferred] METHODS.md §3 says "largest rate with drop ≤ tol_l"; the prefix rule ignores a lucky pass
    above a failing rate, which on a noisy proxy would otherwise pick an over-aggressive rate.
    """
    best = 0.0
    for key in sorted(drops, key=float):
        if drops[key] > tol:
            break
        best = float(key)
    return best


def sensitivity_order(scan: Mapping[str, Mapping[str, float]], layers: Sequence[str]) -> list[str]:
    """Layers ordered least sensitive first (mean drop over the scanned rates; ties keep forward order)."""
    pos = {name: i for i, name in enumerate(layers)}
    return sorted(layers, key=lambda n: (sum(scan[n].values()) / max(1, len(scan[n])), pos[n]))


def params_after_decomposition(model: nn.Module, policy: Policy) -> int:
    """Whole-model parameter count after a decomposition-only policy, computed without decomposing.

    Each decomposed conv's weight (+ bias) is replaced by ``core.decompose.decomposed_params`` of its explicit
    rank; every other parameter (BN, linear, untouched convs) is kept.
    """
    from slimsearch.core.decompose import choose_rank, decomposed_params

    convs = conv_modules(model, policy.layers)
    total = sum(p.numel() for p in model.parameters())
    for name, lp in policy.layers.items():
        if lp.decomposition == "none":
            continue
        if lp.n_removed_hint:
            raise SlimError(f"layer {name!r}: params_after_decomposition handles decomposition-only policies")
        conv = convs[name]
        rank = choose_rank(conv, lp.decomposition, lp.rank, lp.rank_ratio, name)
        own = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
        total += decomposed_params(conv, lp.decomposition, rank) - own
    return int(total)


def cost_report(
    model: nn.Module, policy: Policy, input_shape: tuple[int, ...], *, apply: Callable[..., nn.Module] | None = None
) -> dict[str, float]:
    """MACs/FLOPs/params of the original and the compressed model (apply_policy + count_cost) and the ratios.

    ``params_ratio`` = params(original)/params(compressed), ``macs_ratio`` = MACs(compressed)/MACs(original).
    """
    from slimsearch.core.cost import count_cost

    if apply is None:
        from slimsearch.core.apply import apply_policy

        new_model = apply_policy(model, policy, input_shape=input_shape)
    else:
        new_model = apply(model, policy)
    base = count_cost(model, input_shape)
    new = count_cost(new_model, input_shape)
    return {
        "base_macs": base.macs,
        "base_params": base.params,
        "macs": new.macs,
        "flops": new.flops,
        "params": new.params,
        "macs_ratio": new.macs / base.macs if base.macs else 1.0,
        "params_ratio": base.params / new.params if new.params else math.inf,
    }
