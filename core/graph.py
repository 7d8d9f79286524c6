"""Which conv layers can be compressed, and which are coupled (Torch-Pruning's ``DependencyGraph``).

For every ``nn.Conv2d`` we ask Torch-Pruning for the group of its out-channel pruning
(``DG.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])``): all the layers whose
channels must go with its filters (BN entries, consumers' input channels, residual partners...).

- A conv is *prunable alone* when its group touches no other conv's OUT channels. Convs whose
  out channels are joined (residual adds, depthwise followers) form one *coupled group*: they share
  one rate and one kept-index set, chosen on the group's *leader* (first member in module order).
  The group is named after its leader.
- Modules that move channels without weights can take part as a ``ChannelMap`` (the CIFAR ResNets'
  option-A shortcut, ``core.models.OptionAShortcut``): the graph is traced on a copy where each is replaced
  by its equivalent 1x1 conv (``as_conv``), so the residual streams before and after it are separate
  groups, both prunable; pruning replays the conv's in/out channel removals as ``remove_channels`` on the
  real module. Not a conv layer of the model: it never appears in ``layers``.
- A group is *not prunable* when Torch-Pruning's channel tracing cannot be trusted or pruning would
  change the model's interface: channel padding (``F.pad`` outside a ``ChannelMap``: Torch-Pruning traces
  the pad as element-wise, silently coupling channel i before it with channel i after it, which is wrong
  by ``pad`` channels), channels that
  are model outputs, unwrapped ``nn.Parameter``s, non-depthwise grouped convs, or op types we do not
  vouch for. Then every member gets ``prunable=False`` and a ``reason``.
- A conv is *decomposable* when ``groups == 1`` (CP / Tucker-2 keep the in/out channel counts).

Building the dependency graph traces the model and is slow (seconds for ResNet-56 on a busy CPU), so
the analysis is cached per architecture fingerprint (module names, types, hyper-parameters, tensor
shapes) and example-input shape; it is built on a private eval-mode copy, never on the caller's model.
The fingerprint itself is cached per model object, reused while a cheap identity/shape check holds.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch_pruning as tp
from slimsearch.core.errors import SlimError
from torch import nn
from torch_pruning import ops

__all__ = [
    "ChannelMap",
    "LayerInfo",
    "ModelGraph",
    "compressible_layers",
    "coupled_groups",
    "example_input_for",
    "fingerprint",
    "model_graph",
]

InputSpec = torch.Tensor | Sequence[int] | None

DEFAULT_HW = (32, 32)
_GRAPH_CACHE_SIZE = 8
# Node types whose channel handling in Torch-Pruning we rely on (anything else blocks pruning).
_TRUSTED = {
    ops.OPTYPE.CONV,
    ops.OPTYPE.DEPTHWISE_CONV,
    ops.OPTYPE.BN,
    ops.OPTYPE.LINEAR,
    ops.OPTYPE.PRELU,
    ops.OPTYPE.ELEMENTWISE,
    ops.OPTYPE.CONCAT,
    ops.OPTYPE.RESHAPE,
    ops.OPTYPE.SLICE,
    ops.OPTYPE.GN,
    ops.OPTYPE.IN,
    ops.OPTYPE.LN,
}


@runtime_checkable
class ChannelMap(Protocol):
    """A weight-free module whose output channels are some of its input channels (e.g. option-A shortcut)."""

    def as_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same channel map and output shape, for tracing."""

    def remove_channels(self, removed: list[int], out_side: bool) -> None:
        """Remove input (``out_side=False``) or output channels ``removed``, in place."""

    def mask_out_channels(self, masked: list[int]) -> None:
        """Make output channels ``masked`` zero without changing shapes, in place."""


@dataclass(frozen=True)
class LayerInfo:
    """One conv layer: shape, whether it may be pruned / decomposed, its coupled group, and why not."""

    name: str
    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    groups: int
    prunable: bool
    decomposable: bool
    group: str | None = None
    reason: str | None = None


# A removal op: (module name, Torch-Pruning handler, pruning_dim) -> channel indices to remove.
RemovalKey = tuple[str, Callable[..., nn.Module], int]


