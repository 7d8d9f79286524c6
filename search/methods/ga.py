"""GA channel selection (METHODS.md §3; Hu et al. 2018, arXiv 1805.11394).

Stated: layers are pruned one by one in order of sensitivity; WHICH channels stay is a search solved by a
genetic algorithm over binary chromosomes (one gene per channel, Bernoulli initial population) whose fitness
is the squared error of the NEXT layer's pre-activation output, with a "two-step approximation"; KD
fine-tuning follows. [inferred]: everything below marked as a parameter with its default.

Fitness of a mask m (exactly k ones) on captured consumer inputs X (B images, after BN/ReLU/pooling, taken
with a forward hook on the consumer conv) is −||Y − conv(X ⊙ m)||² with Y = conv(X), i.e. −||conv(X ⊙ (1−m))||²
(the bias cancels). The conv is linear in its input channels, so with Z_c = the contribution of channel c
at the sampled output positions, the error is (1−m)ᵀ G (1−m) with the Gram matrix G_cc' = <Z_c, Z_c'>: exact
for the sample, and a whole population is scored by one matrix product. Two-step approximation: step 1
samples ``samples`` images, step 2 ``positions`` random output positions per image; every chromosome gets
the cheap score on the first ``cheap_fraction`` of the images, the top ``rescore`` (default: elite) are
re-scored on all of them, and elites and the returned best are chosen by the re-scored error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy, rate_for_removed
from slimsearch.search.methods.common import (
    DEFAULT_SCAN_RATES,
    CountingAcc,
    MethodResult,
    admissible_rate,
    conv_modules,
    cost_report,
    sensitivity_order,
    sensitivity_scan,
)
from torch import Tensor, nn

# Modules/functions that act on each channel separately: removing an input channel of the consumer is then
# the same as zeroing that channel of X.
_PER_CHANNEL_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_PER_CHANNEL_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, torch.sigmoid, torch.tanh,
    F.max_pool2d, F.avg_pool2d, F.dropout, F.batch_norm,
}  # fmt: skip
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


@dataclass
class GAResult:
    """Best mask (bool, one gene per channel, exactly k True), its re-scored error and per-generation best."""

    mask: Tensor
    error: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0


def channel_gram(X: Tensor, conv: nn.Conv2d, positions: int | None = 10, *, seed: int = 0) -> tuple[Tensor, int]:
    """Gram matrix G (c × c, float64) of the per-input-channel contributions of ``conv`` on ``X`` at
    ``positions`` random output positions per image (None: all), and the number of output values summed.

    ||conv(X ⊙ u)||² − (bias terms) = uᵀ G u for any channel weighting u, on the sampled positions.
    """
    if conv.groups != 1:
        raise SlimError(f"GA fitness needs an ungrouped consumer conv, got groups={conv.groups}")
    B, c = X.shape[:2]
    if c != conv.in_channels:
        raise SlimError(f"GA fitness: X has {c} channels but the consumer conv reads {conv.in_channels}")
    w = conv.weight.detach().to(torch.float64)
    t, _, kh, kw = w.shape
    w = w.reshape(t, c, kh * kw)
    cols = F.unfold(X.detach().to(torch.float64), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    n_pos = cols.shape[-1]
    if positions is not None and positions < n_pos:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.stack([torch.randperm(n_pos, generator=gen)[:positions] for _ in range(B)])  # B x P
        cols = cols.gather(2, idx[:, None, :].expand(B, cols.shape[1], positions))
    p = cols.shape[-1]
    cols = cols.reshape(B, c, kh * kw, p)
    gram = torch.zeros(c, c, dtype=torch.float64)
    chunk = max(1, 4_000_000 // max(1, c * t * p))
    for s in range(0, B, chunk):
        z = torch.einsum("bckp,tck->cbtp", cols[s : s + chunk], w).reshape(c, -1)
        gram += z @ z.T
    return gram, B * t * p


def _errors(masks: Tensor, gram: Tensor, count: int) -> Tensor:
    """Mean squared reconstruction error of each row mask: (1−m)ᵀ G (1−m) / count."""
    u = 1.0 - masks.to(torch.float64)
    return ((u @ gram) * u).sum(dim=1) / count


def _repair(masks: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Exactly k ones per row: keep random ones first, then add random zeros (score = bit + U[0,1))."""
    score = masks.to(torch.float64) + torch.rand(masks.shape, generator=gen, dtype=torch.float64)
    top = score.topk(k, dim=1).indices
    return torch.zeros_like(masks, dtype=torch.bool).scatter_(1, top, True)


def reconstruction_error(X: Tensor, conv: nn.Conv2d, mask: Tensor) -> float:
    """||conv(X) − conv(X ⊙ m)||² summed over all outputs, computed directly (for checks and reports)."""
    with torch.no_grad():
        y = conv(X)
        y_m = conv(X * mask.to(X.dtype).view(1, -1, 1, 1))
    return float(((y - y_m).double() ** 2).sum())


