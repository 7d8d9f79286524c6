"""Study files: validation errors name file, key and allowed values; ${VAR} expansion; storage URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slimsearch.core.errors import SlimError
from slimsearch.search.study import load_study, mask_url, validate_storage_url

BASE = """
[study]
name = "t"
{study}

[model]
factory = "smallcnn"
pretrain_epochs = 1
{model}

[data]
dataset = "digits"
{data}
"""


def write(
    tmp_path: Path, text: str = "", *, study: str = "", model: str = "", data: str = "", name: str = "s.toml"
) -> Path:
    p = tmp_path / name
    base = BASE.replace('name = "t"\n', "") if study.startswith("name =") else BASE
    base = base.replace('dataset = "digits"\n', "") if data.startswith("dataset =") else base
    p.write_text(base.format(study=study, model=model, data=data) + text)
    return p


def err(path: Path) -> str:
    with pytest.raises(SlimError) as e:
        load_study(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_defaults(tmp_path: Path) -> None:
    cfg = load_study(write(tmp_path))
    s = cfg.study
    assert s.name == "t" and s.sampler == "tpe" and s.n_trials == 50 and s.backend == "optuna"
    assert s.storage == f"sqlite:///{tmp_path}/runs/t.db"
    assert s.workdir == tmp_path / "runs" / "t"
    assert [o.spec for o in s.objectives] == ["val_acc:max"] and not cfg.multi_objective
    assert cfg.space.prune_rate == (0.0, 0.8) and cfg.evaluator.kind == "proxy"
    assert cfg.export.formats == ("pt2", "torchscript") and cfg.export_dir == tmp_path / "runs" / "t" / "export"
    assert not (tmp_path / "runs").exists()  # loading creates nothing


def test_full_file(tmp_path: Path) -> None:
    cfg = load_study(
        write(
            tmp_path,
            """
