"""Declarative study-file tables: one ``Key`` per key (type, bounds, default, doc), one checker, one set of messages.

Every section of a study file is a tuple of ``Key``; ``read_table`` checks a TOML table against it (unknown keys
with a "did you mean" hint, types, bounds, choices) and ``check_value`` checks one value (the config dataclasses
call it from ``check()``). The same tuples render the per-key reference (``markdown``), so docs and code cannot
drift. Every message has the form ``<where> <key>: <what is wrong>, got <value>``; ``where`` is
``"<file>: [section]"`` (or ``"[section]"`` before the file is known). Cross-key rules (two keys that exclude each
other, low <= high) stay in the section's code and use ``fail``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsearch.core.errors import SlimError

# type name -> the phrase messages and docs use
KINDS = {
    "int": "an integer",
    "float": "a number",
    "count_or_fraction": "an integer (a count) or a fraction",
    "bool": "true or false",
    "str": "a string",
    "path": "a path string",
    "choice": "one of",
    "choices": "a list of",
    "strs": "a list of strings",
    "floats": "a list of numbers",
    "range": "[low, high] (two numbers)",
}


@dataclass(frozen=True)
class Key:
    """One key of a study-file section.

    ``type``: a ``KINDS`` name. ``lo``/``hi``: bounds of a number (of each item of ``floats``, of both ends of a
    ``range``); ``lo_open``/``hi_open`` exclude them. ``choices``: the allowed strings of ``choice``/``choices``
    (empty: checked by the section, e.g. a registry). ``default``: the value when absent (``None``: unset).
    """

    name: str
    type: str
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False
    also: tuple[str, ...] = ()  # strings a number key also accepts (e.g. workers = "per-gpu")

    def __post_init__(self) -> None:
        if self.type not in KINDS:
            raise ValueError(f"Key {self.name}: unknown type {self.type!r}")
        if self.type in ("int", "float", "floats", "range") and (self.lo is None or self.hi is None):
            raise ValueError(f"Key {self.name}: every number needs both bounds")

    @property
    def interval(self) -> str:
        """``[1, 1000]``, ``(0, 1]``: the allowed numbers."""
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"

    @property
    def kind(self) -> str:
        """What a value must be, in words (messages and docs)."""
        if self.type in ("choice", "choices") and self.choices:
            return f"{KINDS[self.type]} {', '.join(self.choices)}"
        if self.type == "count_or_fraction":
            return f"an integer in {self.interval} or a fraction in (0, 1)"
        if self.type in ("int", "float"):
            return f"{KINDS[self.type]} in {self.interval}" + "".join(f' or "{a}"' for a in self.also)
        if self.type == "floats":
            return f"a list of numbers in {self.interval}"
        if self.type == "range":
            return f"[low, high] with {_range_rule(self)}"
        return KINDS[self.type]


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x)}"
    return f"{x:g}"


def _range_rule(k: Key) -> str:
    return f"{_num(k.lo)} {'<' if k.lo_open else '<='} low <= high {'<' if k.hi_open else '<='} {_num(k.hi)}"


def tname(v: Any) -> str:
    """The TOML name of a value's type (messages)."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", tuple: "list",
             dict: "table"}  # fmt: skip
    return names.get(type(v), type(v).__name__)


