"""Every key of a study file, as data: the tables ``search.study`` validates with and docs/study-file.md is made of.

``[space]`` and ``[evaluator]`` keep their tables beside their config classes (``spaces.config.SPACE_KEYS``,
``evaluators.config.EVALUATOR_KEYS``); the other sections are here. ``python -m slimsearch.search.schema`` prints
the reference; ``tests/test_schema.py`` checks that the committed docs/study-file.md is exactly that output.
This module imports neither torch nor Optuna (reading a study file stays fast).
"""

from __future__ import annotations

from slimsearch.core.schema import Key, markdown
from slimsearch.evaluators.config import CONSTRAINT_KEYS, EVALUATOR_KEYS, FIT_MODES, SEED_MAX  # noqa: F401
from slimsearch.spaces.config import SPACE_KEYS

SAMPLERS = ("tpe", "nsga2", "cmaes", "local", "random")
BACKENDS = ("optuna", "ray")
PRUNERS = ("median", "none")
# = core.data.DATASETS (a test checks it); not imported from there, so that reading a study file does
# not import torch (status/report/errors answer in a fraction of the time).
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
# = core.export.FORMATS (a test checks it), for the same reason as DATASETS.
EXPORT_FORMATS = ("pt2", "onnx", "torchscript", "torchscript-frozen", "state")
EXPORT_MEMORY_FORMATS = ("contiguous", "channels_last", "auto")  # core.export.MEMORY_FORMATS, or the faster
# = core.latency.RUNTIMES (a test checks it): what latency tables, bounds, measured latencies and speed-ups time.
RUNTIMES = ("torchscript", "onnxruntime")

STUDY_KEYS: tuple[Key, ...] = (
    Key(
        "name",
        "str",
        None,
        "the study's name: 1-100 letters, digits, `.`, `_` or `-`; names its storage, workdir and Optuna study",
        required=True,
    ),
    Key(
        "storage",
        "str",
        "sqlite:///runs/<name>.db",
        "where trials live: `sqlite:///path.db` (one machine), "
        "`postgresql://user:${PGPASSWORD}@host/db` (several; docs/clusters.md) or `mysql://...`; passwords are "
        "always printed masked",
    ),
    Key(
        "workdir",
        "path",
        "runs/<name>",
        "folder of the cached baseline, result cache, latency table, reports and exports",
    ),
    Key(
        "sampler",
        "choice",
        "tpe",
        "the search algorithm: `tpe`, `nsga2` (several objectives), `cmaes`, `random`, "
        "or `local` (mutations of the best trials, to refine seeds); `cmaes` and `local` are single-objective",
        choices=SAMPLERS,
    ),
    Key(
        "objectives",
        "strs",
        ("val_acc:max",),
        "`METRIC:max` or `METRIC:min`, one or several (a Pareto front), "
        "METRIC one of val_acc, macs, flops, params, macs_ratio, params_ratio, latency_ms (needs `[evaluator] "
        "measure_latency`), latency_pred_ms (needs `[constraint] max_latency_ratio`); bounds are constraints, "
        "not objectives",
    ),
    Key(
        "n_trials",
        "int",
        50,
        "trials to run: COMPLETE, PRUNED and evaluator-FAILED ones count; a trial whose "
        "process died is retried and not counted (`run --n-trials` grows a finished study)",
        lo=1,
        hi=1_000_000,
    ),
    Key(
        "backend",
        "choice",
        "optuna",
        "`optuna` (SQLite/PostgreSQL storage, `slimsearch worker`) or `ray` (Ray Tune; docs/clusters.md)",
        choices=BACKENDS,
    ),
    Key("seed", "int", 0, "seed of the sampler and of the baseline's initial weights", lo=0, hi=SEED_MAX),
    Key(
        "timeout",
        "float",
        None,
        "stop starting trials after this many seconds (the study stays resumable); unset: no limit",
        lo=0,
        hi=1e7,
        lo_open=True,
    ),
    Key(
        "pruner",
        "choice",
        "median",
        "`median` stops a fine-tune trial whose val accuracy at a report "
        "(`[evaluator] eval_every`) is below the median of earlier trials (single objective only); `none` never "
        "stops one",
        choices=PRUNERS,
    ),
    Key(
        "heartbeat_interval",
        "int",
        10,
        "seconds between a running trial's heartbeats (backend optuna); a trial "
        "silent for `grace_period` is failed and retried",
        lo=1,
        hi=3600,
    ),
    Key(
        "grace_period",
        "int",
        None,
        "seconds without a heartbeat after which a trial counts as dead; must exceed "
        "`heartbeat_interval`; unset: Optuna's default (twice the interval)",
        lo=1,
        hi=86_400,
    ),
    Key("max_retry", "int", 2, "how often a dead trial is retried with the same parameters", lo=0, hi=100),
    Key(
        "n_startup_trials",
        "int",
        10,
        "random trials before `tpe`, `cmaes` or `local` model the results",
        lo=0,
        hi=1_000_000,
    ),
    Key("population_size", "int", 20, "population of `nsga2` (and of Ray's evolutionary search)", lo=2, hi=100_000),
    Key(
        "device",
        "str",
        "auto",
        "where trials, fine-tunes, seeds and methods run: `auto` (cuda when there is one), `cpu`, `cuda` or "
        "`cuda:N`; latency is always measured on the CPU (`run --device` overrides)",
    ),
)

