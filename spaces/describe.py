"""What a search space searches, in words: every layer it leaves alone and why, and the whole space.

Pure functions of a built ``SearchSpace``: ``slimsearch run`` prints ``exclusion_lines`` once, ``slimsearch
space STUDY`` prints ``describe_space``, and the report's policy chart marks ``exclusions`` differently from
a 0 % choice.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from slimsearch.spaces.space import Param, SearchSpace


def exclusions(space: SearchSpace) -> dict[str, str]:
    """Conv layer name -> why no policy of ``space`` changes it (forward order)."""
    cfg, searched = space.cfg, set(space.layer_names)
    out: dict[str, str] = {}
    for info in space.all_layers:
        name = info.name
        if name in searched:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            out[name] = f"matches no [space] include pattern ({', '.join(cfg.include)})"
        elif hit := next((p for p in cfg.exclude if fnmatch.fnmatchcase(name, p)), None):
            out[name] = f"[space] exclude {hit!r}"
        else:
            why = space.skipped.get(name, "").removeprefix("not pruned: ") or "not prunable"
            if info.decomposable and getattr(info, "groups", 1) != 1:
                why += f"; grouped conv (groups={info.groups}): not decomposed"
            elif not info.decomposable or cfg.decomposition == ("none",):
                why += "; no decomposition searched" if info.decomposable else "; not decomposable"
            out[name] = why
    return out


def pruning_only_skipped(space: SearchSpace) -> dict[str, str]:
    """Searched layers whose filters are never pruned (decomposition only) -> why."""
    searched = set(space.layer_names)
    return {n: r.removeprefix("not pruned: ") for n, r in space.skipped.items() if n in searched}


def exclusion_lines(space: SearchSpace) -> list[str]:
    """What ``slimsearch run`` prints once: the layers left out and why (empty when every layer is searched)."""
    ex, part = exclusions(space), pruning_only_skipped(space)
    lines = []
    if ex:
        lines.append(f"excluded from the search: {len(ex)} of {len(space.all_layers)} conv layers")
        lines += [f"  {n}: {r}" for n, r in ex.items()]
    if part:
        lines.append(f"searched for decomposition only (filters not pruned): {len(part)} layer{'s' * (len(part) > 1)}")
        lines += [f"  {n}: {r}" for n, r in part.items()]
    return lines


def log_exclusions(space: SearchSpace, log: Callable[[str], None]) -> None:
    """``exclusion_lines``, each through ``log`` (``slimsearch run``, once, before the first trial)."""
    for line in exclusion_lines(space):
        log(line)


def _value(v: float | str | Param | None, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, Param):
        if v.kind == "categorical":
            return " | ".join(str(c) for c in v.choices)
        step = f" step {v.step:g}" if v.step else ""
        return f"{fmt.format(v.low)}-{fmt.format(v.high)}{step}"
    return fmt.format(v) if isinstance(v, float) else str(v)


def describe_space(space: SearchSpace) -> str:
    """The whole space: prune units (layers, coupled groups, rate range, criteria), decomposition choices per
    layer, and the excluded layers with reasons."""
    cfg = space.cfg
    groups = sum(1 for u in space.units if len(u.layers) > 1)
    lines = [
        f"search space: {len(space.params)} parameters over {len(space.layers)} of {len(space.all_layers)} conv "
        f"layers; {len(space.units)} prune units ({groups} coupled groups), {len(space.decs)} decomposable layers"
        + ("; rates non-decreasing with depth (monotone)" if cfg.monotone else "")
    ]
    if space.units:
        lines.append("prune units (one rate and one criterion each; a coupled group prunes its layers together):")
        width = max(len(u.key) for u in space.units)
        for u in space.units:
            members = f"  layers: {', '.join(u.layers)}" if len(u.layers) > 1 else ""
            lines.append(f"  {u.key:<{width}}  rate {_value(u.rate)}  criterion {_value(u.criterion)}{members}")
    if space.decs:
        lines.append("decomposition (per layer; the rank ratio matters only when decomposed):")
        width = max(len(d.layer) for d in space.decs)
        for d in space.decs:
            lines.append(f"  {d.layer:<{width}}  {_value(d.dec)}  rank_ratio {_value(d.rank_ratio)}")
    rest = exclusion_lines(space)
    lines += rest if rest else ["every conv layer is searched"]
    return "\n".join(lines)
