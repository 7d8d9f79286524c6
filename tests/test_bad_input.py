"""Bad input through the real ``slimsearch`` CLI, one subprocess per case.

Every case must: exit 2; print exactly one stderr line ``slimsearch: error: ...`` naming what is
wrong and where (a needle per case); print no traceback; and leave the folder it ran in (study
files, checkpoints, data, storage, caches) byte-for-byte and mtime-for-mtime unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BASE_STUDY, S, case_env

# User model factories importable from the case folder (``python -m`` puts the cwd on sys.path).
USER_MODELS = """\
from torch import nn


def not_a_model(num_classes=10, in_channels=1):
    return 42


def crashes(num_classes=10, in_channels=1):
    raise RuntimeError("factory exploded while building")


class Pointwise(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):  # residual: pw's filters are coupled with stem's, so pw alone cannot be pruned
        h = self.stem(x)
        return self.fc((h + self.pw(h)).mean((2, 3)))


def pointwise(num_classes=10, in_channels=1):
    return Pointwise(num_classes, in_channels)
"""


# ----------------------------------------------------------------------------- folder helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with (kind, size, mtime_ns, sha256) — any write shows up."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            out[str(p.relative_to(root))] = ("dir",)
        for f in filenames:
            p = Path(dirpath, f)
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def edit(old: str, new: str, file: str = "study.toml") -> Callable[[Path], None]:
    """A setup step replacing ``old`` by ``new`` in ``file`` (which must contain ``old``)."""

    def apply(d: Path) -> None:
        p = d / file
        text = p.read_text()
        assert old in text, f"{old!r} not in {file}"
        p.write_text(text.replace(old, new, 1))

    return apply


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)

    return apply


def steps(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        for fn in fns:
            fn(d)

    return apply


def save_state(name: str, model: str, seed: int = 0, in_channels: int = 1) -> Callable[[Path], None]:
    """A real ``torch.save``d state dict of a zoo model (e.g. another architecture's weights)."""

    def apply(d: Path) -> None:
        from slimsearch.core.models import build_model

        torch.manual_seed(seed)
        torch.save(build_model(model, 10, in_channels).state_dict(), d / name)

    return apply


def image_folder(root: str, *, empty_class: bool = False, corrupt: bool = False) -> Callable[[Path], None]:
    """``root/<class>/*.png`` RGB 8x8 images; optionally an empty class folder or a corrupt PNG."""

    def apply(d: Path) -> None:
        from PIL import Image

        rng = np.random.default_rng(0)
        for c in ("cat", "dog"):
            (d / root / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / root / c / f"{i}.png")
        if empty_class:
            (d / root / "emu").mkdir()
        if corrupt:
            (d / root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))

    return apply


def archive(name: str, root: str = "imgs") -> Callable[[Path], None]:
    """``name`` (.tar.gz): the image folder ``root`` packed, then ``root`` itself removed."""

    def apply(d: Path) -> None:
        import tarfile

        with tarfile.open(d / name, "w:gz") as t:
            t.add(d / root, arcname=root)
        shutil.rmtree(d / root)

    return apply


# A user module that parses the command line at import, as a training script does.
ARGV_MODELS = """\
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
args = parser.parse_args()


def net(num_classes=10, in_channels=1):
    raise AssertionError("never reached")
"""

EXITING_MODELS = """\
import sys


def net(num_classes=10, in_channels=1):
    sys.exit("no GPU found")
"""

# An export folder of another study (its metrics.json names it).
OTHER_EXPORT = steps(write("theirs/manifest.json", "{}"), write("theirs/metrics.json", '{"study": "other"}'))
# A changed study file on resume (the prepared study has prune_rate [0.0, 0.7], criteria l1, proxy).
ADD_CRITERION = edit("rate_step = 0.05", 'rate_step = 0.05\ncriteria = ["l1", "fpgm"]')


IMAGEFOLDER = edit('dataset = "digits"\nval_size = 200', 'dataset = "imagefolder"\nroot = "imgs"\nval_size = 2')
RGB_MODEL = edit('checkpoint = "base.pt"', 'checkpoint = "rgb.pt"')


# ----------------------------------------------------------------------------- the cases