MODEL_KEYS: tuple[Key, ...] = (
    Key(
        "factory",
        "str",
        None,
        "a zoo model (resnet20/32/44/56/110, vgg11/13/16/19, alexnet, smallcnn) or "
        '`"pkg.module:fn"`, a function taking `num_classes` (and `in_channels`) that returns an `nn.Module`; not '
        "needed for a module given in Python (`slimsearch.load_study(..., model=net)`)",
        required=True,
    ),
    Key("checkpoint", "path", None, "state dict of the trained baseline (loaded with `weights_only=True`)"),
    Key("num_classes", "int", None, "classes of the model's output; unset: the dataset's", lo=2, hi=100_000),
    Key("in_channels", "int", None, "input channels; unset: the dataset's", lo=1, hi=1024),
    Key("input_size", "int", None, "input height and width in pixels; unset: the dataset's", lo=1, hi=8192),
    Key(
        "pretrain_epochs",
        "float",
        0.0,
        "without a checkpoint: train the baseline this long first (cached in the workdir's baseline.pt with a "
        "fingerprint of the recipe: reused on resume and by workers, retrained when the recipe changes)",
        lo=0,
        hi=10_000,
    ),
    Key("pretrain_lr", "float", 0.05, "learning rate of that pre-training", lo=0, hi=10, lo_open=True),
    Key("pretrain_batch_size", "int", 128, "batch size of that pre-training", lo=1, hi=65_536),
    Key(
        "pretrain_checkpoint_steps",
        "int",
        100,
        "save the pre-training every this many steps (atomically, in the workdir's baseline.partial.pt): a rerun "
        "after a kill continues from there",
        lo=1,
        hi=10_000_000,
    ),
)

DATA_KEYS: tuple[Key, ...] = (
    Key(
        "dataset",
        "choice",
        "digits",
        "`digits` (scikit-learn's 8x8 digits, shipped), `synthetic`, `cifar10`, "
        "`cifar100`, `imagefolder` (class folders, or train/ with any of val/ and test/); the last three need `root`",
        choices=DATASETS,
    ),
    Key(
        "root",
        "path",
        None,
        "a folder, a CIFAR pickle folder or a `.tar.gz`/`.tgz`/`.tar`/`.zip` archive of one "
        "(read in place, decoded once into `$SLIMSEARCH_CACHE`)",
    ),
    Key(
        "val_size",
        "count_or_fraction",
        0.1,
        "images taken out of the train split for validation (search scores "
        "use val only; the test split only reports the export); unused with an explicit val/ folder",
        lo=1,
        hi=10_000_000,
    ),
    Key("seed", "int", 0, "seed of the train/val split", lo=0, hi=SEED_MAX),
    Key(
        "val_from",
        "choice",
        "train",
        "`train` (val held out of the training images) or `test` (val taken from the test split, test reports "
        "only the rest: images the checkpoint never trained on; README, Clean selection data)",
        choices=("train", "test"),
    ),
    Key("val_root", "path", None, "a folder or archive of held-out class folders: all of it is val"),
    Key(
        "image_size",
        "floats",
        None,
        "`[H, W]`: resize every image of an image folder (bilinear) as it is first decoded; each size is "
        "cached separately (without it, images of different sizes are refused)",
        lo=1,
        hi=4096,
    ),
    Key(
        "factory",
        "str",
        None,
        '`"pkg.module:fn"` returning your own `(train, val[, test])` splits (tensors or torch Datasets; README, '
        "Own data) instead of `dataset`; it gets the parameters it declares among `root`, `seed`, `val_size`",
    ),
)

