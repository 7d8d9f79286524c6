"""Study files: TOML -> a validated, immutable ``StudyConfig``.

Every error is a ``SlimError`` naming the file, the section and key, and the allowed values
(TOML syntax errors: file and line). String values may use ``${VAR}`` / ``${VAR:-default}``;
relative paths resolve against the current directory, once, at load time (so worker processes
started elsewhere see the same files).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib
from slimsearch.core.errors import SlimError
from slimsearch.core.schema import Key, check_value, fail, read_table, tname
from slimsearch.search.schema import (  # noqa: F401  (re-exported: the names other modules import from here)
    BACKENDS,
    DATASETS,
    EXPORT_FORMATS,
    EXPORT_MEMORY_FORMATS,
    FIT_MODES,
    PRUNERS,
    RUNTIMES,
    SAMPLERS,
)
from slimsearch.search.schema import (
    SECTIONS as SECTION_KEYS,
)
from slimsearch.search.storage_url import STORAGE_SCHEMES, mask_url, sqlite_path, validate_storage_url  # noqa: F401

# Metrics an objective may name (keys of evaluators' EvalResult.metrics).
OBJECTIVE_METRICS = (
    "val_acc",
    "macs",
    "flops",
    "params",
    "macs_ratio",
    "params_ratio",
    "latency_ms",
    "latency_pred_ms",
)
DIRECTIONS = {"max": "maximize", "min": "minimize"}
SECTIONS = tuple(SECTION_KEYS)
# core.device's names (a test checks they agree); a regex here, so that reading a study file does not import torch.
DEVICE_RE = re.compile(r"^(auto|cpu|cuda)$|^cuda:(\d+)$")
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
VAL_SOURCES = ("train", "test")  # = core.data.VAL_SOURCES (tests/test_data.py checks it), same reason
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# ----------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Objective:
    """One optimisation target: a metric and ``maximize``/``minimize``."""

    metric: str
    direction: str

    @property
    def spec(self) -> str:
        return f"{self.metric}:{'max' if self.direction == 'maximize' else 'min'}"


@dataclass(frozen=True)
class StudySection:
    name: str
    storage: str
    workdir: Path
    sampler: str = "tpe"
    objectives: tuple[Objective, ...] = (Objective("val_acc", "maximize"),)
    n_trials: int = 50
    backend: str = "optuna"
    seed: int = 0
    timeout: float | None = None
    pruner: str = "median"
    heartbeat_interval: int = 10
    grace_period: int | None = None
    max_retry: int = 2
    n_startup_trials: int = 10
    population_size: int = 20
    device: str = "auto"  # trials, fine-tunes, seeds and methods run here (core.device); latency stays on the CPU


@dataclass(frozen=True)
class ModelSection:
    factory: str
    checkpoint: Path | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    input_size: int | None = None
    pretrain_epochs: float = 0.0
    pretrain_lr: float = 0.05
    pretrain_batch_size: int = 128
    pretrain_checkpoint_steps: int = 100  # a resumable checkpoint of the pre-training every this many steps
    # An nn.Module given in Python (``slimsearch.load_study(..., model=net)``) in place of factory/checkpoint:
    # its weights are the baseline (or its start, with pretrain_epochs). Lives in this process only.
    module: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DataSection:
    dataset: str = "digits"
    root: Path | None = None
    val_size: int | float = 0.1
    seed: int = 0
    # A core.data.DataSplits given in Python (``slimsearch.load_study(..., data=splits)``) in place of dataset.
    splits: Any = field(default=None, compare=False, repr=False)
    image_size: tuple[int, int] | None = None  # (H, W): image folders resized on first decode
    factory: str | None = None  # "pkg.module:fn" returning the splits (core.user_data); replaces dataset
    # Where val comes from (core.data.carve_val): "train" (held out of fine-tuning) or "test" (the rest of test is
    # reported); val_root: a folder/archive of held-out images instead. Clean selection data: see README.
    val_from: str = "train"
    val_root: Path | None = None


@dataclass(frozen=True)
class ConstraintSection:
    max_macs_ratio: float | None = None
    max_macs: float | None = None
    # "scale": a searched policy above the bound is pruned harder, every layer by one factor, until it fits
    # (core.budget.fit_macs); "fill": that, and one more than 2 % below the bound prunes less until it is within
    # 2 % (every trial spends its budget); "none": it is evaluated as sampled and rejected as infeasible.
    fit: str = "scale"
    # Set: the fit ends within this fraction under the bound (core.budget.top_up_filters after the one factor).
    fit_tolerance: float | None = None
    # Predicted CPU latency (core.latency) at most this fraction of the baseline's, at latency_batch images
    # per forward, single thread, in [export] runtime; None = no latency bound.
    max_latency_ratio: float | None = None
    latency_batch: int = 1
    # The latency fit aims at max_latency_ratio x (1 - latency_margin): room for the table's prediction error.
    latency_margin: float = 0.0


@dataclass(frozen=True)
class SeedsSection:
    strategies: tuple[str, ...] = ()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # strategy -> its parameters
    # Max evaluator calls of the method strategies (abshpc, mtd, ga, distfit) together; None = unlimited.
    budget: int | None = None


@dataclass(frozen=True)
class ExportSection:
    formats: tuple[str, ...] = ("pt2", "torchscript")  # pt2 (torch.export) first: the main artefact
    out: Path | None = None  # default: <workdir>/export
    finetune_epochs: float = 0.0
    finetune_lr: float = 0.01
    finetune_batch_size: int = 128
    kd: bool = False
    memory_format: str = "contiguous"  # EXPORT_MEMORY_FORMATS; auto: each export times both, keeps the faster
    top_k: int = 1  # exporting "best": final-fine-tune the K best trials, keep the best on val (needs finetune_epochs)
    # The runtime every latency is timed in (the latency table and max_latency_ratio, the evaluator's latency_ms,
    # the export's speed-up): RUNTIMES; "onnxruntime" needs the slimsearch[onnx] extra.
    runtime: str = "torchscript"
    threads: int = 1  # intra-op threads of those timings (ORT's intra_op_num_threads; torch's num_threads)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study file, validated. ``space``/``evaluator`` are the spaces/evaluators configs."""

    path: Path
    study: StudySection
    model: ModelSection
    data: DataSection
    constraint: ConstraintSection
    space: Any  # spaces.config.SpaceConfig
    seeds: SeedsSection
    evaluator: Any  # evaluators.config.EvaluatorConfig
    export: ExportSection

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def multi_objective(self) -> bool:
        return len(self.study.objectives) > 1

    @property
    def export_dir(self) -> Path:
        return self.export.out or self.study.workdir / "export"

    def with_device(self, device: str | None, where: str = "--device") -> StudyConfig:
        """This study on ``device`` (None: unchanged); a bad name is a ``SlimError``. The device is not part of
        any result key: a study may move between CPUs and GPUs."""
        if device is None:
            return self
        if not isinstance(device, str) or not DEVICE_RE.match(device):
            raise SlimError(f"{where}: expected {DEVICE_HELP}, got {device!r}")
        return replace(self, study=replace(self.study, device=device))

    def with_n_trials(self, n: int) -> StudyConfig:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:  # = [study] n_trials' bound
            raise SlimError(f"--n-trials must be an integer in [1, 1000000], got {n!r}")
        return replace(self, study=replace(self.study, n_trials=n))


