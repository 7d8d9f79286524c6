"""MACs of a policy without building its model: a per-architecture table of conv/linear calls.

A search fits every sample onto its MACs bound (``core.budget.fit_macs``: 3-5 counts per trial) and benchmarks
bisect uniform rates the same way. Counting on the structure (``core.apply.structure_only``, then a counted
forward) costs 20-60 ms on ResNet-20 and ~130 ms on ResNet-56 on a busy CPU, so fitting took a few percent of a
proxy trial. Here each conv's MACs are ``k_h·k_w·(C_in/groups)·C_out·H_out·W_out`` and a linear's
``rows·in·out`` (``torch.utils.flop_counter``'s formulas, as ``count_cost`` uses), with the channel counts left by
the policy's pruning: the dependency graph's removal ops (``ModelGraph.removal_ops``) say how many channels each
layer loses, which depends only on how many filters each pruned group keeps. A decomposed layer's stack is
counted once per pruned shape and rank (``core.decompose.layer_structure``) and memoised.

The table is exact: it is built only when its base total equals ``count_cost`` (no MACs outside
``nn.Conv2d``/``nn.Linear`` modules), and tests compare it with the structure count on the model zoo and on
coupled / depthwise / concat graphs. ``policy_macs`` falls back to the structure count where the table
cannot answer: a rank chosen by EVBMF (it needs the pruned weights) or a model the table does not cover.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from slimsearch.core.apply import pruned_leaders, structure_only
from slimsearch.core.cost import count_cost
from slimsearch.core.decompose import choose_rank, layer_structure
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import ModelGraph, model_graph
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn

__all__ = ["MacsTable", "macs_table", "policy_macs"]


@dataclass(frozen=True)
class Call:
    """One forward call of a conv or linear module in the base model (batch 1)."""

    name: str
    out: int
    inp: int
    groups: int
    kernel: int  # k_h·k_w (1 for a linear)
    positions: int  # output positions per image: H_out·W_out, or a linear's rows
    in_hw: tuple[int, int] | None  # a conv's input H, W (for decomposed stacks)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.inp == self.out


class MacsTable:
    """Every conv/linear call of one architecture and input shape; ``macs(policy)`` without a model."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.calls = _calls(graph)
        self._stacks: dict[tuple, int] = {}
        self._lock = threading.Lock()
        shape = graph.input_shape
        with graph._lock:
            base = count_cost(graph.template, shape).macs
        self.exact = self.calls is not None and self._total({}, {}) == base

    def macs(self, model: nn.Module, policy: Policy) -> int | None:
        """MACs per input of ``policy`` applied to ``model`` (this table's architecture); None when the table
        cannot tell (EVBMF ranks, a model it does not cover). Bad policies raise ``SlimError`` as
        ``apply_policy`` does."""
        layout = self.layout(model, policy)
        return None if layout is None else self._total(*layout)

    def layout(
        self, model: nn.Module, policy: Policy
    ) -> tuple[dict[tuple[str, bool], int], dict[str, LayerPolicy]] | None:
        """What ``policy`` does to this table's calls: channels removed per ``(layer, out_side)`` and the
        decomposed layers' policies; None when the table cannot tell (as ``macs``)."""
        if not self.exact:
            return None
        policy.validate(model)
        g = self.graph
        decomposed = {n: lp for n, lp in policy.layers.items() if lp.decomposition != "none"}
        if any(lp.rank is None and lp.rank_ratio is None for lp in decomposed.values()):
            return None  # EVBMF: the rank depends on the pruned weights
        for name in decomposed:
            if not g.layers[name].decomposable:
                raise SlimError(f"policy: layer {name!r} cannot be decomposed (groups={g.layers[name].groups})")
        plan = {
            leader: range(lp.keep_count(g.layers[leader].out_channels))
            for leader, (_, lp) in pruned_leaders(g, policy).items()
        }
        removed: dict[tuple[str, bool], int] = {}
        for (name, handler, _dim), idxs in g.removal_ops(plan).items():
            key = (name, bool(g.dg.is_out_channel_pruning_fn(handler)))
            removed[key] = removed.get(key, 0) + len(idxs)
        return removed, decomposed

    def _total(self, removed: dict[tuple[str, bool], int], decomposed: dict[str, LayerPolicy]) -> int:
        total = 0
        for c in self.calls or ():
            out = c.out - removed.get((c.name, True), 0)
            inp = c.inp - removed.get((c.name, False), 0)
            # A depthwise conv's filters, input channels and groups go together (one out-channel op): 1 per group.
            per_group = 1 if c.depthwise else inp // c.groups
            lp = decomposed.get(c.name)
            if lp is None:
                total += c.kernel * per_group * out * c.positions
            else:
                total += self._stack(c, inp, out, lp)
        return total

    def _stack(self, c: Call, inp: int, out: int, lp: LayerPolicy) -> int:
        """MACs of the decomposed stack replacing call ``c``'s conv at its pruned shape (memoised)."""
        key = (c.name, inp, out, lp.decomposition, lp.rank, lp.rank_ratio)
        with self._lock:
            hit = self._stacks.get(key)
        if hit is not None:
            return hit
        macs = count_cost(self.stack(c, inp, out, lp), (1, inp, *c.in_hw)).macs  # type: ignore[misc]
        with self._lock:
            self._stacks[key] = macs
        return macs

    def stack(self, c: Call, inp: int, out: int, lp: LayerPolicy) -> nn.Sequential:
        """The decomposed stack (untrained weights) replacing call ``c``'s conv at its pruned shape."""
        conv = self.graph.template.get_submodule(c.name)
        shell = nn.Conv2d(inp, out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=conv.bias is not None, padding_mode=conv.padding_mode)  # fmt: skip
        rank = choose_rank(shell, lp.decomposition, lp.rank, lp.rank_ratio, layer_name=c.name)
        return layer_structure(shell, lp.decomposition, rank)


