"""MTD — mixed tensor decomposition (METHODS.md §2; Liang, NTHU 2020).

Stated: CP and Tucker are studied per layer, MTD chooses per layer, fine-tuning recovers accuracy.
[inferred] switching rule ("time to change decomposition method"), forward order:

    a0 = acc(M0); method = CP; M = M0
    for conv layer l (the first layer is skipped when it reads the C=3 image):
        if method == CP:
            M' = replace(M, l, CP(W_l, rank_l)); short fine-tune
            if a0 − acc(M') ≤ tol: M = M'; continue
            method = TUCKER                  # from here on, Tucker
        M = replace(M, l, Tucker2(W_l, ranks_l)); short fine-tune

Layers after the switch are not evaluated (the rule does not look at them); one final evaluation of the
whole policy is reported. The "short fine-tune" is the evaluator's: when ``acc`` already fine-tunes briefly
(evaluator kind "finetune" with a low lr, e.g. 1e-4) nothing else is needed; ``on_step(policy)`` is called
after every accepted step for evaluators that carry state between steps. Ranks are fixed in the policy
(explicit ``rank``), from a ratio of the full rank or EVBMF (core.decompose.choose_rank).
Compression ratio = params(original)/params(compressed), whole model, computed from the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.methods.common import (
    CountingAcc,
    MethodResult,
    conv_modules,
    cost_report,
    params_after_decomposition,
)
from torch import nn

RankSpec = int | float | tuple[int, int] | Callable[[str, nn.Conv2d], Any] | None


def resolve_rank(name: str, conv: nn.Conv2d, method: str, spec: RankSpec) -> int | tuple[int, int]:
    """Explicit rank for ``conv`` from ``spec``: None -> EVBMF, float in (0, 1] -> ratio of the full rank
    (CP: of the param-neutral rank), int (CP) / (R_in, R_out) (Tucker) -> as given (clipped to the layer),
    callable(name, conv) -> any of these."""
    from slimsearch.core.decompose import choose_rank

    if callable(spec):
        spec = spec(name, conv)
    if spec is None:
        return choose_rank(conv, method, layer_name=name)
    if isinstance(spec, float):
        return choose_rank(conv, method, rank_ratio=spec, layer_name=name)
    t, s = conv.out_channels, conv.in_channels
    if method == "cp" and isinstance(spec, int) and not isinstance(spec, bool):
        from slimsearch.core.decompose import full_ranks

        return choose_rank(conv, "cp", min(spec, int(full_ranks(conv)["cp"])), layer_name=name)
    if method == "tucker" and isinstance(spec, (tuple, list)) and len(spec) == 2:
        return choose_rank(conv, "tucker", (min(int(spec[0]), s), min(int(spec[1]), t)), layer_name=name)
    raise SlimError(f"mtd: layer {name!r}: bad {method} rank spec {spec!r}")


def _ratio(spec: RankSpec) -> float | None:
    """The rank ratio to record beside the explicit rank (a search space expresses ranks only as ratios)."""
    return spec if isinstance(spec, float) else None


def _skip_reason(i: int, conv: nn.Conv2d, skip_rgb_first: bool) -> str | None:
    if i == 0 and skip_rgb_first and conv.in_channels <= 3:
        return f"first layer reads the image (C={conv.in_channels})"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if conv.kernel_size[0] * conv.kernel_size[1] == 1:
        return "1x1 conv (CP saves nothing)"
    return None


def mtd_search(
    model: nn.Module,
    layers: Sequence[str],
    acc: Callable[[Policy], Any],
    *,
    tol: float = 0.01,
    cp_rank: RankSpec = None,
    tucker_ranks: RankSpec = None,
    skip_rgb_first: bool = True,
    on_step: Callable[[Policy], None] | None = None,
    final_eval: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> MethodResult:
    """Per-layer CP-or-Tucker-2 choice by MTD's switching rule.

    ``layers``: decomposable conv names in FORWARD order. ``acc(policy)`` -> accuracy (float or EvalResult);
    ``tol``: tolerated loss as a fraction (0.01 = 1 pt) against a0 = acc(empty policy). ``cp_rank`` /
    ``tucker_ranks``: see ``resolve_rank`` (None = EVBMF). With ``input_shape`` the report also holds MACs
    and params measured on the applied policy (needs core.apply; CP on big layers takes seconds).
    """
    if not layers:
        raise SlimError("mtd: no layers to decompose")
    if tol < 0:
        raise SlimError(f"mtd: tol must be >= 0 (a fraction, 0.01 = 1 pt), got {tol!r}")
    convs = conv_modules(model, layers)
    counted = CountingAcc(acc)
    a0 = counted(Policy())
    policy = Policy()
    method = "cp"
    switched_at: str | None = None
    history: list[dict[str, Any]] = []
    decisions: dict[str, dict[str, Any]] = {}

    for i, name in enumerate(layers):
        conv = convs[name]
        reason = _skip_reason(i, conv, skip_rgb_first)
        if reason:
            decisions[name] = {"method": "none", "skipped": reason}
            continue
        if method == "cp":
            rank = resolve_rank(name, conv, "cp", cp_rank)
            trial = policy.with_layer(name, LayerPolicy(decomposition="cp", rank=rank, rank_ratio=_ratio(cp_rank)))
            a = counted(trial)
            ok = a0 - a <= tol
            history.append({"layer": name, "method": "cp", "rank": rank, "acc": a, "accepted": ok})
            if ok:
                policy = trial
                decisions[name] = {"method": "cp", "rank": rank, "acc": a}
                if on_step:
                    on_step(policy)
                continue
            method, switched_at = "tucker", name
        ranks = resolve_rank(name, conv, "tucker", tucker_ranks)
        lp = LayerPolicy(decomposition="tucker", rank=tuple(ranks), rank_ratio=_ratio(tucker_ranks))
        policy = policy.with_layer(name, lp)
        history.append({"layer": name, "method": "tucker", "rank": list(ranks), "acc": None, "accepted": True})
        decisions[name] = {"method": "tucker", "rank": list(ranks)}
        if on_step:
            on_step(policy)

    base_params = sum(p.numel() for p in model.parameters())
    new_params = params_after_decomposition(model, policy)
    report: dict[str, Any] = {
        "a0": a0,
        "tol": tol,
        "switched_at": switched_at,
        "layers": decisions,
        "n_cp": sum(d["method"] == "cp" for d in decisions.values()),
        "n_tucker": sum(d["method"] == "tucker" for d in decisions.values()),
        "base_params": base_params,
        "params": new_params,
        "params_ratio": base_params / new_params,
    }
    if final_eval:
        report["final_acc"] = counted(policy)
    report["evaluator_calls"] = counted.calls
    if input_shape is not None:
        report["cost"] = cost_report(model, policy, input_shape)
    return MethodResult("mtd", policy, report, history)