SEEDS_KEYS: tuple[Key, ...] = (
    Key(
        "strategies",
        "strs",
        (),
        "policies evaluated as the first trials: `uniform` (`uniform_rates`, "
        "`uniform_criterion`: one rate everywhere), `global` (`global_fractions`, `global_criterion`: one threshold "
        "over every unit's normalised filter norms), `tp_global` (`tp_global_ratios`, `tp_global_criterion`: "
        "Torch-Pruning's global pruning chooses each layer's count, our criterion the filters; default ratio "
        "bisected onto the MACs bound), and the paper methods `abshpc`, `mtd`, `ga`, `distfit`; a strategy's "
        "options are `<strategy>_<option>` keys or a `[seeds.<strategy>]` table",
    ),
    Key(
        "budget",
        "int",
        None,
        "evaluator calls of all method strategies together; once spent, a method's "
        "further steps are rejected unevaluated; unset: unlimited",
        lo=1,
        hi=1_000_000,
    ),
)

EXPORT_KEYS: tuple[Key, ...] = (
    Key(
        "formats",
        "choices",
        ("pt2", "torchscript"),
        "`pt2` (`torch.export`, the main artefact), `onnx` (opset 18, dynamic batch, checked by `onnx.checker` "
        "and an ONNX Runtime run; for ONNX Runtime, OpenVINO, TensorRT, TFLite via onnx2tf; needs the "
        "`slimsearch[onnx]` extra), `torchscript`, `torchscript-frozen` (BatchNorm folded by `torch.jit.freeze`, no "
        "parameters), `state` (state dict plus policy); manifest.json's `deploy` says which file suits which runtime",
        choices=EXPORT_FORMATS,
    ),
    Key("out", "path", None, "export folder; unset: `<workdir>/export` (each trial in `trial-<n>/`)"),
    Key("finetune_epochs", "float", 0.0, "final fine-tune of the exported trial on the train split", lo=0, hi=10_000),
    Key("finetune_lr", "float", 0.01, "learning rate of the final fine-tune", lo=0, hi=10, lo_open=True),
    Key("finetune_batch_size", "int", 128, "batch size of the final fine-tune", lo=1, hi=65_536),
    Key("kd", "bool", False, "distil from the baseline during the final fine-tune"),
    Key(
        "memory_format",
        "choice",
        "contiguous",
        "conv weight layout of the TorchScript programs: `contiguous` "
        "(NCHW), `channels_last` (NHWC weights, still NCHW inputs), or `auto` (times both at batch 1 against the "
        "baseline's and keeps the faster; measurements in benchmarks/README.md)",
        choices=EXPORT_MEMORY_FORMATS,
    ),
    Key(
        "top_k",
        "int",
        1,
        "the default of `export --top-k`: the K best trials (distinct networks) get the final "
        "fine-tune and the best on val is exported; needs `finetune_epochs`",
        lo=1,
        hi=100,
    ),
    Key(
        "runtime",
        "choice",
        "torchscript",
        "what every latency is timed in: the latency table and `[constraint] max_latency_ratio`, "
        "`[evaluator] measure_latency`'s latency_ms, the export's speed-up line and bound check: `torchscript` "
        "(the TorchScript program) or `onnxruntime` (the ONNX export in an ONNX Runtime session, graph "
        "optimisations on; needs the `slimsearch[onnx]` extra)",
        choices=RUNTIMES,
    ),
    Key(
        "threads",
        "int",
        1,
        "intra-op threads of those timings (ONNX Runtime's `intra_op_num_threads`, torch's num_threads)",
        lo=1,
        hi=1024,
    ),
)

SECTIONS: dict[str, tuple[Key, ...]] = {
    "study": STUDY_KEYS,
    "model": MODEL_KEYS,
    "data": DATA_KEYS,
    "constraint": CONSTRAINT_KEYS,
    "space": SPACE_KEYS,
    "seeds": SEEDS_KEYS,
    "evaluator": EVALUATOR_KEYS,
    "export": EXPORT_KEYS,
}

_HEADER = """# Study file reference

<!-- Generated by `python -m slimsearch.search.schema > docs/study-file.md` from the tables the study-file
validator uses (search/schema.py, spaces/config.py, evaluators/config.py); tests/test_schema.py keeps them equal. -->

A study file is TOML with these sections; only `[study]` and `[model]` are required. Every number has the range
shown, every error names the file, section and key (`study.toml: [study] n_trials: must be in [1, 1000000], got
0`), and an unknown key gets a "did you mean" hint. String values may use `${VAR}` and `${VAR:-default}`;
relative paths resolve against the current directory. Examples: `studies/*.toml`.
"""


def reference() -> str:
    """docs/study-file.md: one table per section."""
    return _HEADER + "".join("\n" + markdown(name, keys) for name, keys in SECTIONS.items())


if __name__ == "__main__":
    print(reference(), end="")
