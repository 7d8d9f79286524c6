"""How to point another tool (optuna-dashboard) at a study's storage without printing its password.

A masked URL (``postgresql://slim:***@host/db``) cannot be pasted; the password-free URL plus the variable the
database driver reads the password from can. PostgreSQL drivers (libpq: psycopg, psycopg2) read ``PGPASSWORD``
(or ``~/.pgpass``) when the URL has none.
"""

from __future__ import annotations

import shlex


def without_password(url: str) -> tuple[str, bool]:
    """``url`` with its password removed, and whether it had one."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # validated at load time; never show an unparsable URL
        return "<storage URL>", False
    if u.password is None:
        return url, False
    return u._replace(password=None).render_as_string(hide_password=False), True


def dashboard_command(url: str) -> str:
    """A command line that opens the study in optuna-dashboard, with the password supplied from the
    environment rather than printed."""
    plain, had = without_password(url)
    if not had:
        return f"optuna-dashboard {shlex.quote(plain)}"
    if plain.startswith("postgresql"):
        return f"PGPASSWORD=<password> optuna-dashboard {shlex.quote(plain)}  (or put the password in ~/.pgpass)"
    return (f"optuna-dashboard '<the [study] storage URL with its password>'  (e.g. optuna-dashboard \"$VAR\" with the "
            f"URL in an environment variable; without the password: {plain})")  # fmt: skip
