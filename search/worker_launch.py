"""How ``slimsearch run --workers N`` starts its worker processes: the command line (the current directory off
``sys.path``) and the pickled study config handed over on stdin, so the storage URL and its password never
touch the disk. Older versions wrote that config to ``<workdir>/.worker-config-*.pkl``; ``remove_stale_configs``
deletes the ones a killed driver left behind."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from slimsearch.search.study import StudyConfig

# A worker must not import anything from the current directory (a stray tomllib.py or numpy.py in the study
# folder): ``-P`` (Python 3.11+) leaves it off sys.path, and the bootstrap removes it on 3.10. The user's
# [model] factory is still found there (core.models imports it with the directory appended, last).
_WORKER_BOOT = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.', os.getcwd())]; "
                "from slimsearch.search.cli import main; sys.exit(main())")  # fmt: skip


def worker_cmd(cfg: StudyConfig, index: int, threads: int, device: str | None = None) -> list[str]:
    """The worker's command line; its config (with the storage URL and any password) comes on stdin, never
    from a file."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe, "-c", _WORKER_BOOT, "worker", str(cfg.path), "--config-pickle", "-",
            "--parent-pid", str(os.getpid()), "--worker-index", str(index), "--threads", str(threads),
            *(["--device", device] if device else [])]  # fmt: skip


def start_worker(cfg: StudyConfig, index: int, threads: int, env: Mapping[str, str],
                 device: str | None = None) -> subprocess.Popen:  # fmt: skip
    """Start one worker and hand it the pickled config through a pipe."""
    p = subprocess.Popen(worker_cmd(cfg, index, threads, device), env=dict(env), stdin=subprocess.PIPE)
    assert p.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: the driver sees its exit code
        p.stdin.write(pickle.dumps(cfg))
    with contextlib.suppress(BrokenPipeError):
        p.stdin.close()
    return p


def remove_stale_configs(workdir: Path) -> int:
    """Delete ``.worker-config-*.pkl`` files older versions left in the workdir when their driver was killed:
    they hold the storage URL with its password. Returns how many."""
    n = 0
    for f in workdir.glob(".worker-config-*.pkl") if workdir.is_dir() else ():
        with contextlib.suppress(OSError):
            f.unlink()
            n += 1
    return n
