"""Turning a TOML table into a frozen, checked config dataclass (shared by spaces/ and evaluators/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from slimsearch.core.errors import SlimError

T = TypeVar("T")


def known_keys(d: Any, cls: type, where: str) -> None:
    """Raise ``SlimError`` unless ``d`` is a table whose keys are all fields of ``cls``."""
    if not isinstance(d, Mapping):
        raise SlimError(f"{where}: expected a table, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            raise SlimError(f"{where}: unknown key {key!r}; allowed: {', '.join(known)}")


def build_checked(cls: type[T], kw: Mapping[str, Any], where: str) -> T:
    """An instance of frozen dataclass ``cls`` from ``kw`` (defaults elsewhere), then ``check(where)``.

    Bypasses ``__init__`` so that the error names the table (``where``), not the dataclass default.
    """
    cfg = cls.__new__(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        object.__setattr__(cfg, f.name, kw.get(f.name, f.default))
    cfg.check(where)  # type: ignore[attr-defined]
    return cfg