RUN = ["run", S, "--no-progress"]
# (id, setup, argv, needles, needs_prepared_study)
CASES: list = [
    # --- the study file itself
    ("missing-study-file", None, ["run", "nope.toml"], ["study file not found", "nope.toml"], False),
    ("directory-as-study-file", write("adir/x.txt", "x"), ["run", "adir"], ["adir", "is a directory"], False),
    ("not-utf8", write(S, b"\xff\xfe[study]\x00\x81"), RUN, ["study.toml", "cannot read"], False),
    ("toml-syntax", edit("n_trials = 3", "n_trials = = 3"), RUN, ["study.toml:3", "TOML syntax error"], False),
    ("empty-file", write(S, ""), RUN, ["study.toml", "missing section [study]"], False),
    ("wrong-type", edit("n_trials = 3", 'n_trials = "three"'), RUN, ["[study] n_trials", "expected an integer"], False),
    (
        "section-not-table",
        write(S, "constraint = 3\n" + BASE_STUDY.replace("[constraint]\nmax_macs_ratio = 0.7", "")),
        RUN,
        ["[constraint]", "must be a table"],
        False,
    ),
    ("unknown-key", edit("n_trials = 3", "n_trial = 3"), RUN, ["[study]", "unknown key 'n_trial'", "n_trials"], False),
    (
        "unknown-section",
        edit("[constraint]", "[constraints]"),
        RUN,
        ["unknown section [constraints]", "constraint"],
        False,
    ),
    (
        "unset-env-var",
        edit('name = "bad"', 'name = "bad"\nstorage = "${SLIM_NO_SUCH_VAR}"'),
        RUN,
        ["[study]", "SLIM_NO_SUCH_VAR is not set"],
        False,
    ),
    # --- [study]
    ("bad-study-name", edit('name = "bad"', 'name = "a/b"'), RUN, ["[study] name", "'a/b'"], False),
    ("n-trials-0", edit("n_trials = 3", "n_trials = 0"), RUN, ["[study] n_trials", "must be in [1, 1000000]"], False),
    (
        "unknown-sampler",
        edit('name = "bad"', 'name = "bad"\nsampler = "bayes"'),
        RUN,
        ["[study] sampler", "'bayes'", "tpe"],
        False,
    ),
    (
        "bad-objective",
        edit('name = "bad"', 'name = "bad"\nobjectives = ["accuracy:max"]'),
        RUN,
        ["[study] objectives", "'accuracy:max'"],
        False,
    ),
    (
        "grace-below-heartbeat",
        edit("grace_period = 2", "grace_period = 1"),
        RUN,
        ["[study] grace_period", "heartbeat_interval"],
        False,
    ),
    (
        "malformed-storage-url",
        edit('name = "bad"', 'name = "bad"\nstorage = "postgres//nohost"'),
        RUN,
        ["[study] storage", "postgres//nohost"],
        False,
    ),
    (
        "sqlite-memory-storage",
        edit('name = "bad"', 'name = "bad"\nstorage = "sqlite://"'),
        RUN,
        ["[study] storage", "must name a file"],
        False,
    ),
    (
        "sqlite-unwritable",
        edit('name = "bad"', 'name = "bad"\nstorage = "sqlite:////proc/slim/x.db"'),
        RUN,
        ["/proc/slim/x.db", "cannot create"],
        False,
    ),
    (
        "unreachable-postgresql",
        edit('name = "bad"', 'name = "bad"\nstorage = "postgresql://u@127.0.0.1:1/db"'),
        RUN,
        ["cannot open storage", "127.0.0.1", "refused"],
        False,
    ),
    # --- [model]
    (
        "unknown-model",
        edit('factory = "smallcnn"', 'factory = "resnet7"'),
        RUN,
        ["[model] factory", "unknown model 'resnet7'"],
        False,
    ),
    (
        "factory-does-not-import",
        edit('factory = "smallcnn"', 'factory = "no_such_pkg.models:net"'),
        RUN,
        ["[model] factory", "cannot import 'no_such_pkg.models'"],
        False,
    ),
    (
        "factory-missing-function",
        steps(write("usermodels.py", USER_MODELS), edit('factory = "smallcnn"', 'factory = "usermodels:nothing_here"')),
        RUN,
        ["[model] factory", "no callable 'nothing_here'"],
        False,
    ),
    (
        "factory-returns-non-module",
        steps(write("usermodels.py", USER_MODELS), edit('factory = "smallcnn"', 'factory = "usermodels:not_a_model"')),
        RUN,
        ["[model] factory", "returned int, not an nn.Module"],
        False,
    ),
    (
        "factory-raises",
        steps(write("usermodels.py", USER_MODELS), edit('factory = "smallcnn"', 'factory = "usermodels:crashes"')),
        RUN,
        ["[model] factory", "usermodels:crashes", "factory exploded"],
        False,
    ),
    (
        "no-checkpoint-no-pretrain",
        edit('checkpoint = "base.pt"', "pretrain_epochs = 0"),
        RUN,
        ["[model]", "needs a checkpoint"],
        False,
    ),
    (
        "missing-checkpoint",
        edit('checkpoint = "base.pt"', 'checkpoint = "gone.pt"'),
        RUN,
        ["[model] checkpoint", "not found", "gone.pt"],
        False,
    ),
    (
        "corrupt-checkpoint",
        steps(write("junk.pt", os.urandom(4096)), edit("base.pt", "junk.pt")),
        RUN,
        ["[model] checkpoint", "junk.pt", "corrupt"],
        False,
    ),
    (
        "other-architecture-checkpoint",
        steps(save_state("r20.pt", "resnet20"), edit("base.pt", "r20.pt")),
        RUN,
        ["[model] checkpoint", "does not fit model SmallCNN"],
        False,
    ),
    (
        "checkpoint-not-state-dict",
        steps(write("list.pt", b""), lambda d: torch.save([1, 2, 3], d / "list.pt"), edit("base.pt", "list.pt")),
        RUN,
        ["[model] checkpoint", "no state dict"],
        False,
    ),
    # --- [data]
    (
        "missing-data-folder",
        edit('dataset = "digits"', 'dataset = "imagefolder"\nroot = "no_such_dir"'),
        RUN,
        ["[data] root", "no_such_dir", "does not exist"],
        False,
    ),
    ("unknown-dataset", edit('dataset = "digits"', 'dataset = "mnist"'), RUN, ["[data] dataset", "'mnist'"], False),
    (
        "empty-class-folder",
        steps(
            image_folder("imgs", empty_class=True),
            IMAGEFOLDER,
            RGB_MODEL,
            save_state("rgb.pt", "smallcnn", in_channels=3),
        ),
        RUN,
        ["[data]", "emu", "no ", "images"],
        False,
    ),
    (
        "corrupt-image",
        steps(
            image_folder("imgs", corrupt=True), IMAGEFOLDER, RGB_MODEL, save_state("rgb.pt", "smallcnn", in_channels=3)
        ),
        RUN,
        ["[data]", "cannot decode image", "3.png"],
        False,
    ),
    ("val-size-too-large", edit("val_size = 200", "val_size = 100000"), RUN, ["[data]", "val_size 100000"], False),
    # --- [constraint]
    (
        "max-macs-ratio-above-1",
        edit("max_macs_ratio = 0.7", "max_macs_ratio = 1.5"),
        RUN,
        ["[constraint] max_macs_ratio", "(0, 1]"],
        False,
    ),
    (
        "max-macs-ratio-zero",
        edit("max_macs_ratio = 0.7", "max_macs_ratio = 0.0"),
        RUN,
        ["[constraint] max_macs_ratio", "(0, 1]"],
        False,
    ),
    (
        "max-macs-ratio-negative",
        edit("max_macs_ratio = 0.7", "max_macs_ratio = -0.2"),
        RUN,
        ["[constraint] max_macs_ratio", "(0, 1]"],
        False,
    ),
    (
        "max-latency-ratio-above-1",
        edit("max_macs_ratio = 0.7", "max_macs_ratio = 0.7\nmax_latency_ratio = 2"),
        RUN,
        ["[constraint] max_latency_ratio", "(0, 1]"],
        False,
    ),
    # --- [space]
    (
        "prune-rate-1",
        edit("prune_rate = [0.0, 0.7]", "prune_rate = [0.0, 1.0]"),
        RUN,
        ["[space] prune_rate", "< 1"],
        False,
    ),
    (
        "rank-ratio-negative",
        edit("rate_step = 0.05", "rate_step = 0.05\nrank_ratio = [-0.1, 0.5]"),
        RUN,
        ["[space] rank_ratio", "-0.1"],
        False,
    ),
    (
        "rank-ratio-above-1",
        edit("rate_step = 0.05", "rate_step = 0.05\nrank_ratio = [0.5, 1.5]"),
        RUN,
        ["[space] rank_ratio", "1.5"],
        False,
    ),
    (
        "unknown-criterion",
        edit("rate_step = 0.05", 'rate_step = 0.05\ncriteria = ["l3"]'),
        RUN,
        ["[space] criteria", "'l3'", "fpgm"],
        False,
    ),
    (
        "unknown-decomposition",
        edit("rate_step = 0.05", 'rate_step = 0.05\ndecomposition = ["svd"]'),
        RUN,
        ["[space] decomposition", "'svd'"],
        False,
    ),
    (
        "unknown-layer-pattern",
        edit("rate_step = 0.05", 'rate_step = 0.05\ninclude = ["features.99"]'),
        RUN,
        ["[space] include", "'features.99'", "matches no conv layer"],
        False,
    ),
    (
        "cp-on-1x1-conv-only",
        steps(
            write("usermodels.py", USER_MODELS),
            edit('factory = "smallcnn"', 'factory = "usermodels:pointwise"'),
            edit('checkpoint = "base.pt"', "pretrain_epochs = 1"),
            edit(
                "prune_rate = [0.0, 0.7]\nrate_step = 0.05",
                'prune_rate = [0.0, 0.7]\ninclude = ["pw"]\ndecomposition = ["cp"]',
            ),
        ),
        RUN,
        ["[space]", "pw", "1x1"],
        False,
    ),
    # --- [seeds], [evaluator], [export]
    (
        "unknown-seed-strategy",
        write(S, BASE_STUDY + '\n[seeds]\nstrategies = ["magic"]\n'),
        RUN,
        ["[seeds] strategies", "'magic'"],
        False,
    ),
    (
        "seed-rate-1",
        write(S, BASE_STUDY + '\n[seeds]\nstrategies = ["uniform"]\nuniform_rates = [1.0]\n'),
        RUN,
        ["[seeds]", "uniform_rates"],
        False,
    ),
    ("unknown-evaluator-kind", edit('kind = "proxy"', 'kind = "oracle"'), RUN, ["[evaluator] kind", "'oracle'"], False),
    ("evaluator-lr-negative", edit('kind = "proxy"', 'kind = "finetune"\nlr = -1.0'), RUN, ["[evaluator] lr"], False),
    (
        "unknown-export-format-in-file",
        write(S, BASE_STUDY + '\n[export]\nformats = ["tflite"]\n'),
        RUN,
        ["[export] formats", "'tflite'"],
        False,
    ),
    # --- command-line arguments
    ("workers-0", None, ["run", S, "--workers", "0"], ["--workers", "'0'"], False),
    ("n-trials-option-0", None, ["run", S, "--n-trials", "0"], ["--n-trials", "'0'"], False),
    (
        "unreachable-ray-address",
        None,
        ["run", S, "--ray-address", "127.0.0.1:1"],
        ["cannot connect to Ray", "127.0.0.1:1"],
        False,
    ),
    ("status-never-ran", None, ["status", S], ["no study storage", "slimsearch run"], False),
    ("worker-never-ran", None, ["worker", S], ["no study storage"], False),
    ("train-epochs-0", None, ["train", "smallcnn", "--epochs", "0", "--out", "m.pt"], ["--epochs"], False),
    (
        "cost-corrupt-checkpoint",
        write("junk.pt", os.urandom(1000)),
        ["cost", "smallcnn", "--checkpoint", "junk.pt"],
        ["junk.pt", "corrupt"],
        False,
    ),
    # --- numbers without an upper bound used to start unbounded work or overflow (issue 20)
    (
        "n-trials-huge",
        edit("n_trials = 3", "n_trials = 1000000000000"),
        RUN,
        ["[study] n_trials", "must be in [1, 1000000]"],
        False,
    ),
    (
        "seed-beyond-64-bits",
        edit('name = "bad"', 'name = "bad"\nseed = 18446744073709551616'),
        RUN,
        ["[study] seed", "must be in [0, 4294967295]"],
        False,
    ),
    (
        "heartbeat-huge",
        edit("heartbeat_interval = 1\ngrace_period = 2", "heartbeat_interval = 1000000000000"),
        RUN,
        ["[study] heartbeat_interval", "must be in [1, "],
        False,
    ),
    (
        "timeout-huge",
        edit("n_trials = 3", "n_trials = 3\ntimeout = 1e300"),
        RUN,
        ["[study] timeout", "must be in (0, "],
        False,
    ),
    ("max-retry-huge", edit("n_trials = 3", "n_trials = 3\nmax_retry = 10000000"), RUN, ["[study] max_retry"], False),
    ("data-seed-huge", edit("val_size = 200", "val_size = 200\nseed = 4294967296"), RUN, ["[data] seed"], False),
    ("val-size-count-huge", edit("val_size = 200", "val_size = 10000000000000"), RUN, ["[data] val_size"], False),
    (
        "evaluator-steps-huge",
        edit('kind = "proxy"', 'kind = "finetune"\nsteps = 1000000000000'),
        RUN,
        ["[evaluator] steps", "must be in [1, "],
        False,
    ),
    (
        "evaluator-seed-huge",
        edit('kind = "proxy"', 'kind = "proxy"\nseed = 4294967296'),
        RUN,
        ["[evaluator] seed", "must be in [0, 4294967295]"],
        False,
    ),
    (
        "export-top-k-huge",
        write(S, BASE_STUDY + "\n[export]\nfinetune_epochs = 1\ntop_k = 100000000\n"),
        RUN,
        ["[export] top_k", "must be in [1, "],
        False,
    ),
    (
        "seed-method-option-huge",
        write(S, BASE_STUDY + '\n[seeds]\nstrategies = ["ga"]\nga_generations = 1000000000000\n'),
        RUN,
        ["[seeds] ga_generations", "<= 1000000"],
        False,
    ),
    (
        "seed-method-option-nan",
        write(S, BASE_STUDY + '\n[seeds]\nstrategies = ["abshpc"]\nabshpc_epsilon = nan\n'),
        RUN,
        ["[seeds] abshpc_epsilon", "finite"],
        False,
    ),
    ("workers-huge", None, ["run", S, "--workers", "100000"], ["--workers", "'100000'"], False),
    ("n-trials-option-huge", None, ["run", S, "--n-trials", "10000000000"], ["--n-trials"], False),
    ("train-epochs-inf", None, ["train", "smallcnn", "--epochs", "inf", "--out", "m.pt"], ["--epochs", "inf"], False),
    # --- errors that say where (issue 20)
    (
        "val-size-selects-nothing",
        edit("val_size = 200", "val_size = 0.0001"),
        RUN,
        ["[data]", "val_size 0.0001", "no validation image"],
        False,
    ),  # fmt: skip
    (
        "num-classes-below-data",
        edit('checkpoint = "base.pt"', 'checkpoint = "base.pt"\nnum_classes = 3'),
        RUN,
        ["[model] num_classes", "10 classes"],
        False,
    ),
    (
        "factory-parses-argv-at-import",
        steps(write("argvmodels.py", ARGV_MODELS), edit('factory = "smallcnn"', 'factory = "argvmodels:net"')),
        RUN,
        ["[model] factory", "argvmodels:net", "sys.exit(2)"],
        False,
    ),
    (
        "factory-calls-sys-exit",
        steps(write("exitmodels.py", EXITING_MODELS), edit('factory = "smallcnn"', 'factory = "exitmodels:net"')),
        RUN,
        ["[model] factory", "exitmodels:net", "no GPU found"],
        False,
    ),
    # --- cheap checks first, then the disk (issue 20): nothing extracted, decoded, cached or created
    (
        "archive-with-missing-checkpoint",
        steps(
            image_folder("imgs"),
            archive("imgs.tar.gz"),
            edit('dataset = "digits"\nval_size = 200', 'dataset = "imagefolder"\nroot = "imgs.tar.gz"\nval_size = 2'),
            edit("base.pt", "gone.pt"),
        ),
        RUN,
        ["[model] checkpoint", "gone.pt", "not found"],
        False,
    ),  # fmt: skip
    (
        "archive-with-other-architecture-checkpoint",
        steps(
            image_folder("imgs"),
            archive("imgs.tar.gz"),
            edit('dataset = "digits"\nval_size = 200', 'dataset = "imagefolder"\nroot = "imgs.tar.gz"\nval_size = 2'),
            save_state("r20.pt", "resnet20"),
            edit("base.pt", "r20.pt"),
        ),
        RUN,
        ["[model] checkpoint", "does not fit model SmallCNN"],
        False,
    ),  # fmt: skip
    (
        "corrupt-archive",
        steps(
            write("imgs.tar.gz", b"\x1f\x8b\x08\x00" + os.urandom(300)),
            edit('dataset = "digits"\nval_size = 200', 'dataset = "imagefolder"\nroot = "imgs.tar.gz"\nval_size = 2'),
            RGB_MODEL,
            save_state("rgb.pt", "smallcnn", in_channels=3),
        ),
        RUN,
        ["[data]", "cannot extract archive", "imgs.tar.gz"],
        False,
    ),  # fmt: skip
    ("status-on-empty-db", write("runs/bad.db", b""), ["status", S], ["runs/bad.db", "empty file"], False),
    ("export-on-empty-db", write("runs/bad.db", b""), ["export", S], ["runs/bad.db", "empty file"], False),
    (
        "workdir-under-a-file",
        steps(write("afile", "x"), edit('name = "bad"', 'name = "bad"\nworkdir = "afile/work"')),
        RUN,
        ["[study] workdir", "afile", "not a folder"],
        False,
    ),
    # --- user-given output paths: never remove or overwrite what the command did not write (issue 20)
    (
        "export-out-user-folder",
        write("mydata/important.txt", "mine"),
        ["export", S, "--trial", "1", "--out", "mydata"],
        ["--out", "mydata", "not an earlier export", "important.txt"],
        True,
    ),
    (
        "export-out-user-folder-outside",
        write("../sibling-i20/important.txt", "mine"),
        ["export", S, "--trial", "1", "--out", "../sibling-i20"],
        ["--out", "sibling-i20", "not an earlier export"],
        True,
    ),
    (
        "export-out-earlier-export-plus-user-file",
        steps(write("mine/manifest.json", "{}"), write("mine/model.pt", b"x"), write("mine/notes.txt", "mine")),
        ["export", S, "--trial", "1", "--out", "mine"],
        ["--out", "not an earlier export", "notes.txt"],
        True,
    ),
    ("export-out-other-study", OTHER_EXPORT, ["export", S, "--trial", "1", "--out", "theirs"], ["'other'"], True),
    (
        "export-config-out-user-folder",
        steps(edit("[evaluator]", '[export]\nout = "ex"\n\n[evaluator]'), write("ex/trial-1/keep.txt", "mine")),
        ["export", S, "--trial", "1"],
        ["[export] out", "trial-1", "keep.txt"],
        True,
    ),
    (
        "report-out-user-folder",
        write("mine/trials.csv", "my own table"),
        ["report", S, "--out", "mine"],
        ["--out", "mine", "not an earlier report"],
        True,
    ),
    (
        "train-out-not-a-checkpoint",
        write("notes.txt", "mine"),
        ["train", "smallcnn", "--epochs", "1", "--out", "notes.txt"],
        ["--out", "notes.txt", "not a checkpoint"],
        False,
    ),
    # --- a study resumed with a changed study file (issue 20): refused, naming the keys and the two ways out
    ("resume-changed-space", ADD_CRITERION, RUN, ["[space] criteria", "new [study] name", "revert"], True),
    (
        "resume-changed-bound-and-evaluator",
        steps(edit("max_macs_ratio = 0.7", "max_macs_ratio = 0.42"), edit('kind = "proxy"', 'kind = "finetune"')),
        RUN,
        ["[constraint] max_macs_ratio", "[evaluator] kind", "0.7 -> 0.42"],
        True,
    ),
    (
        "resume-changed-space-with-more-trials",
        ADD_CRITERION,
        [*RUN, "--n-trials", "4"],
        ["[space] criteria"],
        True,
    ),
    ("resume-changed-val-size", edit("val_size = 200", "val_size = 300"), RUN, ["[data] val_size"], True),
    (
        "resume-changed-seeds",
        edit("[evaluator]", '[seeds]\nstrategies = ["uniform"]\nuniform_rates = [0.3]\n\n[evaluator]'),
        RUN,
        ["[seeds] strategies"],
        True,
    ),
    (
        "resume-changed-fit",
        edit("max_macs_ratio = 0.7", 'max_macs_ratio = 0.7\nfit = "none"'),
        RUN,
        ["[constraint] fit"],
        True,
    ),  # fmt: skip
    ("worker-changed-space", ADD_CRITERION, ["worker", S], ["[space] criteria", "revert"], True),
    # --- on an existing study (trial 0 FAILed: NaN loss; trial 1 COMPLETE)
    ("export-unknown-format", None, ["export", S, "--format", "tflite"], ["--format", "'tflite'", "onnx"], True),
    ("export-failed-trial", None, ["export", S, "--trial", "0"], ["--trial 0", "FAIL", "loss is"], True),
    ("export-missing-trial", None, ["export", S, "--trial", "99"], ["--trial 99", "no such trial"], True),
    ("export-trial-not-a-number", None, ["export", S, "--trial", "first"], ["--trial", "'first'"], True),
    (
        "export-out-is-a-file",
        write("taken", "x"),
        ["export", S, "--trial", "1", "--out", "taken"],
        ["--out", "taken", "not a directory"],
        True,
    ),
    ("report-missing-trial", None, ["report", S, "--trial", "42"], ["--trial 42", "no such trial"], True),
    (
        "changed-objectives",
        edit('name = "bad"', 'name = "bad"\nobjectives = ["val_acc:max", "macs:min"]'),
        RUN,
        ["study 'bad'", "directions"],
        True,
    ),
    ("changed-baseline", save_state("base.pt", "smallcnn", seed=7), RUN, ["baseline", "weights"], True),
]