[constraint]
max_macs_ratio = 0.5
[space]
prune_rate = [0.1, 0.6]
criteria = ["l1", "fpgm"]
[seeds]
strategies = ["uniform"]
uniform_rates = [0.2, 0.4, 0.6]
[evaluator]
kind = "finetune"
steps = 20
[export]
formats = ["torchscript", "pt2"]
finetune_epochs = 2
""",
            study='sampler = "nsga2"\nobjectives = ["val_acc:max", "macs:min"]\nn_trials = 7\nseed = 3',
        )
    )
    assert cfg.study.sampler == "nsga2" and cfg.multi_objective and cfg.study.n_trials == 7 and cfg.study.seed == 3
    assert [(o.metric, o.direction) for o in cfg.study.objectives] == [("val_acc", "maximize"), ("macs", "minimize")]
    assert cfg.constraint.max_macs_ratio == 0.5 and cfg.constraint.max_macs is None and cfg.constraint.fit == "scale"
    assert cfg.space.criteria == ("l1", "fpgm") and cfg.space.prune_rate == (0.1, 0.6)
    assert cfg.seeds.strategies == ("uniform",) and cfg.seeds.params["uniform"] == {"rates": [0.2, 0.4, 0.6]}
    assert cfg.evaluator.kind == "finetune" and cfg.evaluator.steps == 20
    assert cfg.export.formats == ("torchscript", "pt2") and cfg.export.finetune_epochs == 2.0
    assert cfg.with_n_trials(9).study.n_trials == 9


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[study]\nname = "x"\nn_trials = = 3\n')
    msg = err(p)
    assert str(p) in msg and "line 3" in msg and "syntax" in msg


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in err(tmp_path / "nope.toml")


def test_unknown_key_suggests_and_lists(tmp_path: Path) -> None:
    msg = err(write(tmp_path, study='samplr = "tpe"'))
    assert "[study]" in msg and "'samplr'" in msg and "did you mean 'sampler'" in msg and "n_trials" in msg


def test_unknown_section(tmp_path: Path) -> None:
    msg = err(write(tmp_path, "[sapce]\nx = 1\n"))
    assert "unknown section [sapce]" in msg and "did you mean [space]" in msg


@pytest.mark.parametrize(
    ("study", "needle"),
    [
        ('n_trials = "ten"', "n_trials: expected an integer, got string 'ten'"),
        ("n_trials = true", "n_trials: expected an integer, got boolean"),
        ("n_trials = 0", "n_trials: must be in [1, 1000000], got 0"),
        ('sampler = "bayes"', "sampler: unknown value 'bayes'; allowed: tpe, nsga2, cmaes, local, random"),
        ('backend = "dask"', "backend: unknown value 'dask'; allowed: optuna, ray"),
        ('objectives = ["val_acc:up"]', "bad objective 'val_acc:up'"),
        ('objectives = ["accuracy:max"]', "bad objective 'accuracy:max'"),
        ('objectives = ["macs:min", "macs:max"]', "metric 'macs' appears twice"),
        ("objectives = []", "needs at least one objective"),
        ('name = "has space"', "name: 'has space' must be"),
        ("timeout = -1", "timeout: must be in (0, 10000000], got -1"),
        ("heartbeat_interval = 10\ngrace_period = 5", "grace_period: must be larger than heartbeat_interval"),
        ('sampler = "cmaes"\nobjectives = ["val_acc:max", "macs:min"]', "cmaes is single-objective"),
        ('sampler = "local"\nobjectives = ["val_acc:max", "macs:min"]', "local is single-objective"),
        ('objectives = ["latency_ms:min"]', "latency_ms needs [evaluator] measure_latency = true"),
        ('objectives = ["val_acc:max", "latency_pred_ms:min"]', "latency_pred_ms needs [constraint] max_latency_ratio"),
    ],
)
def test_study_section_errors(tmp_path: Path, study: str, needle: str) -> None:
    p = write(tmp_path, study=study)
    msg = err(p)
    assert str(p) in msg and needle in msg


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("sqlite://relative.db", "SQLite storage must name a file"),
        ("sqlite:///:memory:", "SQLite storage must name a file"),
        ("redis://localhost/0", "unsupported storage"),
        ("postgresql://user@/", "needs a host and a database name"),
        ("not a url", "malformed storage URL"),
    ],
)
def test_malformed_storage(tmp_path: Path, url: str, needle: str) -> None:
    msg = err(write(tmp_path, study=f'storage = "{url}"'))
    assert "[study] storage" in msg and needle in msg


def test_storage_urls_and_masking(tmp_path: Path) -> None:
    assert validate_storage_url("sqlite:///a/b.db", "w") == f"sqlite:///{tmp_path}/a/b.db"
    assert validate_storage_url("sqlite:////abs/x.db", "w") == "sqlite:////abs/x.db"
    pg = "postgresql+psycopg2://bob:s3cret@db.example:5432/opt"
    assert validate_storage_url(pg, "w") == pg
    assert mask_url(pg) == "postgresql+psycopg2://bob:***@db.example:5432/opt"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"
    msg = err(write(tmp_path, study='storage = "redis://bob:s3cret@h/0"'))
    assert "s3cret" not in msg and "bob:***@" in msg


def test_env_var_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = tmp_path / "shared" / "m.th"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    monkeypatch.setenv("SS_SHARED", str(tmp_path / "shared"))
    monkeypatch.delenv("SS_UNSET", raising=False)
    cfg = load_study(write(tmp_path, model='checkpoint = "${SS_SHARED}/m.th"',
                           study='storage = "sqlite:///${SS_UNSET:-db}/x.db"'))  # fmt: skip
    assert cfg.model.checkpoint == ck
    assert cfg.study.storage == f"sqlite:///{tmp_path}/db/x.db"
    # a default is used when the variable is unset, and relative paths resolve against the cwd
    cfg = load_study(write(tmp_path, model='checkpoint = "${SS_UNSET:-shared}/m.th"'))
    assert cfg.model.checkpoint == tmp_path / "shared" / "m.th"
    msg = err(write(tmp_path, model='checkpoint = "${SS_UNSET}/m.th"'))
    assert "[model] checkpoint" in msg and "SS_UNSET is not set" in msg


def test_model_and_data_errors(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text('[study]\nname = "t"\n[model]\nfactory = "smallcnn"\n')
    assert "needs a checkpoint, or pretrain_epochs > 0" in err(p)
    assert "[model] pretrain_lr: expected a number, got string '3'" in err(write(tmp_path, model='pretrain_lr = "3"'))
    msg = err(write(tmp_path, data='root = "nowhere"'))
    assert "[data] root" in msg and "does not exist" in msg
    msg = err(write(tmp_path, data="val_size = 1.5"))
    assert "[data] val_size" in msg and "fraction" in msg
    msg = err(write(tmp_path, data='dataset = "mnist"'))
    assert "[data] dataset: unknown value 'mnist'" in msg and "cifar10" in msg


def test_missing_sections(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text('[study]\nname = "t"\n')
    assert "missing section [model]" in err(p)


def test_constraint_errors(tmp_path: Path) -> None:
    assert "not both" in err(write(tmp_path, "[constraint]\nmax_macs_ratio = 0.5\nmax_macs = 1e6\n"))
    assert "max_macs_ratio: must be in (0, 1]" in err(write(tmp_path, "[constraint]\nmax_macs_ratio = 1.5\n"))
    msg = err(write(tmp_path, '[constraint]\nmax_macs_ratio = 0.5\nfit = "squeeze"\n'))
    assert "[constraint] fit" in msg and "'squeeze'" in msg and "scale, fill, none" in msg
    msg = err(write(tmp_path, '[constraint]\nmax_macs_ratio = 0.5\nfit = "fill"\n',
                    study='objectives = ["val_acc:max", "macs:min"]'))  # fmt: skip
    assert '[constraint] fit = "fill"' in msg and "macs objective" in msg
    msg = err(write(tmp_path, "[constraint]\nmax_latency_ratio = 0\n"))
    assert "[constraint] max_latency_ratio" in msg and "must be in (0, 1]" in msg
    msg = err(write(tmp_path, '[constraint]\nmax_latency_ratio = 0.6\nlatency_batch = "big"\n'))
    assert "[constraint] latency_batch" in msg and "an integer" in msg
    assert "latency_batch" in err(write(tmp_path, "[constraint]\nmax_latency_ratio = 0.6\nlatency_batch = 0\n"))


def test_seed_errors(tmp_path: Path) -> None:
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["magic"]\n'))
    assert "unknown seed strategy 'magic'" in msg and "uniform" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["uniform"]\nuniform_rates = [1.5]\n'))
    assert "uniform_rates" in msg and "[0, 1)" in msg
    msg = err(write(tmp_path, "[seeds]\nstrategies = []\nuniform_rates = [0.5]\n"))
    assert "not in strategies" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["global"]\nglobal_fractions = [1.0]\n'))
    assert "global_fractions" in msg and "[0, 1)" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["global"]\nglobal_criterion = "hpc"\n'))
    assert "global_criterion" in msg and "'hpc'" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["tp_global"]\ntp_global_ratios = [0.0]\n'))
    assert "tp_global_ratios" in msg and "(0, 1)" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["tp_global"]\ntp_global_criterion = "hpc"\n'))
    assert "tp_global_criterion" in msg and "'hpc'" in msg
    msg = err(write(tmp_path, '[seeds]\nstrategies = ["uniform"]\nbogus = 1\n'))
    assert "unknown key 'bogus'" in msg


def test_delegated_sections_are_prefixed_with_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[space]\nprune_rate = [0.5, 0.2]\n")
    msg = err(p)
    assert msg.startswith(str(p)) and "[space] prune_rate" in msg
    msg = err(write(tmp_path, '[evaluator]\nkind = "magic"\n'))
    assert "[evaluator] kind" in msg and "proxy" in msg
    msg = err(write(tmp_path, '[export]\nformats = ["tflite"]\n'))
    assert "[export] formats: unknown value 'tflite'; allowed: pt2, onnx, torchscript, torchscript-frozen, state" in msg
    msg = err(write(tmp_path, '[export]\nmemory_format = "nhwc"\n'))
    assert "[export] memory_format: unknown value 'nhwc'; allowed: contiguous, channels_last, auto" in msg


@pytest.mark.parametrize("name", ["quickstart", "resnet20_cifar10", "resnet56_cifar10", "vgg16_cifar10"])
def test_shipped_studies_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import SHARED

    monkeypatch.setenv("SLIMSEARCH_SHARED", str(SHARED))

    repo = Path(__file__).resolve().parents[1]
    if name != "quickstart" and not (SHARED / "data").is_dir():
        pytest.skip(f"needs {SHARED}/data")
    cfg = load_study(repo / "studies" / f"{name}.toml")
    assert cfg.name == name.replace("_", "-") or cfg.name == name
    assert cfg.study.n_trials >= 10 and cfg.study.storage.startswith("sqlite:///")
    if name != "quickstart":
        assert cfg.constraint.max_macs_ratio == 0.5 and cfg.data.dataset == "cifar10"


def test_data_val_sources(tmp_path: Path) -> None:
    assert load_study(write(tmp_path)).data.val_from == "train"
    cfg = load_study(write(tmp_path, data='val_from = "test"\nval_size = 100'))
    assert cfg.data.val_from == "test" and cfg.data.val_size == 100 and cfg.data.val_root is None
    (tmp_path / "held").mkdir()
    assert load_study(write(tmp_path, data='val_root = "held"')).data.val_root == tmp_path / "held"
    msg = err(write(tmp_path, data='val_from = "holdout"'))
    assert "[data] val_from: unknown value 'holdout'" in msg and "train, test" in msg
    msg = err(write(tmp_path, data='val_root = "missing"'))
    assert "[data] val_root" in msg and "does not exist" in msg


def test_val_from_test_reaches_the_study_splits(tmp_path: Path) -> None:
    from slimsearch.core.data import load_splits
    from slimsearch.search.context import load_data

    s = load_data(load_study(write(tmp_path, data='val_from = "test"\nval_size = 100')))
    want = load_splits("digits", None, 100, 0, val_from="test")
    assert torch.equal(s.val.x, want.val.x) and len(s.test) == len(want.test) and len(s.val) == 100