class ModelGraph:
    """Dependency graph of a private template copy plus the per-conv analysis; read-only after build.

    ``removal_ops`` maps a pruning plan (conv name -> kept filter indices, ORIGINAL indexing) to the
    handler calls Torch-Pruning's ``group.prune()`` would make, merged per module and dimension and
    expressed in original indices; ``core.prune`` replays them on a copy of any model with the same
    fingerprint, so the slow graph build happens once per architecture.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.fingerprint = fingerprint(model)
        self.input_shape = tuple(example_input.shape)
        self.template_dtype, self.template_device = example_input.dtype, example_input.device
        template = copy.deepcopy(model).eval()
        traced, self.channel_maps = _traceable(template)
        for p in traced.parameters():
            p.requires_grad_(True)  # Torch-Pruning traces grad_fn; frozen weights would hide the convs
        with torch.enable_grad():
            self.dg = tp.DependencyGraph().build_dependency(traced, example_inputs=example_input, verbose=False)
        with torch.no_grad():
            out = template(example_input)
        self.output_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.template = template
        self._names = {m: n for n, m in traced.named_modules()}
        self._lock = threading.RLock()
        self._maps: dict[str, dict[RemovalKey, dict[int, tuple[int, ...]]] | None] = {}
        # The traced copy's convs (what the dependency graph knows), channel maps' stand-ins excluded.
        self.convs: dict[str, nn.Conv2d] = {
            n: m for n, m in traced.named_modules() if isinstance(m, nn.Conv2d) and n not in self.channel_maps
        }
        self.layers, self.groups = self._analyse()

    def _group(self, conv: nn.Conv2d, idxs: Sequence[int]) -> tp.Group:
        with self._lock:
            return self.dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(idxs))

    def _analyse(self) -> tuple[dict[str, LayerInfo], dict[str, list[str]]]:
        order = {n: i for i, n in enumerate(self.convs)}
        members: dict[str, tuple[str, ...]] = {}
        reasons: dict[str, str | None] = {}
        for name, conv in self.convs.items():
            if conv not in self.dg.module2node:
                members[name], reasons[name] = (name,), "not used in the forward pass"
                continue
            outs, reason = self._inspect(self._group(conv, [0]))
            members[name] = tuple(sorted(set(outs) | {name}, key=order.__getitem__))
            reasons[name] = reason
        groups: dict[str, list[str]] = {}
        for mem in members.values():
            if len(mem) > 1:
                groups.setdefault(mem[0], list(mem))
        layers = {}
        for name, conv in self.convs.items():
            mem = members[name]
            # A group is as prunable as its least prunable member's view of it (the views coincide
            # for a symmetric closure; taking any reason is the safe side if they ever do not).
            reason = next((reasons[m] for m in mem if reasons.get(m)), None)
            layers[name] = LayerInfo(
                name=name,
                out_channels=conv.out_channels,
                in_channels=conv.in_channels,
                kernel=tuple(conv.kernel_size),  # type: ignore[arg-type]
                groups=conv.groups,
                prunable=reason is None,
                decomposable=conv.groups == 1,
                group=mem[0] if len(mem) > 1 else None,
                reason=reason,
            )
        return layers, groups

    def _inspect(self, group: tp.Group) -> tuple[list[str], str | None]:
        """Convs whose OUT channels are in ``group``, and why the group must not be pruned (or None)."""
        outs: list[str] = []
        reason: str | None = None
        for dep, _ in group:
            node = dep.target
            kind = node.type
            module = node.module
            if isinstance(module, nn.Conv2d) and self.dg.is_out_channel_pruning_fn(dep.handler):
                if self._names[module] not in self.channel_maps:
                    outs.append(self._names[module])
            why = None
            if _pads_channels(node.grad_fn):
                why = (
                    "channel padding (F.pad) in its channel group (an option-A shortcut can be pruned "
                    "as core.models.OptionAShortcut, a ChannelMap)"
                )
            elif kind in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND):
                # split sizes are written in forward code, and Torch-Pruning 1.6 maps split indices wrongly
                why = "its channels are split (torch.split/chunk/unbind); split sizes are fixed in forward code"
            elif kind == ops.OPTYPE.SLICE and int(getattr(module, "dim", 1)) in (1, -1, -2, -3, -4):
                # dim 1 is NCHW's channel axis; negative dims are ambiguous without the tensor rank
                why = "its channels are sliced in forward code (x[:, a:b])"
            elif kind == ops.OPTYPE.OUTPUT:
                why = "its channels are model outputs"
            elif kind == ops.OPTYPE.PARAMETER:
                why = "an unwrapped nn.Parameter shares its channels"
            elif isinstance(module, nn.Conv2d) and kind == ops.OPTYPE.CONV and module.groups > 1:
                why = f"grouped conv {self._names[module]!r} (groups={module.groups}) shares its channels"
            elif kind not in _TRUSTED:
                why = f"its channels reach a {kind.name} node that is not supported for pruning"
            reason = reason or why
        return outs, reason

    def _index_map(self, leader: str) -> dict[RemovalKey, dict[int, tuple[int, ...]]] | None:
        """For each handler call in ``leader``'s group: leader filter index -> the indices it removes there.

        Torch-Pruning maps indices through the graph in order (identity, concat offsets, flatten blocks of
        H·W per channel), so the group of ALL N filters, split into N equal consecutive blocks, gives each
        filter's share. The map is verified against direct group walks for two index subsets; when it does
        not hold (e.g. a split), returns None and ``removal_ops`` walks the graph per plan instead.
        """
        with self._lock:
            if leader in self._maps:
                return self._maps[leader]
        n = self.convs[leader].out_channels
        full = self._direct({leader: []})  # keep nothing = remove all
        maps: dict[RemovalKey, dict[int, tuple[int, ...]]] | None = {}
        for key, idxs in self._direct_ordered(leader).items():
            if len(idxs) % n:
                maps = None
                break
            m = len(idxs) // n
            maps[key] = {r: tuple(idxs[r * m : (r + 1) * m]) for r in range(n)}  # type: ignore[index]
        if maps is not None and n > 1:
            for kept in ([i for i in range(n) if i % 2], list(range(n // 2))):
                if self._from_map(maps, n, kept) != self._direct({leader: kept}):
                    maps = None
                    break
        if maps is not None and self._from_map(maps, n, []) != full:
            maps = None
        with self._lock:
            self._maps[leader] = maps
        return maps

    def group_norms(self, model: nn.Module, leader: str) -> torch.Tensor:
        """Per filter of ``leader``: the l2 norm of every weight removed with it (Torch-Pruning's
        ``GroupMagnitudeImportance``, p=2): the filters of the leader and its coupled convs, their BN scales, and
        the consumers' input slices (conv and linear). Read from ``model`` (same architecture as the graph's).
        Other modules (channel maps, norms without an affine scale) hold no weight to count."""
        mods = dict(model.named_modules())
        n = self.convs[leader].out_channels
        maps = self._index_map(leader)
        if maps is None:  # no consecutive-block map (e.g. a split): one group walk per filter
            maps = {}
            for r in range(n):
                for key, idxs in self._direct({leader: [i for i in range(n) if i != r]}).items():
                    maps.setdefault(key, {})[r] = tuple(idxs)
        sq = torch.zeros(n, dtype=torch.float64)
        for (name, handler, _), per_filter in maps.items():
            per_index = _squares_per_channel(mods[name], getattr(handler, "__name__", ""))
            if per_index is not None:
                for r, idxs in per_filter.items():
                    sq[r] += per_index[list(idxs)].sum()
        return sq.sqrt()

    def _direct_ordered(self, leader: str) -> dict[RemovalKey, list[int]]:
        """Per handler call, the indices (in Torch-Pruning's order, not sorted) of removing every filter."""
        conv = self.convs[leader]
        out: dict[RemovalKey, list[int]] = {}
        for dep, idxs in self._group(conv, range(conv.out_channels)):
            mod_name = self._names.get(dep.target.module)
            if mod_name is not None:
                out.setdefault((mod_name, dep.handler, dep.target.pruning_dim), []).extend(
                    int(i) for i in tp._helpers.to_plain_idxs(list(idxs))
                )
        return out

    @staticmethod
    def _from_map(maps: dict[RemovalKey, dict[int, tuple[int, ...]]], n: int, kept: Sequence[int]) -> dict:
        keep = set(kept)
        removed = [r for r in range(n) if r not in keep]
        out = {k: sorted({i for r in removed for i in per_root[r]}) for k, per_root in maps.items()}
        return {k: v for k, v in out.items() if v}

    def _direct(self, plan: Mapping[str, Sequence[int]]) -> dict[RemovalKey, list[int]]:
        """Removal ops by one Torch-Pruning group walk per plan entry (the reference)."""
        merged: dict[RemovalKey, set[int]] = {}
        for name, kept in plan.items():
            conv = self.convs[name]
            removed = sorted(set(range(conv.out_channels)) - {int(i) for i in kept})
            if not removed:
                continue
            for dep, idxs in self._group(conv, removed):
                mod_name = self._names.get(dep.target.module)
                if mod_name is None:  # graph-only op (add, reshape, concat...): nothing to cut in a module
                    continue
                key = (mod_name, dep.handler, dep.target.pruning_dim)
                merged.setdefault(key, set()).update(int(i) for i in tp._helpers.to_plain_idxs(list(idxs)))
        return {k: sorted(v) for k, v in merged.items() if v}

    def removal_ops(self, plan: Mapping[str, Sequence[int]], *, direct: bool = False) -> dict[RemovalKey, list[int]]:
        """Handler calls (module name, handler, dim) -> removed indices for a plan of kept indices.

        ``plan`` keys must be group leaders or ungrouped prunable convs (``core.prune`` resolves groups).
        Indices are in the original, unpruned indexing, so the ops commute and each runs once.
        ``direct=True`` skips the per-leader index maps and walks the graph (the slower reference).
        """
        merged: dict[RemovalKey, set[int]] = {}
        for name, kept in plan.items():
            maps = None if direct else self._index_map(name)
            ops = (
                self._direct({name: kept})
                if maps is None
                else self._from_map(maps, self.convs[name].out_channels, kept)
            )
            for key, idxs in ops.items():
                merged.setdefault(key, set()).update(idxs)
        return {k: sorted(v) for k, v in merged.items()}


def _squares_per_channel(module: nn.Module, handler: str) -> torch.Tensor | None:
    """Sum of squared weights per output (``prune_out_channels``) or input (``prune_in_channels``) channel of a
    conv, linear or affine norm layer, as Torch-Pruning's magnitude importance counts them; None for others."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    w = w.detach().to(torch.float64).pow(2)
    if handler == "prune_out_channels" or (handler == "prune_in_channels" and w.dim() == 1):
        return w.reshape(w.shape[0], -1).sum(dim=1)
    if handler == "prune_in_channels" and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
        if isinstance(module, nn.Linear) or module.groups == 1:
            return w.transpose(0, 1).reshape(w.shape[1], -1).sum(dim=1)
        if module.groups == module.in_channels == module.out_channels:  # depthwise: channel c is filter c
            return w.reshape(w.shape[0], -1).sum(dim=1)
    return None


def _traceable(template: nn.Module) -> tuple[nn.Module, frozenset[str]]:
    """``template`` itself when it has no ``ChannelMap``, else a copy with each replaced by its ``as_conv``
    stand-in; and the stand-ins' names."""
    names = [n for n, m in template.named_modules() if n and isinstance(m, ChannelMap)]
    if not names:
        return template, frozenset()
    traced = copy.deepcopy(template)
    for name in names:
        traced.set_submodule(name, traced.get_submodule(name).as_conv())
    return traced, frozenset(names)


def _pads_channels(grad_fn: object) -> bool:
    """Whether a traced op pads the channel dimension of an NCHW tensor (spatial padding is harmless)."""
    name = type(grad_fn).__name__
    if name.startswith("ConstantPadNd"):
        pad = tuple(getattr(grad_fn, "_saved_pad", ()) or ())
        # (W, W, H, H, C, C, ...) for NCHW. Two entries could be a 2-D (N, C) tensor's channels: count as unsafe.
        return len(pad) <= 2 or any(pad[4:6])
    return "Pad" in name and "Pad1d" not in name and "Pad2d" not in name


_FP_PLAIN = (int, float, str, bool, tuple, type(None))
_FP_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[list, list, str]] = weakref.WeakKeyDictionary()
_FP_LOCK = threading.Lock()


