"""Physical filter pruning: remove filters, the consumers' input channels and BN entries (Torch-Pruning).

The channel bookkeeping is Torch-Pruning's: for each pruned conv we take its dependency-graph group
(``DG.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed)``) and run the group's
handlers, exactly what ``group.prune()`` does. Difference, for speed: the group is computed on the
cached ``core.graph.ModelGraph`` template (all plans in the ORIGINAL channel indexing, merged per module
and dimension) and the handlers are replayed on the model given here, so no dependency graph has to be
traced per call. Indices stay valid because every (module, dimension) is cut exactly once.

The three handlers a CNN plan consists of (``ConvPruner.prune_out/in_channels`` on ungrouped ``nn.Conv2d``,
``BatchnormPruner`` on ``nn.BatchNorm*d``, ``LinearPruner`` on ``nn.Linear``) are replayed by ``_fast_cut``,
which performs exactly their edits (same attribute updates, ``index_select`` of the same tensors, fresh
``nn.Parameter``s with the gradient cut alike) but builds each index tensor once: Torch-Pruning's versions
rebuild it from a Python list per tensor and index BN statistics with a list (~0.3 ms per BN call; the
replay of a ResNet-56 plan takes ~9 ms CPU instead of ~15). The graph, the groups and the removed indices
stay Torch-Pruning's. ``tests/test_prune.py`` checks the two replays agree bit for bit; every other
handler or module type runs Torch-Pruning's own code (``reference=True`` runs it for all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import InputSpec, ModelGraph, fingerprint, model_graph
from torch import nn
from torch_pruning.pruner import function as tpf

__all__ = ["cut", "masked_model_inplace", "prune_layers", "resolve_plan"]

Plan = Mapping[str, Sequence[int] | torch.Tensor]


def _indices(name: str, kept: Sequence[int] | torch.Tensor, n: int) -> tuple[int, ...]:
    raw = kept.tolist() if isinstance(kept, torch.Tensor) else list(kept)
    idx = tuple(sorted(int(i) for i in raw))
    if not idx:
        raise SlimError(f"pruning plan: layer {name!r} keeps no filters; keep at least one")
    if len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= n:
        raise SlimError(f"pruning plan: layer {name!r}: kept indices must be distinct and in 0..{n - 1}, got {raw}")
    return idx


def resolve_plan(graph: ModelGraph, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Check a plan (conv name -> kept filter indices) and map it onto group leaders.

    Members of a coupled group share the leader's kept set; two members with different kept sets,
    an unknown conv or a non-prunable one raise ``SlimError``.
    """
    out: dict[str, tuple[int, ...]] = {}
    source: dict[str, str] = {}
    for name, kept in plan.items():
        info = graph.layers.get(name)
        if info is None:
            raise SlimError(f"pruning plan: {name!r} is not a Conv2d of the model")
        if not info.prunable:
            raise SlimError(f"pruning plan: layer {name!r} cannot be pruned: {info.reason}")
        leader = info.group or name
        idx = _indices(name, kept, graph.layers[leader].out_channels)
        if leader in out and out[leader] != idx:
            raise SlimError(
                f"pruning plan: layers {source[leader]!r} and {name!r} are coupled (group {leader!r}) "
                "and must keep the same filters"
            )
        out[leader], source[leader] = idx, name
    return out


def _graph_for(model: nn.Module, example_input: InputSpec, graph: ModelGraph | None) -> ModelGraph:
    if graph is None:
        return model_graph(model, example_input)
    if graph.fingerprint != fingerprint(model):
        raise ValueError("graph was built for a different architecture than the model given")
    return graph


def prune_layers(
    model: nn.Module, plan: Plan, *, example_input: InputSpec = None, graph: ModelGraph | None = None
) -> nn.Module:
    """Remove, IN PLACE, every filter of ``model`` not listed in ``plan`` (conv name -> kept indices,
    original indexing) plus the matching BN entries and consumer input channels; returns ``model``.

    Pass a copy if the original must survive (``core.apply.apply_policy`` does). ``example_input`` is
    only needed when the graph is not cached yet and 1×C×32×32 does not fit the model.
    """
    return cut(model, plan, _graph_for(model, example_input, graph))


