"""A study's storage URL: checked (sqlite, postgresql, mysql; sqlite paths made absolute), its SQLite file, and
the form every printed line shows (password masked)."""

from __future__ import annotations

import re
from pathlib import Path

from slimsearch.core.errors import SlimError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for every printed or logged line)."""
    # Up to the LAST '@' of the token: a raw '/', ':' or '@' inside a password must not leak its tail.
    return re.sub(r"(://[^/:@\s'\"]*:)[^\s'\"]*@", r"\1***@", str(url))


def validate_storage_url(url: str, where: str) -> str:
    """Check an RDB URL (sqlite:///path, postgresql://..., mysql://...) and make sqlite paths absolute."""
    shown = mask_url(url)
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise SlimError(f"{where}: malformed storage URL {shown!r} ({e}); expected e.g. sqlite:///runs/x.db or "
                        "postgresql://user:password@host/db") from None  # fmt: skip
    scheme = u.drivername.split("+")[0]
    if scheme not in STORAGE_SCHEMES:
        raise SlimError(f"{where}: unsupported storage {shown!r}; allowed schemes: {', '.join(STORAGE_SCHEMES)}")
    if scheme == "sqlite":
        db = u.database or ""
        if not url.startswith(f"{u.drivername}:///") or db in ("", ":memory:") or u.host:
            raise SlimError(f"{where}: SQLite storage must name a file, as sqlite:///relative/path.db or "
                            f"sqlite:////absolute/path.db; got {shown!r}")  # fmt: skip
        p = Path(db)
        if not p.is_absolute():
            p = Path.cwd() / p
        return f"{u.drivername}:///{p}"
    if not u.host or not u.database:
        raise SlimError(
            f"{where}: storage {shown!r} needs a host and a database name, as {scheme}://user:password@host/db"
        )
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL, else None."""
    if url.startswith("sqlite"):
        return Path(url.split(":///", 1)[1])
    return None