def fingerprint(model: nn.Module) -> str:
    """Digest of the architecture: module names, classes, plain public attributes (hyper-parameters such as
    a padding width a ``forward`` may read), tensor shapes and dtypes (not values). Forward code itself is
    identified by the class name only.

    Cached per model object. The digest is reused only while everything it is computed from is unchanged:
    the same objects (submodules, their classes, public attribute values, parameters, buffers, children),
    checked by identity against weak references (or, for immutable values, the values themselves), the same
    attribute / parameter / buffer / child names, and the same tensor shapes and dtypes. Any change (a
    replaced layer, ``conv.stride = (2, 2)``, ``p.data = other``) recomputes it; new weight values in place
    do not. The entry holds no strong reference to the model's modules or tensors, so it dies with the model.
    The check costs a third of computing the digest. (Tuples are taken as immutable, and a custom
    ``extra_repr`` as describing the attributes above.)
    """
    objects, plain = _fingerprint_state(model)
    try:
        with _FP_LOCK:
            hit = _FP_CACHE.get(model)
    except TypeError:  # not weak-referenceable
        return _fingerprint(model)
    if hit is not None and hit[1] == plain and len(hit[0]) == len(objects):
        if all((r() if type(r) is weakref.ReferenceType else r) is o for r, o in zip(hit[0], objects, strict=True)):
            return hit[2]
    digest = _fingerprint(model)
    with _FP_LOCK:
        _FP_CACHE[model] = ([_weak(o) for o in objects], plain, digest)
    return digest


