"""The built wheel, installed into a fresh venv: one top-level name, and it runs a study beside a user's ``core``.

The editable install that ``make`` uses hides packaging mistakes (the repository's own folders sit on
``sys.path``), so this test builds the real wheel from the tracked files, installs it into a new venv whose
dependencies come from this interpreter's site-packages, and runs a small study from a folder that holds a
package named ``core`` (the one the model factory imports), with two worker processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE_HINTS = ("NewConnectionError", "Could not find a version", "No matching distribution", "Temporary failure")

STUDY = """
[study]
name = "wheeltest"
n_trials = 3
n_startup_trials = 2
seed = 0

[model]
factory = "core.usernet:build"     # the user's own package named core, not slimsearch.core
pretrain_epochs = 1

[data]
dataset = "digits"
val_size = 200

[constraint]
max_macs_ratio = 0.6

[space]
prune_rate = [0.0, 0.6]
criteria = ["l1"]
decomposition = ["none"]

[evaluator]
kind = "proxy"
workers = 2
"""

USERNET = '''
"""A user's package named ``core``: it must not be shadowed by slimsearch's, nor shadow it."""
from torch import nn

MARK = "user core"


def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


def _source_tree(dst: Path) -> Path:
    """The files git would ship (tracked plus new, not ignored), copied, so the build writes nothing here."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clean clone has")
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                        capture_output=True, check=True)  # fmt: skip
    for name in filter(None, ls.stdout.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def _build_wheel(src: Path, dist: Path) -> Path:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(dist)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if res.returncode != 0:
        if any(h in res.stdout + res.stderr for h in OFFLINE_HINTS):
            pytest.skip("building the wheel needs the package registry for its build dependencies (offline)")
        raise AssertionError(f"pip wheel failed:\n{res.stdout}\n{res.stderr}")
    wheels = list(dist.glob("slimsearch-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _venv_with_deps(venv: Path) -> Path:
    """A fresh venv that sees this interpreter's installed dependencies but not its slimsearch."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # Directories only (their .pth files are not run): the editable slimsearch finder stays out.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    deps.append(sysconfig.get_paths()["purelib"])
    Path(site, "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return py


@pytest.mark.slow
def test_wheel_installs_one_name_and_runs_a_study_beside_a_user_core(tmp_path: Path) -> None:
    wheel = _build_wheel(_source_tree(tmp_path / "src"), tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(info).decode().split() == ["slimsearch"]
        assert {n.split("/")[0] for n in names} == {"slimsearch", info.split("/")[0]}
        for sub in ("core", "spaces", "evaluators", "search", "search/methods"):
            assert f"slimsearch/{sub}/__init__.py" in names, sub

    py = _venv_with_deps(tmp_path / "venv")
    # --ignore-installed: the dependency folders hold this checkout's editable slimsearch, which pip would
    # otherwise call "already satisfied" (and it never uninstalls anything with this flag).
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                          "--ignore-installed", str(wheel)], capture_output=True, text=True)  # fmt: skip
    if "no such option: --python" in pip.stderr:
        pytest.skip("needs pip >= 22.3 (pip --python) to install into the fresh venv")
    assert pip.returncode == 0, pip.stderr
    assert (tmp_path / "venv" / "bin" / "slimsearch").is_file()

    lib, user = tmp_path / "userlib", tmp_path / "userproj"  # the user's `core` is not in the working folder
    (lib / "core").mkdir(parents=True)
    (lib / "core" / "__init__.py").write_text("")
    (lib / "core" / "usernet.py").write_text(USERNET)
    user.mkdir()
    (user / "study.toml").write_text(STUDY)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(lib)  # importable everywhere through the path, the worker processes included
    env["SLIMSEARCH_CACHE"] = str(tmp_path / "cache")

    def run(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(py), *argv], cwd=user, env=env, capture_output=True, text=True, timeout=timeout)

    probe = run("-c", "import core.usernet, slimsearch, slimsearch.core.errors as e; "
                      "print(core.usernet.MARK); print(slimsearch.__file__); print(slimsearch.__version__)")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    mark, where, version = probe.stdout.split("\n")[:3]
    assert mark == "user core"
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # the wheel's copy, not the repository
    script = tmp_path / "venv" / "bin" / "slimsearch"
    ver = subprocess.run([str(script), "--version"], cwd=user, env=env, capture_output=True, text=True)
    assert ver.returncode == 0 and ver.stdout.strip() == f"slimsearch {version}", (ver.stdout, ver.stderr)

    res = run("-m", "slimsearch", "run", "study.toml", "--no-progress")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "done: 3/3 trials" in res.stdout, res.stdout[-3000:]
    status = run("-m", "slimsearch", "status", "study.toml")
    assert status.returncode == 0 and "COMPLETE" in status.stdout, status.stdout + status.stderr