def _calls(graph: ModelGraph) -> list[Call] | None:
    """The template's conv/linear calls of one batch-1 forward, or None when a module the table cannot model
    (another conv type, a transposed conv) is called."""
    names = {m: n for n, m in graph.template.named_modules()}
    calls: list[Call] = []
    unknown: list[str] = []

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if type(m) is nn.Conv2d and out.dim() == 4:
            kh, kw = m.kernel_size
            calls.append(Call(names[m], m.out_channels, m.in_channels, m.groups, kh * kw,
                               out.shape[2] * out.shape[3], (x.shape[2], x.shape[3])))  # fmt: skip
        elif type(m) is nn.Linear:
            rows = out.numel() // (m.out_features * x.shape[0])
            calls.append(Call(names[m], m.out_features, m.in_features, 1, 1, rows, None))
        else:
            unknown.append(names[m])

    handles = [
        m.register_forward_hook(hook)
        for m in graph.template.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    x = torch.zeros(graph.input_shape, dtype=graph.template_dtype, device=graph.template_device)
    try:
        with graph._lock, torch.no_grad():
            graph.template(x)
    finally:
        for h in handles:
            h.remove()
    return None if unknown else calls


_TABLES: weakref.WeakKeyDictionary[ModelGraph, MacsTable] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def macs_table(model: nn.Module, input_shape: Sequence[int]) -> MacsTable:
    """The (cached, per dependency graph) MACs table of ``model``'s architecture at ``input_shape``."""
    graph = model_graph(model, tuple(input_shape))
    with _TABLES_LOCK:
        table = _TABLES.get(graph)
    if table is None:
        table = MacsTable(graph)
        with _TABLES_LOCK:
            table = _TABLES.setdefault(graph, table)
    return table


def policy_macs(model: nn.Module, policy: Policy, input_shape: Sequence[int]) -> int:
    """MACs per input of ``policy`` applied to ``model``: from the architecture's table, else counted on the
    policy's structure (nothing is factorised either way)."""
    shape = tuple(input_shape)
    macs = macs_table(model, shape).macs(model, policy)
    if macs is None:
        macs = count_cost(structure_only(model, policy, input_shape=shape), shape).macs
    return int(macs)
