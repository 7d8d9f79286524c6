"""Turning a checked TOML table (``core.schema.read_table``) into a frozen config dataclass (spaces/, evaluators/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def build_checked(cls: type[T], kw: Mapping[str, Any], where: str) -> T:
    """An instance of frozen dataclass ``cls`` from ``kw`` (defaults elsewhere), then ``check(where)``.

    Bypasses ``__init__`` so that the error names the table (``where``), not the dataclass default.
    """
    cfg = cls.__new__(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        object.__setattr__(cfg, f.name, kw.get(f.name, f.default))
    cfg.check(where)  # type: ignore[attr-defined]
    return cfg
