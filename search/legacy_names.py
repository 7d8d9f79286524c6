"""Module names from before the package rename (``search.ray_runner`` -> ``slimsearch.search.ray_runner``), for
unpickling what older versions wrote: a Ray Tune experiment's ``tuner.pkl`` and searcher state hold the search
algorithm's classes by module and name."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

# Top-level packages this project installed before everything moved under ``slimsearch`` (issue 21).
LEGACY_PACKAGES = ("core", "spaces", "evaluators", "search")


class _LegacyNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``search.ray_runner`` & co. (the names in pickles written before the rename) to the
    ``slimsearch.*`` modules themselves, so unpickled objects get today's classes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] not in LEGACY_PACKAGES or importlib.util.find_spec(f"slimsearch.{name}") is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(f"slimsearch.{spec.name}")
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Imported already; the import system gave it the alias's __spec__: put its own back.
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


@contextlib.contextmanager
def legacy_module_names() -> Iterator[None]:
    """While restoring an experiment: old module names (``search.ray_runner``) import as their ``slimsearch.*``
    modules, so ``tuner.pkl`` and searcher states pickled before the rename load. Whatever those names meant
    before (another package of that name, a checkout's folder on sys.path) is put back afterwards."""

    def legacy(name: str) -> bool:
        return name.split(".")[0] in LEGACY_PACKAGES

    finder = _LegacyNames()
    stashed = {n: sys.modules.pop(n) for n in [n for n in sys.modules if legacy(n)]}
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for n in [n for n in sys.modules if legacy(n)]:
            del sys.modules[n]
        sys.modules.update(stashed)
