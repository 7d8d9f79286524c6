"""Own scoring and own data: `[evaluator] kind = "custom"` with `fn`, and `[data] factory`, unit-tested and run
with worker processes and (slow) with Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from slimsearch.core.data import Dataset
from slimsearch.core.errors import SlimError
from slimsearch.core.user_data import to_splits
from slimsearch.evaluators.custom import check_scores
from slimsearch.search.cli import main

USER = """\
import numpy as np
import torch
from torch.utils.data import Dataset

SEEN = []


def images(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 1, 8, 8)).astype(np.uint8)
    for k in range(3):
        x[y == k, :, 2 * k : 2 * k + 3, :] += 150  # a bright band per class
    return torch.from_numpy(x), torch.from_numpy(y)


class Items(Dataset):  # map-style, (H x W uint8 array, label) items
    classes = ["low", "mid", "high"]

    def __init__(self, n, seed):
        self.x, self.y = images(n, seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i, 0].numpy(), int(self.y[i])


def data(seed, root=None):
    SEEN.append((seed, root))
    return {"train": Items(240, seed), "val": images(60, seed + 1), "test": images(30, seed + 2)}


def macro_f1(pred, y, k):
    f1 = []
    for c in range(k):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        f1.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(f1) / k


def score(model, data, budget):
    assert data.test is None and budget["steps"] == 7 and budget["baseline"] is not None
    model.eval()
    with torch.no_grad():
        pred = model(data.val.normalize(data.val.x)).argmax(1)
    f1 = macro_f1(pred, data.val.y, data.val.num_classes)
    return {"val_acc": f1, "f1": f1, "n_val": len(data.val)}


def broken(model, data, budget):
    return {"val_acc": 1 / 0}
"""

STUDY = """\
[study]
name = "own"
n_trials = 4
n_startup_trials = 4
heartbeat_interval = 1
grace_period = 3
{study}

[model]
factory = "smallcnn"
pretrain_epochs = 2
pretrain_batch_size = 32

[data]
factory = "ownstuff:data"
seed = 5

[constraint]
max_macs_ratio = 0.8

[space]
prune_rate = [0.0, 0.5]
rate_step = 0.1

[evaluator]
kind = "custom"
fn = "ownstuff:{fn}"
steps = 7
bn_batches = 2
batch_size = 32
workers = {workers}
"""


@pytest.fixture
def case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    d = tmp_path / "case"
    d.mkdir()
    (d / "ownstuff.py").write_text(USER)
    monkeypatch.chdir(tmp_path)  # not the study folder: found through the study file's folder
    torch.set_num_threads(1)
    yield d
    sys.modules.pop("ownstuff", None)
    while str(d) in sys.path:
        sys.path.remove(str(d))


def _trials(d: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="own", storage=f"sqlite:///{Path.cwd() / 'runs' / 'own.db'}")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_to_splits_takes_tensors_torch_datasets_and_dicts() -> None:
    x = torch.randint(0, 255, (12, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(12) % 3
    s = to_splits(((x, y), (x[:6], y[:6])), "m:f")
    assert s.train.classes == ("0", "1", "2") and s.test is None and s.val.mean == s.train.mean
    xf = torch.randn(12, 3, 4, 4)
    f = to_splits({"train": (xf, y), "val": (xf, y), "test": (xf, y)}, "m:f")
    assert torch.allclose(f.val.normalize(f.val.x), xf, atol=1e-5)  # float data is fed exactly as given
    for bad, match in (
        (((x, y),), "returned tuple"),
        ({"train": (x, y)}, "expected train, val"),
        (((x, y), (x[:, :1], y)), "differ from train's"),
        (((x, y), (x, y + 5)), "label 7 but train has 3 classes"),
        (((x, y.float()[:5]), (x, y)), "expected N×C×H×W and N"),
        (("junk", (x, y)), "got str"),
    ):
        with pytest.raises(SlimError, match=match):
            to_splits(bad, "m:f")
    assert isinstance(s.val, Dataset)


def test_check_scores() -> None:
    assert check_scores("m:s", {"val_acc": 0.5, "f1": np.float32(0.25)}) == {"val_acc": 0.5, "f1": 0.25}
    for out, match in (([0.5], "not a dict"), ({"f1": 1.0}, "without 'val_acc'"), ({"val_acc": "x"}, "not a number"),
                       ({"val_acc": float("nan")}, "returned val_acc nan")):  # fmt: skip
        with pytest.raises(SlimError, match=match):
            check_scores("m:s", out)


def test_custom_data_and_score_with_worker_processes(case: Path, capsys) -> None:
    study = case / "study.toml"
    study.write_text(STUDY.format(study="", fn="score", workers=2))
    assert main(["run", str(study), "--no-progress"]) == 0, capsys.readouterr().err
    trials = _trials(case)
    assert len(trials) == 4
    for t in trials:
        m = t.user_attrs.get("metrics") or t.user_attrs
        assert m["val_acc"] == m["f1"] and m["n_val"] == 60 and 0.0 <= m["f1"] <= 1.0
    assert max(t.values[0] for t in trials) > 0.5  # a learnable 3-class task, scored by the user's F1
    code = main(["export", str(study), "--out", str(case / "out")])
    assert code == 0
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["preprocessing"]["class_names"] == ["low", "mid", "high"]
    assert manifest["preprocessing"]["input_shape"] == [1, 8, 8]


def test_a_failing_custom_evaluator_fails_its_trials_with_file_and_line(case: Path, capsys) -> None:
    study = case / "study.toml"
    study.write_text(STUDY.format(study="", fn="broken", workers=1).replace("n_trials = 4", "n_trials = 1"))
    main(["run", str(study), "--no-progress"])
    out = capsys.readouterr().out
    assert "custom evaluator 'ownstuff:broken' raised ZeroDivisionError at ownstuff.py:" in out


def test_bad_custom_settings_are_one_line(case: Path, capsys) -> None:
    study = case / "study.toml"
    for text, needle in (
        (STUDY.format(study="", fn="nothing", workers=1), "[evaluator] fn 'ownstuff:nothing': 'ownstuff' has no callable"),
        (STUDY.format(study="", fn="score", workers=1).replace('fn = "ownstuff:score"\n', ""),
         '[evaluator] fn: kind = "custom" needs fn'),
        (STUDY.format(study="", fn="score", workers=1).replace("seed = 5", 'dataset = "digits"'),
         "[data] dataset: does not apply with [data] factory"),
    ):  # fmt: skip
        study.write_text(text)
        assert main(["run", str(study), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (Path.cwd() / "runs").exists()


@pytest.mark.slow
def test_custom_data_and_score_on_ray(case: Path, capsys) -> None:
    study = case / "study.toml"
    study.write_text(STUDY.format(study='backend = "ray"', fn="score", workers=2))
    assert main(["run", str(study), "--no-progress"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "done: 4/4 trials" in out
    import pandas as pd

    df = pd.read_csv(Path.cwd() / "runs" / "own" / "ray" / "own-results.csv")
    ok = df[df["status"] == "ok"]
    assert len(ok) == 4 and ok["val_acc"].between(0, 1).all() and ok["val_acc"].max() > 0.5  # the user's F1