def fail(where: str, key: str | None, msg: str) -> None:
    """Raise the one-line ``SlimError`` of every study-file problem: ``<where> <key>: <msg>``."""
    raise SlimError(f"{where}{f' {key}' if key else ''}: {msg}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _inside(k: Key, v: float) -> bool:
    lo_ok = v > k.lo if k.lo_open else v >= k.lo  # type: ignore[operator]
    hi_ok = v < k.hi if k.hi_open else v <= k.hi  # type: ignore[operator]
    return bool(lo_ok and hi_ok)


def check_value(k: Key, v: Any, where: str) -> Any:
    """``v`` checked against ``k`` and converted (ints to floats for numbers, lists to tuples, paths to absolute
    ``Path``); a wrong value raises ``SlimError`` naming ``where`` and the key. ``None`` is "unset"."""
    if v is None and not k.required:
        return None
    if isinstance(v, str) and v in k.also:
        return v
    phrase = k.kind if k.type in ("choice", "choices", "count_or_fraction") else KINDS[k.type]
    phrase += "".join(f' or "{a}"' for a in k.also)
    bad_type = f"expected {phrase}, got {tname(v)} {v!r}"
    t = k.type
    if t == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            fail(where, k.name, bad_type)
        if not _inside(k, v):
            fail(where, k.name, f"must be in {k.interval}, got {v!r}")
        return v
    if t == "float":
        if not _is_num(v) or not math.isfinite(v):
            fail(where, k.name, bad_type)
        if not _inside(k, v):
            fail(where, k.name, f"must be in {k.interval}, got {v!r}")
        return float(v)
    if t == "count_or_fraction":
        if not _is_num(v):
            fail(where, k.name, bad_type)
        if not ((isinstance(v, int) and _inside(k, v)) or (isinstance(v, float) and 0 < v < 1)):
            fail(where, k.name, f"must be a count in {k.interval} or a fraction in (0, 1), got {v!r}")
        return v
    if t == "bool":
        if not isinstance(v, bool):
            fail(where, k.name, bad_type)
        return v
    if t in ("str", "path", "choice"):
        if not isinstance(v, str):
            fail(where, k.name, bad_type)
        if t == "choice" and k.choices and v not in k.choices:
            fail(where, k.name, f"unknown value {v!r}; allowed: {', '.join(k.choices)}")
        if t == "path":
            if not v:
                fail(where, k.name, f"must not be empty, got {v!r}")
            p = Path(v).expanduser()
            return p if p.is_absolute() else Path.cwd() / p
        return v
    if t in ("strs", "choices"):
        items = (v,) if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            fail(where, k.name, bad_type)
        if t == "choices":
            if not items:
                fail(where, k.name, f"needs at least one value; allowed: {', '.join(k.choices)}")
            for s in items:
                if k.choices and s not in k.choices:
                    fail(where, k.name, f"unknown value {s!r}; allowed: {', '.join(k.choices)}")
            if len(set(items)) != len(items):
                fail(where, k.name, f"duplicate values in {list(items)}")
        return tuple(items)
    if t == "floats":
        if not isinstance(v, (list, tuple)) or not all(_is_num(x) and math.isfinite(x) for x in v):
            fail(where, k.name, bad_type)
        for x in v:
            if not _inside(k, x):
                fail(where, k.name, f"every value must be in {k.interval}, got {x!r}")
        return tuple(float(x) for x in v)
    # range
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) and math.isfinite(x) for x in v)):
        fail(where, k.name, f"expected [low, high] (two numbers), got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if not (_inside(k, lo) and _inside(k, hi) and lo <= hi):
        fail(where, k.name, f"need {_range_rule(k)}, got [{lo}, {hi}]")
    return (lo, hi)


def unknown_key(where: str, key: str, allowed: Sequence[str]) -> None:
    """Raise the "unknown key" message, with a "did you mean" hint when one allowed key is close."""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    fail(where, None, f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def read_table(data: Any, keys: Sequence[Key], where: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Every key of ``keys`` from TOML table ``data``: checked and converted, or its default when absent.

    Keys of ``data`` in neither ``keys`` nor ``extra`` (checked by the caller) are an error, as are missing
    required keys.
    """
    if not isinstance(data, Mapping):
        fail(where, None, f"must be a table, got {tname(data)}")
    names = [k.name for k in keys]
    for key in data:
        if key not in names and key not in extra:
            unknown_key(where, key, [*names, *extra])
    out: dict[str, Any] = {}
    for k in keys:
        if k.name in data:
            out[k.name] = check_value(k, data[k.name], where)
        elif k.required:
            fail(where, k.name, f"is required ({k.kind})")
        else:
            out[k.name] = k.default
    return out


def check_fields(obj: Any, keys: Sequence[Key], where: str) -> None:
    """``check()`` of a config dataclass whose fields are ``keys``: every field value against its key."""
    for k in keys:
        check_value(k, getattr(obj, k.name), where)


def _default(k: Key) -> str:
    d = k.default
    if d is None:
        return "unset"
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, str):
        return f'`"{d}"`'
    if isinstance(d, (list, tuple)):
        return "`[" + ", ".join(f'"{x}"' if isinstance(x, str) else _num(x) for x in d) + "]`"
    return f"`{_num(d)}`" if _is_num(d) else f"`{d}`"


def markdown(section: str, keys: Sequence[Key], intro: str = "") -> str:
    """The reference of one section: a table of key, type and range, default, and what it does."""
    lines = [f"## [{section}]", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| key | type and range | default | what it does |", "| --- | --- | --- | --- |"]
    for k in keys:
        default = "required" if k.required else _default(k)
        lines.append(f"| `{k.name}` | {k.kind} | {default} | {k.doc} |")
    return "\n".join(lines) + "\n"
