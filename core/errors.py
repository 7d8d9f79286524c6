"""Errors the user can fix: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class SlimError(Exception):
    """Bad input (study file, model, checkpoint, data path, policy...).

    The message must say what is wrong and where, in one line.
    """
