"""Helpers shared by the crash torture tests (``test_torture.py``: Optuna, ``test_torture_ray.py``: Ray Tune).

Linux /proc only (no psutil needed): finding a driver's processes, killing them, and checking that an
exported TorchScript model loads and runs with plain torch in a fresh process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def alive_in_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def session_processes(sid: int) -> dict[int, str]:
    """Live (not zombie) processes of session ``sid`` -> their first command-line word.

    A driver started with ``start_new_session=True`` leads its own session. Ray's processes stay in it,
    though each Ray worker gets its own process group, so ``killpg(driver)`` would miss them.
    """
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out[int(d.name)] = cmd
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def plain_torch_output_shape(model_file: Path, input_shape: tuple[int, ...] = (2, 1, 8, 8)) -> str:
    """Load a TorchScript file with plain torch in a fresh process (no PYTHONPATH: none of our code) and run
    it on zeros; returns the printed output shape, e.g. "(2, 10)" (the stderr tail when it fails)."""
    script = f"import sys, torch\nm = torch.jit.load(sys.argv[1])\nprint(tuple(m(torch.zeros{input_shape}).shape))\n"
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(model_file)], cwd="/", env=plain, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return res.stdout.strip() if res.returncode == 0 else f"failed: {res.stderr[-2000:]}"