def ga_search(
    X: Tensor,
    next_conv: nn.Conv2d,
    k: int,
    *,
    pop: int = 50,
    generations: int = 50,
    elite: int = 2,
    crossover: float = 0.8,
    mutation: float | None = None,
    tournament: int = 3,
    positions: int | None = 10,
    cheap_fraction: float = 0.25,
    rescore: int | None = None,
    seed: int = 0,
) -> GAResult:
    """GA over channel masks with exactly ``k`` ones minimising the consumer's reconstruction error.

    ``X``: inputs of ``next_conv`` (B × c × H × W) from the unpruned model. Elitism ``elite``, tournament
    selection of size ``tournament`` on the cheap score, uniform crossover with probability ``crossover``,
    bit-flip mutation with probability ``mutation`` per gene (default 1/c), repair to exactly k ones.
    """
    c = X.shape[1]
    if not 1 <= k <= c:
        raise SlimError(f"GA: k must be in 1..{c} (channels), got {k}")
    if pop < 2 or generations < 0 or not 0 <= elite < pop or tournament < 1 or not 0 <= crossover <= 1:
        raise SlimError(f"GA: bad parameters pop={pop} generations={generations} elite={elite} tournament={tournament}")
    if k == c:
        return GAResult(torch.ones(c, dtype=torch.bool), 0.0, [], 0)
    gen = torch.Generator().manual_seed(seed)
    n_cheap = max(1, min(X.shape[0], math.ceil(cheap_fraction * X.shape[0])))
    g_cheap, n_c = channel_gram(X[:n_cheap], next_conv, positions, seed=seed)
    g_full, n_f = channel_gram(X, next_conv, positions, seed=seed + 1)
    n_rescore = max(1, elite, rescore or 0)
    mut = 1.0 / c if mutation is None else mutation

    population = _repair(torch.rand(pop, c, generator=gen) < k / c, k, gen)
    best_mask, best_err = population[0], math.inf
    history: list[float] = []
    evaluations = 0
    for g in range(generations + 1):
        cheap = _errors(population, g_cheap, n_c)
        top = cheap.argsort()[:n_rescore]
        full = _errors(population[top], g_full, n_f)
        evaluations += pop + len(top)
        order = full.argsort()
        if float(full[order[0]]) < best_err:
            best_err, best_mask = float(full[order[0]]), population[top[order[0]]].clone()
        history.append(best_err)
        if g == generations:
            break
        elites = population[top[order[:elite]]]
        n_child = pop - elite
        contenders = torch.randint(0, pop, (2, n_child, tournament), generator=gen)
        winners = contenders.gather(2, cheap[contenders].argmin(dim=2, keepdim=True)).squeeze(2)
        p1, p2 = population[winners[0]], population[winners[1]]
        cross = torch.rand(n_child, 1, generator=gen) < crossover
        pick = torch.rand(n_child, c, generator=gen) < 0.5
        children = torch.where(cross & pick, p2, p1)
        children ^= torch.rand(n_child, c, generator=gen) < mut
        population = torch.cat([elites, _repair(children, k, gen)])
    return GAResult(best_mask, best_err, history, evaluations)


