"""Channel rounding (``[space] round_to = N``, as Torch-Pruning's ``round_to``): every pruned group keeps a multiple
of N filters, so a searched network lands on the channel blocks CPU kernels process (oneDNN's AVX-512 convs work
in blocks of 16 float channels; a 13-channel conv costs about what a 16-channel one does).

The kept count is rounded to the nearest multiple of N (ties up), at least N and at most the layer's filters; a
layer with N filters or fewer cannot be cut into blocks and keeps all of them. The rounded policy is an ordinary
policy (its rates give the rounded counts), so what apply_policy builds, what the MACs and latency tables
predict and what the export rebuilds from ``policy.json`` all agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.policy import Policy, rate_for_removed, replace_layer
from torch import nn

__all__ = ["round_count", "round_policy"]


def round_count(k: int, n: int, round_to: int) -> int:
    """``k`` of ``n`` kept filters rounded to a multiple of ``round_to`` (module docstring)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SlimError(f"round_to: expected an integer >= 1, got {round_to!r}")
    if round_to == 1 or k >= n:
        return k
    if n <= round_to:
        return n
    r = round_to * ((k + round_to // 2) // round_to)
    return min(max(r, round_to), n)


def round_policy(
    model: nn.Module, policy: Policy, round_to: int | None, input_shape: Sequence[int] | torch.Tensor | None = None
) -> Policy:
    """``policy`` with every pruned group's kept count rounded by ``round_count`` (``round_to`` None or 1: unchanged).
    Coupled members get the same entry; a ``keep`` mask keeps its strongest (L1) filters when it shrinks and gets
    back the strongest dropped ones when it grows; ``clusters`` becomes the new count."""
    if round_to is None or round_to == 1:
        return policy
    g = model_graph(model, input_shape)
    mods = dict(model.named_modules())
    layers = dict(policy.layers)
    done: set[str] = set()
    for name, lp in policy.layers.items():  # each pruned group once, through its first listed member
        info = g.layers[name]
        leader = info.group or name
        n = info.out_channels
        if leader in done or lp.keep_count(n) >= n:
            continue
        done.add(leader)
        k0 = lp.keep_count(n)
        k = round_count(k0, n, round_to)
        if k == k0:
            continue
        rate = rate_for_removed(n - k, n) if k < n else 0.0
        keep, clusters = lp.keep, lp.clusters
        if keep is not None:
            w = mods[leader].weight.detach().flatten(1).abs().sum(1)
            kept = set(keep)
            pool = keep if k < k0 else range(n)
            keep = tuple(sorted(sorted(pool, key=lambda i: (i not in kept, -float(w[i]), i))[:k]))
            keep = keep if k < n else None
        if clusters is not None:
            clusters = k if k < n else None
        new = {"prune_rate": rate, "keep": keep, "clusters": clusters}
        for m in g.groups.get(leader, [leader]):
            if m in layers:
                layers[m] = replace_layer(layers[m], **new)
    return Policy(layers)