# ----------------------------------------------------------------------------- helpers


def expand_vars(text: str, where: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset VAR without a default is an error."""

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        val = os.environ.get(var)
        if val is None or (val == "" and default is not None):
            if default is None:
                raise SlimError(
                    f"{where}: environment variable {var} is not set (write ${{{var}:-default}} for a fallback)"
                )
            return default
        return val

    return _VAR_RE.sub(sub, text)


def _expand_all(obj: Any, where: str) -> Any:
    if isinstance(obj, str):
        return expand_vars(obj, where)
    if isinstance(obj, list):
        return [_expand_all(v, where) for v in obj]
    if isinstance(obj, dict):
        return {k: _expand_all(v, f"{where} {k}") for k, v in obj.items()}
    return obj


def _abspath(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def _read(data: Any, section: str, file: Path, extra: tuple[str, ...] = (), keys: tuple[Key, ...] | None = None
          ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """The section's keys checked against its table in ``search.schema`` (or ``keys``), and its ``where``."""
    where = f"{file}: [{section}]"
    return read_table(data, SECTION_KEYS[section] if keys is None else keys, where, extra), where


# ----------------------------------------------------------------------------- sections


def _objectives(specs: tuple[str, ...], where: str) -> tuple[Objective, ...]:
    allowed = ", ".join(f"{m}:max|min" for m in OBJECTIVE_METRICS)
    if not specs:
        fail(where, "objectives", f"needs at least one objective; allowed: {allowed}")
    out: list[Objective] = []
    for spec in specs:
        metric, _, d = spec.partition(":")
        if metric not in OBJECTIVE_METRICS or d not in DIRECTIONS:
            fail(where, "objectives", f"bad objective {spec!r}; expected METRIC:max or METRIC:min with METRIC one of "
                                      f"{', '.join(OBJECTIVE_METRICS)}")  # fmt: skip
        if any(o.metric == metric for o in out):
            fail(where, "objectives", f"metric {metric!r} appears twice")
        out.append(Objective(metric, DIRECTIONS[d]))
    return tuple(out)


def _study(data: Any, file: Path) -> StudySection:
    v, where = _read(data, "study", file)
    name = v["name"]
    if not _NAME_RE.match(name):
        fail(where, "name", f"{name!r} must be 1-100 characters of letters, digits, '.', '_' or '-' (it names files)")
    storage = validate_storage_url(data.get("storage", f"sqlite:///runs/{name}.db"), f"{where} storage")
    if not DEVICE_RE.match(v["device"]):
        fail(where, "device", f"expected {DEVICE_HELP}, got {v['device']!r}")
    hb, grace = v["heartbeat_interval"], v["grace_period"]
    if grace is not None and grace <= hb:
        fail(where, "grace_period", f"must be larger than heartbeat_interval ({hb} s), got {grace}")
    sec = StudySection(
        name=name,
        storage=storage,
        workdir=v["workdir"] if "workdir" in data else _abspath(f"runs/{name}"),
        sampler=v["sampler"],
        objectives=_objectives(v["objectives"], where),
        n_trials=v["n_trials"],
        backend=v["backend"],
        seed=v["seed"],
        timeout=v["timeout"],
        pruner=v["pruner"],
        heartbeat_interval=hb,
        grace_period=grace,
        max_retry=v["max_retry"],
        n_startup_trials=v["n_startup_trials"],
        population_size=v["population_size"],
        device=v["device"],
    )
    if sec.sampler in ("cmaes", "local") and len(sec.objectives) > 1:
        fail(where, "sampler", f"{sec.sampler} is single-objective; use nsga2 (or tpe) with several objectives")
    return sec


def _model(data: Any, file: Path, module: Any = None) -> ModelSection:
    keys = SECTION_KEYS["model"]
    if module is not None:  # an nn.Module given in Python: no factory needed; its class name labels it
        keys = tuple(Key(k.name, k.type, f"<in-memory {type(module).__name__}>", k.doc) if k.name == "factory" else k
                     for k in keys)  # fmt: skip
    v, where = _read(data, "model", file, keys=keys)
    sec = ModelSection(**v)
    if module is not None:
        sec = replace(sec, module=module)
    elif sec.checkpoint is None and sec.pretrain_epochs <= 0:
        fail(where, None, "needs a checkpoint, or pretrain_epochs > 0 to train a baseline first "
                          "(or make one with `slimsearch train`)")  # fmt: skip
    return sec


def _data(data: Any, file: Path, splits: Any = None) -> DataSection:
    v, where = _read(data, "data", file)
    if v["factory"] is not None:
        if ":" not in v["factory"]:
            fail(where, "factory", f"must be 'pkg.module:fn', got {v['factory']!r}")
        for key in ("dataset", "image_size"):
            if isinstance(data, Mapping) and key in data:
                fail(where, key, "does not apply with [data] factory (the factory returns the data)")
    if v["image_size"] is not None:
        size = v["image_size"]
        if len(size) != 2 or any(x != int(x) for x in size):
            fail(where, "image_size", f"must be [H, W], two integers, got {list(size)}")
        if v["dataset"] in ("digits", "synthetic"):
            fail(where, "image_size", f"applies to image folders, not to the built-in {v['dataset']} dataset")
        v["image_size"] = (int(size[0]), int(size[1]))
    sec = DataSection(**v)
    if sec.factory is None and sec.dataset not in ("digits", "synthetic") and sec.root is None and splits is None:
        fail(where, "root", f"is required for dataset {sec.dataset!r} (a folder or archive)")
    if sec.val_root is not None and not sec.val_root.exists():
        fail(where, "val_root", f"{sec.val_root} does not exist")
    if sec.root is not None and not sec.root.exists():
        fail(where, "root", f"{sec.root} does not exist")
    return sec if splits is None else replace(sec, dataset="<in-memory>", splits=splits)


def _constraint(data: Any, file: Path) -> ConstraintSection:
    v, where = _read(data, "constraint", file)
    if v["max_macs_ratio"] is not None and v["max_macs"] is not None:
        fail(where, None, "give max_macs_ratio or max_macs, not both")
    if v["latency_margin"] and v["max_latency_ratio"] is None:
        fail(where, "latency_margin", "needs max_latency_ratio (a margin below which bound?)")
    if v["fit"] == "none" and v["fit_tolerance"] is not None:
        fail(where, "fit_tolerance", 'needs fit = "scale" or "fill" (fit = "none" fits nothing)')
    return ConstraintSection(**v)


def _seeds(data: Any, file: Path) -> SeedsSection:
    where = f"{file}: [seeds]"
    if not isinstance(data, Mapping):
        fail(where, None, f"must be a table, got {tname(data)}")
    if not data:  # no seeds: skip importing the strategies (and torch with them)
        return SeedsSection()
    from slimsearch.search.seed_params import SEED_PARAM_CHECKS, known_strategies  # imports torch: only here

    registry = known_strategies()
    strategies_key = next(k for k in SECTION_KEYS["seeds"] if k.name == "strategies")
    names = check_value(strategies_key, data.get("strategies", ()), where)
    for n in names:
        if n not in registry:
            fail(where, "strategies", f"unknown seed strategy {n!r}; known: {', '.join(sorted(registry))}")
    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    extra: list[str] = []
    for key, val in data.items():
        if key in ("strategies", "budget"):
            continue
        if isinstance(val, dict) and key in registry:  # [seeds.<name>] table
            if key not in params:
                fail(where, key, f"parameters for {key!r}, which is not in strategies {list(names)}")
            params[key].update(val)
            extra.append(key)
            continue
        owner = next((n for n in sorted(registry, key=len, reverse=True) if key.startswith(n + "_")), None)
        if owner is None:
            continue  # reported as unknown by read_table
        if owner not in params:
            fail(where, key, f"is a parameter of seed strategy {owner!r}, which is not in strategies {list(names)}")
        params[owner][key[len(owner) + 1 :]] = val
        extra.append(key)
    v, _ = _read(data, "seeds", file, tuple(extra))
    for n in names:
        check = SEED_PARAM_CHECKS.get(n)
        if check is not None:
            check(params[n], where)
    return SeedsSection(strategies=tuple(names), params=params, budget=v["budget"])


def _export(data: Any, file: Path) -> ExportSection:
    v, where = _read(data, "export", file)
    sec = ExportSection(**v)
    if sec.top_k > 1 and sec.finetune_epochs <= 0:
        fail(where, "top_k", "ranks the trials after the final fine-tune: set finetune_epochs > 0 too")
    return sec


def _delegate(builder: Callable[..., Any], data: Any, section: str, file: Path, **kw: Any) -> Any:
    """Call a spaces/evaluators ``from_dict`` and prefix its errors with the file name."""
    if not isinstance(data, dict):
        raise SlimError(f"{file}: [{section}]: must be a table, got {tname(data)}")
    try:
        return builder(data, where=f"[{section}]", **kw)
    except SlimError as e:
        raise SlimError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------- entry points


def parse_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; syntax errors become ``SlimError`` with file and line."""
    p = Path(path)
    if p.is_dir():
        raise SlimError(f"{p} is a directory, not a study file (give the .toml file)")
    if not p.is_file():
        raise SlimError(f"study file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlimError(f"{p}: cannot read study file ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        # tomllib puts "(at line L, column C)" at the end; lead with the location.
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        loc = f"line {m.group(1)}, column {m.group(2)}" if m else "?"
        raise SlimError(
            f"{p}:{m.group(1) if m else '?'}: TOML syntax error at {loc}: {msg.split(' (at ')[0]}"
        ) from None


def study_from_dict(raw: Mapping[str, Any], path: str | Path = "<study>", *, module: Any = None,
                    splits: Any = None) -> StudyConfig:  # fmt: skip
    """Validate an already-parsed study table (``parse_toml`` output). ``module`` (an ``nn.Module``) and ``splits``
    (a ``core.data.DataSplits``) given in Python replace [model] factory/checkpoint and [data] dataset/root."""
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.spaces.config import SpaceConfig

    file = Path(path)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        raise SlimError(f"{file}: unknown section [{unknown[0]}]{hint}; allowed: {', '.join(SECTIONS)}")
    for s in ("study",) if module is not None else ("study", "model"):
        if s not in raw:
            raise SlimError(f"{file}: missing section [{s}]")
    data = {k: _expand_all(v, f"{file}: [{k}]") for k, v in raw.items()}
    study = _study(data["study"], file)
    model = _model(data.get("model", {}), file, module)
    data_sec = _data(data.get("data", {}), file, splits)
    constraint = _constraint(data.get("constraint", {}), file)
    cfg = StudyConfig(
        path=file,
        study=study,
        model=model,
        data=data_sec,
        constraint=constraint,
        space=_delegate(SpaceConfig.from_dict, data.get("space", {}), "space", file),
        seeds=_seeds(data.get("seeds", {}), file),
        evaluator=_delegate(
            EvaluatorConfig.from_dict,
            data.get("evaluator", {}),
            "evaluator",
            file,
            latency_batch=constraint.latency_batch,
        ),  # fmt: skip
        export=_export(data.get("export", {}), file),
    )
    if any(o.metric == "latency_ms" for o in study.objectives) and not getattr(cfg.evaluator, "measure_latency", False):
        raise SlimError(f"{file}: [study] objectives: latency_ms needs [evaluator] measure_latency = true")
    if any(o.metric == "latency_pred_ms" for o in study.objectives) and cfg.constraint.max_latency_ratio is None:
        raise SlimError(f"{file}: [study] objectives: latency_pred_ms needs [constraint] max_latency_ratio "
                        f"(1.0 to predict latency without bounding it)")  # fmt: skip
    if cfg.constraint.fit == "fill" and any(o.metric in ("macs", "params") for o in study.objectives):
        raise SlimError(f"{file}: [constraint] fit = \"fill\" brings every trial to the MACs bound, so a "
                        f"{'/'.join(o.metric for o in study.objectives if o.metric in ('macs', 'params'))} objective "
                        f"would have no front to trade along; use fit = \"scale\"")  # fmt: skip
    return cfg


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file. Raises ``SlimError`` (file, key, allowed values) on bad input."""
    return study_from_dict(parse_toml(path), path)