def _weak(o: object) -> object:
    try:
        return weakref.ref(o)
    except TypeError:  # ints, strings, tuples, None, dtypes: immutable values, held as they are
        return o


def _fingerprint_state(model: nn.Module) -> tuple[list, list]:
    """Every object ``_fingerprint`` reads (the model itself aside: it is the cache key), and the tensor
    shapes/dtypes and attribute / parameter / buffer / child names (compared by value)."""
    objects: list = []
    plain: list = []
    for m in model.modules():
        d, params, buffers, children = m.__dict__, m._parameters, m._buffers, m._modules
        if m is not model:
            objects.append(m)
        objects.append(type(m))
        objects += (v for k, v in d.items() if k[0] != "_")  # public attributes: what the digest reads
        objects += params.values()
        objects += buffers.values()
        objects += children.values()
        plain.append((tuple(d), tuple(params), tuple(buffers), tuple(children)))
        plain += [(t.shape, t.dtype) for t in params.values() if t is not None]
        plain += [(t.shape, t.dtype) for t in buffers.values() if t is not None]
    return objects, plain


def _fingerprint(model: nn.Module) -> str:
    """The digest itself, uncached. ``extra_repr`` is included only where a class outside ``torch.nn``
    defines it: torch.nn's own only formats public attributes, which are hashed directly (and formatting
    them was half the cost)."""
    parts = []
    for name, m in model.named_modules():
        cls = type(m)
        extra = "" if (cls.extra_repr.__module__ or "").startswith("torch.nn.") else m.extra_repr()
        attrs = sorted(
            (k, v) for k, v in vars(m).items() if k[0] != "_" and k != "training" and isinstance(v, _FP_PLAIN)
        )
        tensors = [(k, tuple(t.shape), str(t.dtype)) for k, t in m._parameters.items() if t is not None]
        tensors += [(k, tuple(t.shape), str(t.dtype)) for k, t in m._buffers.items() if t is not None]
        parts.append((name, cls.__module__, cls.__qualname__, extra, attrs, tensors))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def example_input_for(model: nn.Module, example_input: InputSpec = None) -> torch.Tensor:
    """A tensor to trace with: ``example_input`` itself, zeros of a given shape, or 1×C×32×32 where C is
    the first conv's ``in_channels``. The inferred 32×32 suits the zoo (whose heads pool adaptively; AlexNet
    needs 32); pass the real shape for anything else (e.g. a head sized for 8×8 inputs)."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if isinstance(example_input, torch.Tensor):
        return example_input.detach().to(device=device, dtype=dtype)
    if example_input is not None:
        shape = tuple(int(s) for s in example_input)
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise SlimError(f"input shape must be (batch, channels, ...) with positive sizes, got {shape}")
        return torch.zeros((1, *shape[1:]), device=device, dtype=dtype)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise SlimError(f"{type(model).__name__} has no Conv2d layer; nothing to compress")
    return torch.zeros((1, first.in_channels, *DEFAULT_HW), device=device, dtype=dtype)


_CACHE: OrderedDict[tuple[str, tuple[int, ...], str], ModelGraph] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def model_graph(model: nn.Module, example_input: InputSpec = None) -> ModelGraph:
    """The (cached) ``ModelGraph`` of ``model``'s architecture; a failed trace is a ``SlimError``."""
    x = example_input_for(model, example_input)
    key = (fingerprint(model), tuple(x.shape[1:]), str(x.device))
    with _CACHE_LOCK:
        graph = _CACHE.get(key)
        if graph is not None:
            _CACHE.move_to_end(key)
            return graph
    try:
        graph = ModelGraph(model, x)
    except SlimError:
        raise
    except Exception as e:  # a model that cannot run on this input cannot be analysed
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SlimError(
            f"cannot trace {type(model).__name__} on an input of shape {tuple(x.shape)} "
            f"(pass the right input shape): {type(e).__name__}: {msg}"
        ) from None
    with _CACHE_LOCK:
        _CACHE[key] = graph
        while len(_CACHE) > _GRAPH_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return graph


def compressible_layers(model: nn.Module, example_input: InputSpec = None) -> list[LayerInfo]:
    """Every ``nn.Conv2d`` of ``model`` in module order, with prunability, decomposability and group."""
    return list(model_graph(model, example_input).layers.values())


def coupled_groups(model: nn.Module, example_input: InputSpec = None) -> dict[str, list[str]]:
    """Coupled conv groups (2+ convs sharing out channels), keyed by leader name -> members in module order.

    Includes non-prunable groups (see ``LayerInfo.prunable``); a search space shares one rate per group.
    """
    return {k: list(v) for k, v in model_graph(model, example_input).groups.items()}
