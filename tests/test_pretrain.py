"""Pre-training users can watch and resume: progress lines, atomic checkpoints a rerun continues from
(ending with the weights of an uninterrupted run), a fingerprinted baseline reused until the recipe changes;
progress lines for archive extraction and first decode."""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from slimsearch.core import data as D
from slimsearch.core.data import load_splits
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from slimsearch.core.train import FinetuneConfig, finetune
from slimsearch.search.context import baseline_cache_path, build_study_context
from slimsearch.search.pretrain import partial_path, stored_fingerprint
from slimsearch.search.study import study_from_dict


def test_a_resumed_finetune_ends_with_the_weights_of_an_uninterrupted_one() -> None:
    s = load_splits("digits", None, 200, 0)
    cfg = FinetuneConfig(steps=12, batch_size=32, lr=0.05, seed=3)
    torch.manual_seed(0)
    whole = build_model("smallcnn", 10, 1)
    init = copy.deepcopy(whole.state_dict())
    finetune(whole, s.train, cfg)
    saved: list[bytes] = []

    def keep(state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        saved.append(buf.getvalue())

    first = build_model("smallcnn", 10, 1)
    first.load_state_dict(init)
    finetune(first, s.train, cfg, checkpoint=keep, checkpoint_every=5)
    assert len(saved) == 2  # steps 5 and 10, none after the last
    resumed = build_model("smallcnn", 10, 1)  # other initial weights: the checkpoint replaces them
    finetune(resumed, s.train, cfg, resume=torch.load(io.BytesIO(saved[0]), weights_only=True))
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(SlimError, match="does not fit a run of 20"):
        finetune(resumed, s.train, FinetuneConfig(steps=20, batch_size=32), resume=torch.load(io.BytesIO(saved[0])))


def _cfg(tmp: Path, name: str, **model: object):
    raw = {"study": {"name": name, "workdir": str(tmp / name)},
           "model": {"factory": "smallcnn", "pretrain_epochs": 2, "pretrain_batch_size": 128,
                     "pretrain_checkpoint_steps": 5, **model},
           "data": {"dataset": "digits", "val_size": 200}}  # fmt: skip
    return study_from_dict(raw, tmp / f"{name}.toml")


class Killed(BaseException):
    pass


def test_pretraining_shows_progress_checkpoints_and_resumes_after_a_kill(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    lines: list[str] = []
    ref = build_study_context(_cfg(tmp_path, "whole"), log=lines.append)
    assert any(line.startswith("pre-training a smallcnn baseline for 2 epochs (18 steps;") for line in lines)
    steps = [line for line in lines if line.startswith("pre-training step ")]
    assert steps[0].startswith("pre-training step 1/18 loss ") and " eta " in steps[0] and len(steps) == 18

    cfg = _cfg(tmp_path, "killed")
    final, part = baseline_cache_path(cfg), partial_path(baseline_cache_path(cfg))

    def kill_at_step_8(line: str) -> None:
        if line.startswith("pre-training step 8/"):
            raise Killed

    with pytest.raises(Killed):
        build_study_context(cfg, log=kill_at_step_8)
    assert part.is_file() and not final.exists()
    assert torch.load(part, weights_only=True)["state"]["step"] == 5
    assert sorted(p.name for p in final.parent.iterdir()) == [part.name]  # no temporary file left behind
    lines = []
    again = build_study_context(cfg, log=lines.append)
    assert any("(resuming at step 5/18;" in line for line in lines)
    assert [line for line in lines if line.startswith("pre-training step ")][0].startswith("pre-training step 6/18")
    assert not part.exists() and final.is_file() and stored_fingerprint(final)
    assert again.baseline_sha == ref.baseline_sha  # the same weights as the uninterrupted run


def test_baseline_is_reused_until_the_recipe_changes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    first = build_study_context(_cfg(tmp_path, "s", pretrain_epochs=1))
    lines: list[str] = []
    reused = build_study_context(_cfg(tmp_path, "s", pretrain_epochs=1), log=lines.append)
    assert reused.baseline_sha == first.baseline_sha and not any("pre-training" in line for line in lines)
    worker = build_study_context(_cfg(tmp_path, "s", pretrain_epochs=1), allow_pretrain=False)
    assert worker.baseline_sha == first.baseline_sha
    changed = _cfg(tmp_path, "s", pretrain_epochs=1, pretrain_lr=0.02)
    with pytest.raises(SlimError, match="pre-trained with another recipe; run `slimsearch run` first"):
        build_study_context(changed, allow_pretrain=False)  # a worker never trains
    lines = []
    retrained = build_study_context(changed, log=lines.append)
    assert any("the pre-training recipe changed" in line for line in lines)
    assert retrained.baseline_sha != first.baseline_sha


def test_extraction_and_first_decode_report_progress(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(D, "PROGRESS_EVERY_S", 0.0)
    root = tmp_path / "set"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            PIL.Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(root, arcname="set")
    lines: list[str] = []
    with D.progress_to(lines.append):
        s = load_splits("imagefolder", archive, 2, 0)
    assert len(s.train) + len(s.val) == 6
    assert lines[0].startswith(f"extracting {archive} (0 MB) once into ")
    assert any(line.startswith("extracting set.tar.gz: 10 files in ") for line in lines), lines  # 4 dirs + 6 images
    assert any(line.startswith("decoding 6 images under ") for line in lines)
    assert any(line.startswith("decoding ") and ": 6 images in " in line for line in lines)
    lines.clear()
    with D.progress_to(lines.append):
        load_splits("imagefolder", archive, 2, 0)
    assert lines == []  # extracted and decoded once: nothing slow left to report
