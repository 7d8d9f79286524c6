"""One declarative table per study-file section: the docs are generated from it, and every key obeys it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from slimsearch.core.errors import SlimError
from slimsearch.core.schema import Key, check_value, read_table
from slimsearch.search.schema import SECTIONS, reference
from slimsearch.search.study import load_study

REPO = Path(__file__).resolve().parents[1]
NUMBER_TYPES = ("int", "float", "floats", "range", "count_or_fraction")


def test_committed_reference_is_the_generated_one() -> None:
    doc = (REPO / "docs" / "study-file.md").read_text()
    assert doc == reference(), "docs/study-file.md is stale: python -m slimsearch.search.schema > docs/study-file.md"
    out = subprocess.run([sys.executable, "-m", "slimsearch.search.schema"], capture_output=True, text=True, check=True)
    assert out.stdout == doc


def test_every_key_is_documented_and_every_number_bounded() -> None:
    for section, keys in SECTIONS.items():
        names = [k.name for k in keys]
        assert len(names) == len(set(names)), section
        for k in keys:
            assert len(k.doc) >= 15, f"[{section}] {k.name}: no doc"
            assert "|" not in k.doc, f"[{section}] {k.name}: '|' breaks the markdown table"
            if k.type in NUMBER_TYPES:
                assert k.lo is not None and k.hi is not None, f"[{section}] {k.name}: unbounded"
                assert k.hi <= 1e30, f"[{section}] {k.name}: no finite upper bound"
            if k.type in ("choice", "choices") and section != "seeds":
                assert k.choices, f"[{section}] {k.name}: no choices"
    documented = {k.name for k in SECTIONS["study"]} | {k.name for k in SECTIONS["evaluator"]}
    # keys the issue found documented nowhere
    assert {"n_startup_trials", "pruner", "timeout", "max_retry", "bn_batches", "ray_address"} <= documented
    assert {"in_channels"} <= {k.name for k in SECTIONS["model"]}
    assert {"finetune_lr"} <= {k.name for k in SECTIONS["export"]}


def test_the_documented_defaults_are_the_loaded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "s.toml"
    p.write_text('[study]\nname = "d"\n[model]\nfactory = "smallcnn"\npretrain_epochs = 1\n')
    cfg = load_study(p)
    skip = {("study", "name"), ("study", "storage"), ("study", "workdir"), ("study", "objectives"),
            ("model", "factory"), ("model", "pretrain_epochs"), ("seeds", "strategies")}  # fmt: skip
    for section, keys in SECTIONS.items():
        obj = getattr(cfg, section)
        for k in keys:
            if (section, k.name) in skip:
                continue
            got = getattr(obj, k.name)
            assert got == k.default or (isinstance(got, tuple) and tuple(k.default) == got), (section, k.name, got)
    assert cfg.study.workdir == tmp_path / "runs" / "d"
    assert cfg.study.storage == f"sqlite:///{tmp_path}/runs/d.db"


@pytest.mark.parametrize(
    ("section", "body", "needle"),
    [
        ("study", "n_trials = 1000000000000", "[study] n_trials: must be in [1, 1000000], got 1000000000000"),
        ("study", "seed = 18446744073709551616", "[study] seed: must be in [0, 4294967295]"),
        ("study", "heartbeat_interval = 1000000000000", "[study] heartbeat_interval: must be in [1, 3600]"),
        ("study", "timeout = nan", "[study] timeout: expected a number, got number nan"),
        ("study", "n_trails = 3", "unknown key 'n_trails' (did you mean 'n_trials'?)"),
        ("model", "pretrain_lr = 1e9", "[model] pretrain_lr: must be in (0, 10], got 1000000000.0"),
        ("data", "val_size = 1.5", "[data] val_size: must be a count in [1, 10000000] or a fraction in (0, 1)"),
        ("constraint", "latency_batch = 100000", "[constraint] latency_batch: must be in [1, 4096], got 100000"),
        ("constraint", "max_macs = 1e300", "[constraint] max_macs: must be in (0, 1e+15], got 1e+300"),
        ("space", "rate_step = 1.0", "[space] rate_step: must be in (0, 1), got 1.0"),
        ("space", "prune_rate = [0.1, 0.1, 0.2]", "[space] prune_rate: expected [low, high] (two numbers)"),
        ("evaluator", "steps = 1e3", "[evaluator] steps: expected an integer, got number 1000.0"),
        ("evaluator", "workers = 100000", "[evaluator] workers: must be in [1, 1024], got 100000"),
        ("evaluator", "latency_batch = 64", "[evaluator] latency_batch: set it in [constraint] latency_batch"),
        ("seeds", "budget = 0", "[seeds] budget: must be in [1, 1000000], got 0"),
        ("export", "top_k = 1000\nfinetune_epochs = 1", "[export] top_k: must be in [1, 100], got 1000"),
        ("export", 'formats = ["pt2", "pt2"]', "[export] formats: duplicate values"),
    ],
)
def test_one_message_template_for_every_section(tmp_path: Path, section: str, body: str, needle: str) -> None:
    p = tmp_path / "s.toml"
    tables = {"study": 'name = "x"', "model": 'factory = "smallcnn"\npretrain_epochs = 1'}
    tables[section] = f"{tables.get(section, '')}\n{body}"
    p.write_text("".join(f"[{name}]\n{text}\n" for name, text in tables.items()))
    with pytest.raises(SlimError) as e:
        load_study(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: [{section}]") and needle in msg and "\n" not in msg, msg


def test_latency_batch_has_one_meaning(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text('[study]\nname = "x"\n[model]\nfactory = "smallcnn"\npretrain_epochs = 1\n'
                 "[constraint]\nlatency_batch = 16\n[evaluator]\nmeasure_latency = true\n")  # fmt: skip
    cfg = load_study(p)
    assert cfg.constraint.latency_batch == cfg.evaluator.latency_batch == 16


def test_check_value_converts_and_rejects() -> None:
    k = Key("r", "float", None, "a ratio of something", lo=0, hi=1, lo_open=True)
    assert check_value(k, 1, "[x]") == 1.0 and isinstance(check_value(k, 1, "[x]"), float)
    for bad, msg in ((True, "expected a number, got boolean True"), (0, r"must be in \(0, 1\], got 0")):
        with pytest.raises(SlimError, match=msg):
            check_value(k, bad, "[x]")
    keys = (Key("a", "int", 3, "an integer key here", lo=0, hi=9), Key("b", "strs", (), "a list of names here"))
    assert read_table({"b": "one"}, keys, "[x]") == {"a": 3, "b": ("one",)}
    with pytest.raises(SlimError, match=r"\[x\]: must be a table, got list"):
        read_table([], keys, "[x]")
    with pytest.raises(ValueError, match="every number needs both bounds"):
        Key("n", "int", 0, "a number with no upper bound", lo=0)


def test_readme_study_file_is_valid_and_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    block = re.search(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 16
    p = tmp_path / "readme.toml"
    p.write_text(block)
    cfg = load_study(p)
    assert cfg.constraint.max_macs_ratio == 0.5 and cfg.space.decomposition == ("none", "tucker")
    assert not (tmp_path / "runs").exists()
