"""ResultCache: evaluation results keyed by (context fingerprint, evaluator config, policy hash).

In memory always; optionally persisted, either as one JSON-lines file (``*.jsonl``: one append per
result, loaded at start) or as a directory with one small JSON file per result (safe when several
processes share it: each result is written to a temporary file and renamed into place).
Only final outcomes are stored (``ok`` and ``infeasible``): a ``pruned`` result depends on the
pruner's state and a ``fail`` may be transient (out of memory), so both are re-evaluated.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from slimsearch.evaluators.result import EvalResult

CACHED_STATUSES = ("ok", "infeasible")


class ResultCache:
    """``get(key)`` / ``put(key, result)``; ``hits`` and ``misses`` count lookups."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._mem: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self._is_file:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                        self._mem[row["key"]] = row["result"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line after a crash: skip it
        elif self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path) if self.path else 'memory'}, {len(self._mem)} entries)"

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def _is_file(self) -> bool:
        return self.path is not None and self.path.suffix == ".jsonl"

    def get(self, key: str) -> EvalResult | None:
        row = self._mem.get(key)
        if row is None and self.path is not None and not self._is_file:
            f = self.path / f"{key}.json"
            if f.exists():
                try:
                    row = json.loads(f.read_text())
                    self._mem[key] = row
                except json.JSONDecodeError:
                    row = None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return EvalResult.from_dict(row)

    def put(self, key: str, result: EvalResult) -> None:
        """Store ``result`` if it is final (see ``CACHED_STATUSES``)."""
        if result.status not in CACHED_STATUSES:
            return
        row = result.to_dict()
        self._mem[key] = row
        if self.path is None:
            return
        if self._is_file:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "result": row}, sort_keys=True) + "\n")
            return
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(row, fh, sort_keys=True)
        os.replace(tmp, self.path / f"{key}.json")
