"""``import slimsearch``: the documented Python API, its README example, in-memory model and data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slimsearch.core.data import load_splits
from slimsearch.core.errors import SlimError
from torch import nn

import slimsearch

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under ## Python API"
    return m.group(1)


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in slimsearch.__all__:
        obj = getattr(slimsearch, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"slimsearch.{name} has no docstring"
    assert {"load_study", "run_study", "export_trial", "apply_policy", "Policy", "count_cost"} <= set(
        slimsearch.__all__
    )
    assert slimsearch.Policy is __import__("slimsearch.core.policy", fromlist=["Policy"]).Policy
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = slimsearch.nope


def test_import_slimsearch_does_not_import_torch() -> None:
    code = "import sys, slimsearch; print(slimsearch.__version__, 'torch' in sys.modules, 'optuna' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == [slimsearch.__version__, "False", "False"]


def test_readme_example_runs_and_compresses(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    m = re.search(r"^trial (\d+): val_acc ([\d.]+), MACs x([\d.]+)$", res.stdout, re.M)
    assert m, res.stdout[-2000:]
    assert 0.1 < float(m.group(2)) <= 1.0  # better than chance (10 classes) after the final fine-tune
    assert float(m.group(3)) <= 0.5  # the study's bound
    assert (tmp_path / "runs" / "api-demo" / "export" / f"trial-{m.group(1)}" / "model.torchscript.pt").is_file()
    before, after = re.search(r"^(\d+) -> (\d+)$", res.stdout, re.M).groups()
    assert int(after) < int(before)


def test_in_memory_model_and_data_replace_factory_and_dataset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    from slimsearch.search.context import build_study_context

    splits = load_splits("digits", val_size=200)
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = slimsearch.load_study({"study": {"name": "mem"}, "constraint": {"max_macs_ratio": 0.5}},
                                model=net, data=(splits.train, splits.val))  # fmt: skip
    assert cfg.model.factory == "<in-memory Sequential>" and cfg.data.dataset == "<in-memory>"
    sctx = build_study_context(cfg)
    assert sctx.splits.train is splits.train and sctx.splits.test is None
    assert sctx.baseline_path is None  # no pretrain_epochs: the given weights are the baseline
    assert sctx.model is not net  # a copy: the caller's module is never changed
    for k, v in sctx.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert sctx.input_shape == (1, 1, 8, 8)
    assert not (tmp_path / "runs").exists()  # validating and building the context writes nothing


def test_in_memory_inputs_bad_input_is_a_slim_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    study = {"study": {"name": "mem"}}
    with pytest.raises(SlimError, match="model must be a torch.nn.Module, got str"):
        slimsearch.load_study(study, model="resnet20")
    with pytest.raises(SlimError, match="data must be a slimsearch.DataSplits"):
        slimsearch.load_study(study, model=tiny_net(), data=[1, 2])
    with pytest.raises(SlimError, match=r"missing section \[model\]"):
        slimsearch.load_study(study)  # without a module, [model] is still required
    with pytest.raises(SlimError, match=r"\[model\]: unknown key 'lr'"):
        slimsearch.load_study({**study, "model": {"lr": 1}}, model=tiny_net())
    cfg = slimsearch.load_study(study, model=tiny_net())
    with pytest.raises(SlimError, match="workers must be 1, got 2"):
        slimsearch.run_study(cfg, workers=2)
    with pytest.raises(SlimError, match="cannot go to Ray workers"):
        slimsearch.run_study(cfg, ray_address="127.0.0.1:6379")
    assert not (tmp_path / "runs").exists()
