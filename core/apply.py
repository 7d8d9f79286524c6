"""apply_policy: a Policy + a model -> a new, smaller model (the input is never modified).

Order: validate -> choose the kept filters of every pruned layer on the ORIGINAL weights
(``core.criteria.select_filters``) -> prune a deep copy (``core.prune``) -> decompose the layers
whose policy says cp/tucker, using the POST-pruning conv (its filters, and input channels cut by
pruned predecessors, are gone; ranks are checked against that shape) -> eval mode -> one batch-1
forward pass, without convolution arithmetic (``_shape_forward``), checking the output shape is unchanged.

Coupled groups (``core.graph``): a policy entry on any member prunes the whole group with one kept set,
chosen on the group leader's weights; members given in the policy must agree on their pruning settings.

The example input (for tracing the dependency graph once per architecture) defaults to 1×C×32×32, C the
first conv's in_channels. That suits the zoo; a model whose head needs another size (e.g. a flatten
sized for 8×8 inputs) needs ``input_shape=(1, C, H, W)`` or ``example_input``.
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from slimsearch.core.cost import conv_zeros
from slimsearch.core.criteria import select_filters
from slimsearch.core.decompose import DecompositionCache, choose_rank, decompose_conv, default_cache, layer_structure
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import InputSpec, ModelGraph, model_graph
from slimsearch.core.policy import LayerPolicy, Policy, replace_layer
from slimsearch.core.prune import cut, masked_model_inplace
from torch import nn

__all__ = [
    "apply_policy",
    "clone_model",
    "kept_indices",
    "layer_seed",
    "masked_model",
    "model_digest",
    "pruned_leaders",
    "structure_only",
]


_ATOMS = frozenset({int, float, str, bool, type(None), torch.dtype, torch.device})
_STANDARD_KEYS = frozenset(nn.Module().__dict__)
_HOOK_KEYS = tuple(
    k
    for k, v in nn.Module().__dict__.items()
    if type(v) in (dict, OrderedDict) and k not in ("_parameters", "_buffers", "_modules")
)
_CLASS_COPYABLE: dict[type, bool] = {}


def _plain(v: object) -> bool:
    tv = type(v)
    return tv in _ATOMS or (tv is tuple and all(_plain(x) for x in v))  # type: ignore[union-attr]


def _copyable(cls: type) -> bool:
    """The class neither customises copying nor pickling (torch.nn's own ``__setstate__`` shims are fine)."""
    ok = _CLASS_COPYABLE.get(cls)
    if ok is None:
        setstate_home = getattr(getattr(cls, "__setstate__", None), "__module__", "") or ""
        ok = _CLASS_COPYABLE[cls] = not hasattr(cls, "__deepcopy__") and setstate_home.startswith("torch.nn")
    return ok


class _NotPlain(Exception):
    pass


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` (new parameters/buffers, shared weights stay shared).

    ``copy.deepcopy`` costs ~3x more on a ResNet-56 (generic reconstruction of every module), which
    dominated ``apply_policy``. This copies the standard ``nn.Module`` state directly and falls back to
    ``deepcopy`` for anything else: hooks, tensor/parameter subclasses, non-trivial attributes.
    Gradients are not copied.
    """
    memo: dict[int, object] = {}

    def tensor(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        y = memo.get(id(x))
        if y is None:
            if type(x) is nn.Parameter:
                y = nn.Parameter(x.detach().clone(), requires_grad=x.requires_grad)
            elif type(x) is torch.Tensor:
                y = x.detach().clone()
            else:
                raise _NotPlain
            memo[id(x)] = y
        return y  # type: ignore[return-value]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]  # type: ignore[return-value]
        cls = type(m)
        if not _copyable(cls):
            raise _NotPlain
        src = m.__dict__
        d = dict(src)  # standard flags (training, ...) and plain attributes as they are; the rest replaced below
        for k in _HOOK_KEYS:
            hooks = src.get(k)
            if hooks:
                raise _NotPlain  # registered hooks: deepcopy decides what copying them means
            if hooks is not None:
                d[k] = type(hooks)()  # fresh, never shared
        if any(type(x) is not str for x in src.get("_non_persistent_buffers_set", ())):
            raise _NotPlain
        d["_non_persistent_buffers_set"] = set(src.get("_non_persistent_buffers_set", ()))
        d["_parameters"] = {n: tensor(t) for n, t in src["_parameters"].items()}
        d["_buffers"] = {n: tensor(t) for n, t in src["_buffers"].items()}
        d["_modules"] = {n: None if c is None else module(c) for n, c in src["_modules"].items()}
        if not all(_plain(src[k]) for k in src.keys() - _STANDARD_KEYS):
            raise _NotPlain
        new = cls.__new__(cls)
        new.__dict__ = d
        memo[id(m)] = new
        return new

    try:
        with torch.no_grad():
            return module(model)
    except _NotPlain:
        return copy.deepcopy(model)


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed for seeded criteria, so layers of equal size do not all drop the same indices."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _prune_key(lp: LayerPolicy) -> tuple[object, ...]:
    return (lp.prune_rate, lp.criterion, lp.clusters, lp.keep)


def pruned_leaders(graph: ModelGraph, policy: Policy) -> dict[str, tuple[str, LayerPolicy]]:
    """Leader (or ungrouped conv) -> (the policy entry that prunes it, that entry's layer name)."""
    out: dict[str, tuple[str, LayerPolicy]] = {}
    for name, lp in policy.layers.items():
        info = graph.layers[name]
        if lp.keep_count(info.out_channels) >= info.out_channels:
            continue  # removes nothing (e.g. a rate below 1/N): allowed on any layer
        if not info.prunable:
            prunable = [n for n, i in graph.layers.items() if i.prunable]
            hint = (
                f"; prunable layers: {', '.join(prunable[:6])}{' ...' if len(prunable) > 6 else ''}" if prunable else ""
            )
            raise SlimError(f"policy: layer {name!r} cannot be pruned: {info.reason}{hint}")
        leader = info.group or name
        if leader in out and _prune_key(out[leader][1]) != _prune_key(lp):
            raise SlimError(
                f"policy: layers {out[leader][0]!r} and {name!r} are coupled (group {leader!r}) and must have "
                "the same prune_rate, criterion, clusters and keep"
            )
        out.setdefault(leader, (name, lp))
    return out


def _kept(graph: ModelGraph, model: nn.Module, policy: Policy, seed: int) -> dict[str, torch.Tensor]:
    """Kept filter indices per pruned leader, selected on ``model``'s (original) weights."""
    convs = dict(model.named_modules())
    kept: dict[str, torch.Tensor] = {}
    for leader, (name, lp) in pruned_leaders(graph, policy).items():
        weight = convs[leader].weight
        n = weight.shape[0]
        if lp.criterion == "group":  # ranks the whole coupled group's weights, not the leader's alone
            weight = graph.group_norms(model, leader).unsqueeze(1)
        try:
            kept[leader] = select_filters(
                weight, lp.keep_count(n), lp.criterion, seed=layer_seed(seed, leader), keep_idx=lp.keep
            )
        except SlimError as e:
            raise SlimError(f"policy: layer {name!r}: {e}") from None
    return kept


def kept_indices(
    model: nn.Module, policy: Policy, *, example_input: InputSpec = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Sorted kept filter indices (original indexing) of every conv the policy prunes, group members
    included: what ``apply_policy`` keeps. Does not modify ``model``."""
    policy.validate(model)
    graph = model_graph(model, example_input)
    out: dict[str, torch.Tensor] = {}
    for leader, idx in _kept(graph, model, policy, seed).items():
        for member in graph.groups.get(leader, [leader]):
            out[member] = idx.clone()
    return out


def _decompose(
    model: nn.Module, policy: Policy, cache: DecompositionCache | None, seed: int, graph: ModelGraph
) -> None:
    for name, lp in policy.layers.items():
        if lp.decomposition == "none":
            continue
        if not graph.layers[name].decomposable:
            raise SlimError(f"policy: layer {name!r} cannot be decomposed (groups={graph.layers[name].groups})")
        conv = model.get_submodule(name)
        t, s, kh, kw = conv.weight.shape
        try:
            rank = choose_rank(conv, lp.decomposition, lp.rank, lp.rank_ratio, layer_name=name)
            new = decompose_conv(conv, lp.decomposition, rank, cache=cache, layer_name=name, seed=seed)
        except SlimError as e:
            raise SlimError(f"policy: {e} (after pruning the layer's kernel is {t}x{s}x{kh}x{kw})") from None
        model.set_submodule(name, new)


def apply_policy(
    model: nn.Module,
    policy: Policy,
    *,
    example_input: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    cache: DecompositionCache | None = None,
    seed: int = 0,
    check: bool = True,
    round_to: int | None = None,
) -> nn.Module:
    """A new model (eval mode) with ``policy`` applied; ``model`` itself is never modified.

    ``example_input`` / ``input_shape`` (batch first) tell how to trace the model; default 1×C×32×32.
    ``cache`` holds decompositions (default: ``core.decompose.default_cache()``). ``seed`` drives the
    random criterion (per layer via ``layer_seed``) and the CP initialisation. ``check`` runs one forward
    pass (shapes only, see ``_shape_forward``) and raises ``RuntimeError`` if a layer no longer fits its input
    or the output shape changed (a bug, never expected). Bad policies
    (unknown layer, out-of-range values, pruning a non-prunable layer, ranks above the post-pruning full
    rank) raise ``SlimError``. ``round_to`` N: every pruned group keeps a multiple of N filters
    (``core.rounding.round_policy``; a search stores the rounded policy, so its exports rebuild without it).
    """
    if not isinstance(policy, Policy):
        raise SlimError(f"apply_policy needs a Policy, got {type(policy).__name__}")
    policy.validate(model)
    spec: InputSpec = example_input if example_input is not None else input_shape
    if round_to is not None and round_to != 1:
        from slimsearch.core.rounding import round_policy

        policy = round_policy(model, policy, round_to, spec)
    graph = model_graph(model, spec)
    kept = _kept(graph, model, policy, seed)
    new = clone_model(model)
    if kept:
        cut(new, kept, graph)
    if any(lp.decomposition != "none" for lp in policy.layers.values()):
        _decompose(new, policy, default_cache() if cache is None else cache, seed, graph)
    if any(m.training for m in new.modules()):
        new.eval()
    if check and graph.output_shape is not None:
        x = torch.zeros(graph.input_shape, dtype=graph.template_dtype, device=graph.template_device)
        out = _shape_forward(new, x, model)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != graph.output_shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(
                f"apply_policy produced output {got}, expected {graph.output_shape}: policy {policy.hash}"
            )
    return new


def structure_only(model: nn.Module, policy: Policy, *, input_shape: Sequence[int] | None = None,
                   seed: int = 0) -> nn.Module:  # fmt: skip
    """``apply_policy``'s model with each decomposed layer replaced by UNTRAINED factor layers of its ranks.

    Same layers, shapes, MACs and params as the real result without factorising (CP-ALS can take seconds a
    layer): what gating on the MACs bound and fitting a policy onto it need. Not for inference.
    """
    pruned = Policy({n: replace_layer(lp, decomposition="none", rank=None, rank_ratio=None)
                     for n, lp in policy.layers.items()})  # fmt: skip
    policy.validate(model)
    new = apply_policy(model, pruned, input_shape=input_shape, seed=seed, check=False)
    for name, lp in policy.layers.items():
        if lp.decomposition != "none":
            conv = new.get_submodule(name)
            rank = choose_rank(conv, lp.decomposition, lp.rank, lp.rank_ratio, layer_name=name)
            new.set_submodule(name, layer_structure(conv, lp.decomposition, rank))
    return new.eval()


def model_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s parameters and buffers (names, dtypes, shapes, values).

    Two policies can build the same network: a criterion or cluster count on a layer that loses no filter,
    L1 and FPGM choosing the same filters, a rate that rounds to the same count. Their evaluations are the
    same, so the evaluator reuses one result per digest and the export's top-k compares distinct networks.
    """
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _shape_forward(new: nn.Module, x: torch.Tensor, original: nn.Module) -> object:
    """``new(x)`` under ``no_grad`` for the output-shape check, without convolution arithmetic.

    The check guards against surgery bugs, which show as shapes: a layer that no longer fits its input, or a
    changed output shape. Every op but the convolutions runs for real (BN, linear, adds, concat raise on a
    channel mismatch); each plain ``nn.Conv2d`` returns ``core.cost.conv_zeros`` (zeros of its exact output
    shape, given only once ATen's own shape rules for that call hold) or else runs for real. So the output
    shape is the real forward's and the check fails where the real one would, at half the cost of a real
    forward on a ResNet-56. If anything raises, the real forward runs, so the check never fails where a
    real forward succeeds.

    The convs' ``forward`` is overridden on the instance for the duration (cheaper than a TorchFunctionMode):
    ``new`` is private to ``apply_policy`` until it returns, and a module shared with ``original`` (none
    are, by construction) would be left alone.
    """
    shared = {id(m) for m in original.modules()}
    convs = [
        m
        for m in new.modules()
        if type(m) is nn.Conv2d and id(m) not in shared and "forward" not in m.__dict__ and m.padding_mode == "zeros"
    ]
    patched: list[nn.Conv2d] = []
    try:
        for m in convs:
            m.forward = partial(_conv_shape_only, m)
            patched.append(m)
        with torch.no_grad():
            return new(x)
    except Exception:
        pass  # the real forward below raises if the model is really broken
    finally:
        for m in patched:
            del m.forward
    with torch.no_grad():
        return new(x)


def _conv_shape_only(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    out = None
    if not isinstance(conv.padding, str):
        out = conv_zeros(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return nn.Conv2d.forward(conv, x) if out is None else out


def masked_model(
    model: nn.Module, kept: Mapping[str, Sequence[int] | torch.Tensor], *, example_input: InputSpec = None
) -> nn.Module:
    """A copy of ``model`` whose removed filters (those not in ``kept[name]``) are zeroed together with
    their BN weight/bias/running mean, without removing anything: in eval mode it computes exactly what
    the pruned model computes (the reference for surgery tests). ``model`` is not modified."""
    new = copy.deepcopy(model)
    masked_model_inplace(new, kept, example_input=example_input, graph=model_graph(model, example_input))
    return new.eval()