# Cases that start torch and build data/model/storage cost seconds each; these repeat a path a fast case
# already covers and run with the slow tests only (``-m slow``).
SLOW_CASES = {
    "factory-does-not-import", "factory-missing-function", "factory-returns-non-module", "checkpoint-not-state-dict",
    "val-size-too-large", "cp-on-1x1-conv-only", "unknown-seed-strategy", "seed-rate-1", "sqlite-unwritable",
    "unreachable-ray-address", "worker-never-ran", "train-epochs-0", "cost-corrupt-checkpoint", "empty-class-folder",
    "export-unknown-format", "export-trial-not-a-number", "export-out-is-a-file", "report-missing-trial",
    "changed-objectives", "changed-baseline", "unknown-model", "status-never-ran",
    "timeout-huge", "max-retry-huge", "data-seed-huge", "val-size-count-huge", "evaluator-seed-huge",
    "n-trials-option-huge", "factory-calls-sys-exit", "export-on-empty-db", "export-out-user-folder-outside",
    "export-out-earlier-export-plus-user-file", "export-out-other-study", "resume-changed-val-size",
    "resume-changed-fit", "archive-with-other-architecture-checkpoint", "seed-method-option-nan",
}  # fmt: skip


def _params() -> list:
    return [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else []) for c in CASES]


