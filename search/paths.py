"""Checks on the folders a command will write to, made before anything is written (pure; nothing created)."""

from __future__ import annotations

import os
from pathlib import Path

from slimsearch.core.errors import SlimError


def writable_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or created) as a folder to write in, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def check_writable_dir(path: Path, where: str) -> None:
    """``writable_dir_problem`` as a one-line ``SlimError`` naming ``where`` (e.g. ``study.toml: [study] workdir``)."""
    problem = writable_dir_problem(path)
    if problem:
        raise SlimError(f"{where}: {problem}")