def ga_mask(
    X: Tensor,
    next_conv: nn.Conv2d,
    k: int,
    *,
    pop: int = 50,
    generations: int = 50,
    elite: int = 2,
    crossover: float = 0.8,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """The GA's best channel mask (bool, exactly ``k`` True); see ``ga_search`` for the options."""
    return ga_search(
        X, next_conv, k, pop=pop, generations=generations, elite=elite, crossover=crossover, seed=seed, **options
    ).mask


def plain_consumers(model: nn.Module, layers: Sequence[str]) -> dict[str, str | None]:
    """For each layer, the single ungrouped conv that reads its output through per-channel ops only
    (BN, activations, pooling, dropout), or None (residual adds, concatenation, linear heads, several
    consumers, or a model torch.fx cannot trace)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # any tracing failure of a user model: the GA falls back for every layer
        return dict.fromkeys(layers)
    modules = dict(gm.named_modules())
    starts = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in layers}
    out: dict[str, str | None] = {}
    for name in layers:
        out[name] = _consumer(starts.get(name), modules) if name in starts else None
    return out


def _consumer(start: Any, modules: Mapping[str, nn.Module]) -> str | None:
    found: set[str] = set()
    stack, seen = list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    return None
                found.add(node.target)
                continue
            if not isinstance(mod, _PER_CHANNEL_MODULES):
                return None
        elif node.op == "call_function":
            if node.target not in _PER_CHANNEL_FUNCTIONS:
                return None
        elif node.op == "call_method":
            if node.target not in _PER_CHANNEL_METHODS:
                return None
        else:  # output, placeholder, get_attr
            return None
        stack.extend(node.users)
    return found.pop() if len(found) == 1 else None


def capture_input(model: nn.Module, module_name: str, inputs: Tensor, batch_size: int = 128) -> Tensor:
    """Input of ``module_name`` on ``inputs`` (eval mode, no grad), captured with a forward pre-hook."""
    module = dict(model.named_modules())[module_name]
    parts: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: parts.append(args[0].detach()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for s in range(0, inputs.shape[0], batch_size):
                model(inputs[s : s + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(parts)


def ga_select(
    model: nn.Module,
    layers: Sequence[str],
    acc: Callable[[Policy], Any],
    inputs: Tensor,
    *,
    rates: Mapping[str, float] | None = None,
    scan_rates: Sequence[float] = DEFAULT_SCAN_RATES,
    tol: float | Mapping[str, float] = 0.01,
    scan_criterion: str = "l1",
    samples: int = 256,
    positions: int | None = 10,
    pop: int = 50,
    generations: int = 50,
    elite: int = 2,
    crossover: float = 0.8,
    finetune: Callable[[nn.Module, Policy], nn.Module] | None = None,
    apply: Callable[[nn.Module, Policy], nn.Module] | None = None,
    fallback: str | None = "l1",
    final_eval: bool = True,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
) -> MethodResult:
    """GA channel selection layer by layer, least sensitive layer first.

    ``layers``: prunable, uncoupled conv names (forward order). ``rates``: per-layer prune rates; when None a
    sensitivity scan (each layer alone at ``scan_rates`` with ``scan_criterion``) gives them (largest rate
    whose drop and all lower rates' drops are ≤ ``tol``) and the order. ``inputs``: normalised images; the
    first ``samples`` feed the fitness. ``finetune(model, policy) -> model``: KD fine-tune hook after each
    layer (teacher = the original model is the hook's business). ``apply(model, policy)`` defaults to
    core.apply.apply_policy. Layers without a plain conv consumer use ``fallback`` (None: left unpruned).
    Output: criterion "mask" with explicit ``keep`` indices.
    """
    if not layers:
        raise SlimError("ga: no layers to prune")
    if apply is None:
        from slimsearch.core.apply import apply_policy

        example = inputs[:1]

        def apply(m: nn.Module, p: Policy) -> nn.Module:
            return apply_policy(m, p, example_input=example)

    convs = conv_modules(model, layers)
    counted = CountingAcc(acc)
    a0 = counted(Policy())
    scan = None
    if rates is None:
        scan = sensitivity_scan(model, layers, counted, rates=scan_rates, criterion=scan_criterion, a0=a0)
        tols = tol if isinstance(tol, Mapping) else dict.fromkeys(layers, tol)
        rates = {n: admissible_rate(scan[n], tols[n]) for n in layers}
        order = sensitivity_order(scan, layers)
    else:
        missing = [n for n in layers if n not in rates]
        if missing:
            raise SlimError(f"ga: no rate given for layer {missing[0]!r}")
        order = list(layers)
    consumers = plain_consumers(model, layers)
    x = inputs[:samples]
    current, policy = model, Policy()
    decisions: dict[str, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []
    for i, name in enumerate(order):
        c = convs[name].out_channels
        k = max(1, min(c, round((1 - rates[name]) * c)))
        entry: dict[str, Any] = {"rate": rates[name], "filters": c, "keep": k, "consumer": consumers[name]}
        decisions[name] = entry
        if k == c:
            entry["action"] = "none"
            continue
        if consumers[name] is not None:
            X = capture_input(current, consumers[name], x)
            next_conv = dict(current.named_modules())[consumers[name]]
            res = ga_search(X, next_conv, k, pop=pop, generations=generations, elite=elite, crossover=crossover,
                            positions=positions, seed=seed + i)  # fmt: skip
            keep = tuple(int(j) for j in res.mask.nonzero().flatten())
            lp = LayerPolicy(prune_rate=rate_for_removed(c - k, c), criterion="mask", keep=keep)
            entry.update(action="ga", error=res.error, evaluations=res.evaluations)
            history.append({"layer": name, "best_error_per_generation": res.history})
        elif fallback is not None:
            lp = LayerPolicy(prune_rate=rate_for_removed(c - k, c), criterion=fallback)
            entry["action"] = f"fallback:{fallback}"
        else:
            entry["action"] = "skipped: no plain conv consumer"
            continue
        policy = policy.with_layer(name, lp)
        current = apply(current, Policy({name: lp}))
        if finetune is not None:
            current = finetune(current, policy)

    report: dict[str, Any] = {
        "a0": a0,
        "order": order,
        "layers": decisions,
        "tol": dict(tol) if isinstance(tol, Mapping) else tol,
    }
    if scan is not None:
        report["sensitivity"] = scan
    if final_eval:
        report["final_acc"] = counted(policy)
    report["evaluator_calls"] = counted.calls
    if input_shape is not None:
        report["cost"] = cost_report(model, policy, input_shape, apply=apply)
    return MethodResult("ga", policy, report, history)