@pytest.mark.parametrize(("setup", "argv", "needles", "prepared"), _params())
def test_bad_input_exits_2_one_line_nothing_written(
    setup: Callable[[Path], None] | None,
    argv: list[str],
    needles: list[str],
    prepared: bool,
    tmp_path: Path,
    base_ckpt: Path,
    request: pytest.FixtureRequest,
) -> None:
    d = tmp_path / "case"
    if prepared:
        shutil.copytree(request.getfixturevalue("prepared_study"), d)
    else:
        d.mkdir()
        shutil.copy(base_ckpt, d / "base.pt")
        (d / S).write_text(BASE_STUDY)
    if setup is not None:
        setup(d)
    before = snapshot(tmp_path)  # the case folder and its siblings (an --out ../elsewhere)
    res = subprocess.run([sys.executable, "-m", "slimsearch", *argv], cwd=d, env=case_env(d), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    lines = res.stderr.splitlines()
    assert res.returncode == 2, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert len(lines) == 1 and lines[0].startswith("slimsearch: error: ") and lines[0][19:].strip(), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"
    after = snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files created or changed: {changed}"


def test_case_table_is_big_and_unique() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and SLOW_CASES <= set(ids)
    assert len(ids) - len(SLOW_CASES) >= 25  # the fast run alone has at least 25 cases


def test_study_dataset_names_match_core_data() -> None:
    from slimsearch.core.data import DATASETS
    from slimsearch.search.study import DATASETS as STUDY_DATASETS

    assert STUDY_DATASETS == DATASETS


def test_study_export_formats_match_core_export() -> None:
    from slimsearch.core.export import FORMATS, MEMORY_FORMATS
    from slimsearch.search.study import EXPORT_FORMATS, EXPORT_MEMORY_FORMATS

    assert EXPORT_FORMATS == FORMATS and EXPORT_MEMORY_FORMATS == (*MEMORY_FORMATS, "auto")