def cut(model: nn.Module, plan: Plan, graph: ModelGraph, *, reference: bool = False) -> nn.Module:
    """``prune_layers`` with a graph known to match ``model`` (no fingerprint check).

    ``reference=True`` runs every op through Torch-Pruning's handler (see the module docstring)."""
    ops = graph.removal_ops(resolve_plan(graph, plan))
    modules = dict(model.named_modules())
    keeps: dict[tuple, torch.Tensor] = {}  # a group's producer, BN and consumers share one kept-index tensor
    with graph._lock:  # handlers are shared pruner objects whose pruning_dim is set per call
        for (name, handler, dim), idxs in ops.items():
            if name in graph.channel_maps:  # traced as a conv stand-in; the real module remaps itself
                modules[name].remove_channels(idxs, out_side=bool(graph.dg.is_out_channel_pruning_fn(handler)))
            elif reference or not _fast_cut(modules[name], handler, idxs, keeps):
                handler.__self__.pruning_dim = dim  # as torch_pruning's Dependency.__call__ does
                handler(modules[name], idxs)
    return model


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fast_cut(module: nn.Module, handler: object, idxs: Sequence[int], keeps: dict[tuple, torch.Tensor]) -> bool:
    """Do what Torch-Pruning's ``handler(module, idxs)`` does, for the handlers and exact module types listed
    in the module docstring; False (nothing done) for anything else."""
    fn, kind = getattr(handler, "__func__", None), type(module)
    if kind is nn.Conv2d and module.groups == 1 and not module.transposed:
        if fn is tpf.ConvPruner.prune_out_channels:
            keep = _keep_index(module.out_channels, idxs, module.weight.device, keeps)
            module.out_channels -= len(idxs)
            _cut_param(module, "weight", keep, 0)
            if module.bias is not None:
                _cut_param(module, "bias", keep, 0)
            return True
        if fn is tpf.ConvPruner.prune_in_channels:
            keep = _keep_index(module.in_channels, idxs, module.weight.device, keeps)
            module.in_channels -= len(idxs)
            _cut_param(module, "weight", keep, 1)
            return True
    elif kind in _BATCHNORMS and fn is tpf.BatchnormPruner.prune_out_channels:  # its prune_in_channels too
        device = next((t.device for t in (module.weight, module.running_mean) if t is not None), None)
        if device is None:
            return False
        keep = _keep_index(module.num_features, idxs, device, keeps)
        module.num_features -= len(idxs)
        if module.track_running_stats:
            module.running_mean = module.running_mean.detach().index_select(0, keep)
            module.running_var = module.running_var.detach().index_select(0, keep)
        if module.affine:
            _cut_param(module, "weight", keep, 0)
            _cut_param(module, "bias", keep, 0)
        return True
    elif kind is nn.Linear and fn in (tpf.LinearPruner.prune_out_channels, tpf.LinearPruner.prune_in_channels):
        out = fn is tpf.LinearPruner.prune_out_channels
        keep = _keep_index(module.out_features if out else module.in_features, idxs, module.weight.device, keeps)
        if out:
            module.out_features -= len(idxs)
            _cut_param(module, "weight", keep, 0)
            if module.bias is not None:
                _cut_param(module, "bias", keep, 0)
        else:
            module.in_features -= len(idxs)
            _cut_param(module, "weight", keep, 1)
        return True
    return False


def _keep_index(n: int, removed: Sequence[int], device: torch.device, keeps: dict[tuple, torch.Tensor]) -> torch.Tensor:
    key = (n, tuple(removed), device)
    keep = keeps.get(key)
    if keep is None:
        gone = set(removed)
        keep = keeps[key] = torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long, device=device)
    return keep


def _cut_param(module: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    """Torch-Pruning's ``_prune_parameter_and_grad``: a new Parameter (requires_grad=True, as there) of the
    kept slices, with the gradient cut alike."""
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, keep))
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, keep)
    setattr(module, name, new)


@torch.no_grad()
def masked_model_inplace(
    model: nn.Module, plan: Plan, *, example_input: InputSpec = None, graph: ModelGraph | None = None
) -> nn.Module:
    """Zero, IN PLACE, what ``prune_layers`` would remove from the OUTPUT side: the filters (weight rows,
    bias) of every group member and the BN weight, bias and running mean of those channels, so those
    channels are exactly 0 after BN in eval mode and the model computes what the pruned one computes.

    Exact for chains of conv/BN/linear/ReLU/pooling/adds; not for norms that mix channels (GroupNorm).
    """
    graph = _graph_for(model, example_input, graph)
    ops = graph.removal_ops(resolve_plan(graph, plan))
    modules = dict(model.named_modules())
    for (name, handler, _dim), idxs in ops.items():
        if not graph.dg.is_out_channel_pruning_fn(handler):
            continue  # consumers' input channels stay: they now read zeros
        m = modules[name]
        if name in graph.channel_maps:
            m.mask_out_channels(idxs)  # what it would carry into removed channels: zeros instead
            continue
        index = torch.as_tensor(idxs, dtype=torch.long)
        for attr in ("weight", "bias", "running_mean"):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor):
                dim = 1 if attr == "weight" and getattr(m, "transposed", False) else 0
                t.index_fill_(dim, index.to(t.device), 0.0)
    return model
