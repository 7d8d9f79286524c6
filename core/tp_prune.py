"""Torch-Pruning's own pruning (``MetaPruner``) on the layers core.graph can prune: the uniform-L1 and global
group-norm baselines the benchmarks compare against, and the allocation the ``tp_global`` seed strategy reuses.

Torch-Pruning traces an option-A shortcut's channel padding as element-wise (it would tie channel c of one
stage to channel c of the next), so the convs core.graph prunes through a channel map are ignored here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from torch import nn

__all__ = ["kept_filters", "pruned_rates", "tp_prune", "tp_prune_progressive", "unprunable_modules"]


def unprunable_modules(model: nn.Module, shape: Sequence[int]) -> list[nn.Module]:
    """Torch-Pruning ``ignored_layers``: every conv core.graph marks unprunable or prunes through a channel map
    (a ResNet stage's residual stream, through the option-A shortcut's channel padding, which Torch-Pruning
    traces as element-wise), plus every Linear (the head)."""
    g = model_graph(model, tuple(shape))
    mods = dict(model.named_modules())

    def mapped(name: str) -> bool:
        leader = g.layers[name].group or name
        return any(key[0] in g.channel_maps for key in g.removal_ops({leader: [0]}))

    return [mods[n] for n, i in g.layers.items() if not i.prunable or mapped(n)] + [
        m for m in model.modules() if isinstance(m, nn.Linear)
    ]


def tp_prune(
    model: nn.Module,
    kind: str,
    ratio: float,
    shape: Sequence[int],
    max_ratio: float = 0.9,
    ignore: Sequence[str] = (),
) -> nn.Module:
    """A pruned copy of ``model`` (eval mode) from Torch-Pruning's ``MetaPruner``: ``kind`` tp_l1 (uniform
    ``ratio``, filter L1) or tp_global (global ``ratio`` of the prunable channels, group L2 norm), at most
    ``max_ratio`` of any layer (``ratio`` above it makes Torch-Pruning skip layers). Layers core.graph cannot
    prune, and the convs named in ``ignore``, are left alone; checked: they keep their channels and the output
    shape is unchanged."""
    import torch_pruning as tp

    if kind not in ("tp_l1", "tp_global"):
        raise SlimError(f"unknown Torch-Pruning baseline {kind!r}; allowed: tp_l1, tp_global")
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    ignored = unprunable_modules(m, shape) + [mods[n] for n in ignore]
    before = {id(c): c.out_channels for c in ignored if isinstance(c, nn.Conv2d)}
    dev = next(m.parameters()).device
    x = torch.zeros(tuple(shape), device=dev)
    with torch.no_grad():
        out_shape = tuple(m(x).shape)
    grads = [p.requires_grad for p in m.parameters()]
    for p in m.parameters():
        p.requires_grad_(True)  # TP traces grad_fn
    if kind == "tp_l1":
        imp, glob = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None), False
    else:
        imp, glob = tp.importance.GroupMagnitudeImportance(p=2), True
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(m, x, importance=imp, pruning_ratio=float(ratio), global_pruning=glob,
                                      ignored_layers=ignored, max_pruning_ratio=max_ratio)  # fmt: skip
        pruner.step()
    for p, g in zip(m.parameters(), grads, strict=True):
        p.requires_grad_(g)
    m.eval()
    changed = [c for c in ignored if isinstance(c, nn.Conv2d) and c.out_channels != before[id(c)]]
    with torch.no_grad():
        got = tuple(m(x).shape)
    if changed or got != out_shape:
        raise RuntimeError(f"Torch-Pruning {kind} at {ratio}: ignored convs changed ({len(changed)}) or output "
                           f"{got} != {out_shape}")  # fmt: skip
    return m


def tp_prune_progressive(
    model: nn.Module,
    kind: str,
    max_macs: float,
    shape: Sequence[int],
    macs_of: Callable[[nn.Module], float],
    steps: int = 400,
    max_ratio: float = 0.9,
) -> tuple[nn.Module, int]:
    """Torch-Pruning's CIFAR recipe (its benchmarks' ``progressive_pruning``): ``MetaPruner`` with
    ``pruning_ratio=1.0`` spread over ``steps`` iterative steps, ``pruner.step()`` until ``macs_of(model)`` is
    within ``max_macs``; importance re-scored on the shrunk network at every step. Returns the pruned copy (eval
    mode) and the steps taken; a bound not reached within ``steps`` is a ``SlimError``."""
    import torch_pruning as tp

    if kind not in ("tp_l1", "tp_global"):
        raise SlimError(f"unknown Torch-Pruning baseline {kind!r}; allowed: tp_l1, tp_global")
    m = copy.deepcopy(model).eval()
    ignored = unprunable_modules(m, shape)
    x = torch.zeros(tuple(shape), device=next(m.parameters()).device)
    if kind == "tp_l1":
        imp, glob = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None), False
    else:
        imp, glob = tp.importance.GroupMagnitudeImportance(p=2), True
    grads = [p.requires_grad for p in m.parameters()]
    for p in m.parameters():
        p.requires_grad_(True)  # TP traces grad_fn
    taken = 0
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(m, x, importance=imp, pruning_ratio=1.0, global_pruning=glob,
                                      iterative_steps=steps, ignored_layers=ignored, max_pruning_ratio=max_ratio)  # fmt: skip
        while macs_of(m) > max_macs:
            if taken >= steps:
                raise SlimError(f"Torch-Pruning {kind}: {max_macs:,.0f} MACs not reached in {steps} steps")
            pruner.step()
            taken += 1
    for p, g in zip(m.parameters(), grads, strict=True):
        p.requires_grad_(g)
    return m.eval(), taken


def kept_filters(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv of ``model`` by name: a pruned copy's allocation."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def pruned_rates(base: nn.Module, pruned: nn.Module, names: Sequence[str]) -> dict[str, float]:
    """Prune rate of each conv in ``names`` that ``pruned`` (a pruned copy of ``base``) shrank, such that
    ``LayerPolicy.keep_count`` gives back exactly its kept-filter count: a pruned model's allocation as rates."""
    total, kept = kept_filters(base), kept_filters(pruned)
    # half a filter's margin: keep_count floors rate x filters, and a rate is stored with 6 decimals
    return {n: (total[n] - kept[n] + 0.5) / total[n] for n in names if kept[n] < total[n]}
