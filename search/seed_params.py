"""The [seeds] strategies a study file may name, and the load-time checks of their parameters; the registry
``search.seeding`` attaches the strategy functions to (and other code adds its own strategies to, with
``register_seed_strategy``). Apart from ``search.seeding`` so that reading a study file needs no strategy code."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.policy import CRITERIA
from slimsearch.search.methods import METHODS, abshpc_search, distfit_search, ga_select, mtd_search

METHOD_STRATEGIES = ("abshpc", "mtd", "ga", "distfit")


_METHOD_FNS: dict[str, Callable[..., Any]] = {
    "abshpc": abshpc_search, "mtd": mtd_search, "ga": ga_select, "distfit": distfit_search,
}  # fmt: skip


# Supplied by the adapter (or hooks a study file cannot express), never by [seeds] parameters.
_RESERVED = {"model", "layers", "acc", "inputs", "input_shape", "finetune", "apply", "on_step"}


# name -> fn(study_context, params) -> list[Policy]; params are the strategy's keys from [seeds]
# (``<name>_<param> = ...`` or a ``[seeds.<name>]`` table). This module fills it; other modules (a benchmark's
# own strategy) add theirs with ``register_seed_strategy``.
SEED_STRATEGIES: dict[str, Callable[..., list[Any]]] = {}


# Optional checks run at load time: fn(params, where) raises SlimError for bad parameters.
SEED_PARAM_CHECKS: dict[str, Callable[[Mapping[str, Any], str], None]] = {}


def register_seed_strategy(
    name: str, check: Callable[[Mapping[str, Any], str], None] | None = None
) -> Callable[[Callable[..., list[Any]]], Callable[..., list[Any]]]:
    """Decorator: make ``fn(ctx, params) -> list[Policy]`` available as ``[seeds] strategies = [name]``."""

    def deco(fn: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        SEED_STRATEGIES[name] = fn
        if check is not None:
            SEED_PARAM_CHECKS[name] = check
        return fn

    return deco


def _fractions_ok(values: Any) -> bool:
    """A non-empty list of plain numbers in [0, 1)."""
    return (
        isinstance(values, list)
        and 0 < len(values) <= MAX_OPTION_LIST
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values)
    )


def _check_uniform(params: Mapping[str, Any], where: str) -> None:
    allowed = ("rates", "criterion")
    for key in params:
        if key not in allowed:
            raise SlimError(f"{where} uniform_{key}: unknown parameter; allowed: uniform_rates, uniform_criterion")
    rates = params.get("rates", [0.3, 0.5])
    if not _fractions_ok(rates):
        raise SlimError(f"{where} uniform_rates: expected a non-empty list of rates in [0, 1), got {rates!r}")
    crit = params.get("criterion", "l1")
    if crit not in CRITERIA or crit == "mask":
        allowed_c = ", ".join(c for c in CRITERIA if c != "mask")
        raise SlimError(f"{where} uniform_criterion: unknown criterion {crit!r}; allowed: {allowed_c}")


def _check_fractions_and_criterion(
    params: Mapping[str, Any], where: str, name: str, list_key: str, criterion: str, zero_ok: bool = True
) -> None:
    """[seeds] ``<name>_<list_key>`` (fractions, default [0.5]) and ``<name>_criterion`` (l1, l2, fpgm)."""
    for key in params:
        if key not in (list_key, "criterion"):
            raise SlimError(f"{where} {name}_{key}: unknown parameter; allowed: {name}_{list_key}, {name}_criterion")
    fr = params.get(list_key, [0.5])
    if not _fractions_ok(fr) or (not zero_ok and 0 in fr):
        span = "[0, 1)" if zero_ok else "(0, 1)"
        raise SlimError(f"{where} {name}_{list_key}: expected a non-empty list of fractions in {span}, got {fr!r}")
    crit = params.get("criterion", criterion)
    if crit not in ("l1", "l2", "fpgm", "group"):
        raise SlimError(f"{where} {name}_criterion: {crit!r} is not one of l1, l2, fpgm, group")


def _check_global(params: Mapping[str, Any], where: str) -> None:
    _check_fractions_and_criterion(params, where, "global", "fractions", "l2")


def _check_tp_global(params: Mapping[str, Any], where: str) -> None:
    _check_fractions_and_criterion(params, where, "tp_global", "ratios", "fpgm", zero_ok=False)


def allowed_params(name: str) -> list[str]:
    """The [seeds] / ``--set`` option names method ``name`` accepts (its function's keyword-only parameters)."""
    sig = inspect.signature(_METHOD_FNS[name])
    names = [p for p, v in sig.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    return sorted(set(names) - _RESERVED)


MAX_OPTION_INT = 1_000_000  # |value| of a numeric method option (generations, population, steps...)
MAX_OPTION_SEED = 2**32 - 1  # an option named *seed*
MAX_OPTION_LIST = 10_000  # values in a list option (also [seeds] uniform_rates and the like)


def _check_value(name: str, key: str, value: Any, default: Any, where: str) -> Any:
    """A method option's value checked against the type of the method's default (TOML has no None)."""
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = num
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
    else:  # default None: the method checks the value itself
        ok = True
    if not ok:
        want = type(default).__name__ if not isinstance(default, (tuple, list)) else "list"
        raise SlimError(f"{where}{key}: expected {want} (like the default {default!r}), got {value!r}")
    bound = MAX_OPTION_SEED if "seed" in key else MAX_OPTION_INT
    if num and not (math.isfinite(value) and abs(value) <= bound):  # one number must never start unbounded work
        raise SlimError(f"{where}{key}: must be a finite number with |value| <= {bound}, got {value!r}")
    if isinstance(value, (list, tuple)) and len(value) > MAX_OPTION_LIST:
        raise SlimError(f"{where}{key}: at most {MAX_OPTION_LIST} values, got {len(value)}")
    if isinstance(value, list) and key in ("cp_rank", "tucker_ranks", "scan_rates", "compare"):
        return tuple(value)
    return float(value) if isinstance(default, float) else value


def typed_params(name: str, params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``params`` of method ``name`` checked: known names, values of the type of the method's defaults."""
    allowed = allowed_params(name)
    sig = inspect.signature(_METHOD_FNS[name]).parameters
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            raise SlimError(f"{prefix}{key}: unknown option of method {name}; allowed: {', '.join(allowed)}")
        out[key] = _check_value(name, key, value, sig[key].default, prefix)
    return out


def _strict_check(name: str) -> Callable[[Mapping[str, Any], str], None]:
    def check(params: Mapping[str, Any], where: str) -> None:
        typed_params(name, params, f"{where} {name}_")

    return check


def known_strategies() -> list[str]:
    """Every strategy name a study file may use: the built-ins (checked here) and any registered."""
    return sorted(set(SEED_PARAM_CHECKS) | set(SEED_STRATEGIES))


for _name, _check in (("uniform", _check_uniform), ("global", _check_global), ("tp_global", _check_tp_global)):
    SEED_PARAM_CHECKS[_name] = _check
for _name in METHODS:  # names AND value types of the methods' parameters
    SEED_PARAM_CHECKS[_name] = _strict_check(_name)
