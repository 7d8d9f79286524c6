"""Study files: TOML -> a validated, immutable ``StudyConfig``.

Every error is a ``SlimError`` naming the file, the section and key, and the allowed values
(TOML syntax errors: file and line). String values may use ``${VAR}`` / ``${VAR:-default}``;
relative paths resolve against the current directory, once, at load time (so worker processes
started elsewhere see the same files).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib
from slimsearch.core.errors import SlimError

SAMPLERS = ("tpe", "nsga2", "cmaes", "local", "random")
BACKENDS = ("optuna", "ray")
PRUNERS = ("median", "none")
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
# = core.export.FORMATS (a test checks it), for the same reason as DATASETS below.
EXPORT_FORMATS = ("torchscript", "torchscript-frozen", "pt2", "state")
EXPORT_MEMORY_FORMATS = ("contiguous", "channels_last", "auto")  # core.export.MEMORY_FORMATS, or the faster
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
# = core.data.DATASETS (a test checks it); not imported from there, so that reading a study file does
# not import torch (status/report/errors answer in a fraction of the time).
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
FIT_MODES = ("scale", "fill", "none")
# core.device's names (a test checks they agree); a regex here, so that reading a study file does not import torch.
DEVICE_RE = re.compile(r"^(auto|cpu|cuda)$|^cuda:(\d+)$")
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
SECTIONS = ("study", "model", "data", "constraint", "space", "seeds", "evaluator", "export")
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


@dataclass(frozen=True)
class DataSection:
    dataset: str = "digits"
    root: Path | None = None
    val_size: int | float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ConstraintSection:
    max_macs_ratio: float | None = None
    max_macs: float | None = None
    # "scale": a searched policy above the bound is pruned harder, every layer by one factor, until it fits
    # (core.budget.fit_macs); "fill": that, and one more than 2 % below the bound prunes less until it is within
    # 2 % (every trial spends its budget); "none": it is evaluated as sampled and rejected as infeasible.
    fit: str = "scale"
    # Predicted CPU latency (core.latency) at most this fraction of the baseline's, at latency_batch images
    # per forward, single thread, TorchScript; None = no latency bound.
    max_latency_ratio: float | None = None
    latency_batch: int = 1


@dataclass(frozen=True)
class SeedsSection:
    strategies: tuple[str, ...] = ()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # strategy -> its parameters
    # Max evaluator calls of the method strategies (abshpc, mtd, ga, distfit) together; None = unlimited.
    budget: int | None = None


@dataclass(frozen=True)
class ExportSection:
    formats: tuple[str, ...] = ("torchscript",)
    out: Path | None = None  # default: <workdir>/export
    finetune_epochs: float = 0.0
    finetune_lr: float = 0.01
    finetune_batch_size: int = 128
    kd: bool = False
    memory_format: str = "contiguous"  # EXPORT_MEMORY_FORMATS; auto: each export times both, keeps the faster
    top_k: int = 1  # exporting "best": final-fine-tune the K best trials, keep the best on val (needs finetune_epochs)


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
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SlimError(f"--n-trials must be a positive integer, got {n!r}")
        return replace(self, study=replace(self.study, n_trials=n))


# ----------------------------------------------------------------------------- seed registry

# name -> fn(study_context, params) -> list[Policy]; params are the strategy's keys from [seeds]
# (``<name>_<param> = ...`` or a ``[seeds.<name>]`` table). search.seeding fills it; other
# modules add their strategies with ``register_seed_strategy``.
SEED_STRATEGIES: dict[str, Callable[..., list[Any]]] = {}
# Optional checks run at load time: fn(params, where) raises SlimError for bad parameters.
SEED_PARAM_CHECKS: dict[str, Callable[[Mapping[str, Any], str], None]] = {}


def register_seed_strategy(
    name: str, check: Callable[[Mapping[str, Any], str], None] | None = None
) -> Callable[[Callable[..., list[Any]]], Callable[..., list[Any]]]:
    """Decorator: make ``fn(ctx, params) -> list[Policy]`` available as ``[seeds] strategies = [name]``."""

    def deco(fn: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        SEED_STRATEGIES[name] = fn
        if check is not None:
            SEED_PARAM_CHECKS[name] = check
        return fn

    return deco


def known_seed_strategies() -> dict[str, Callable[..., list[Any]]]:
    """The registry, with the built-in and optional strategy modules imported."""
    import slimsearch.search.seeding  # noqa: F401  (registers "uniform" and any optional strategies)

    return SEED_STRATEGIES


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


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for every printed or logged line)."""
    # Up to the LAST '@' of the token: a raw '/', ':' or '@' inside a password must not leak its tail.
    return re.sub(r"(://[^/:@\s'\"]*:)[^\s'\"]*@", r"\1***@", str(url))


def validate_storage_url(url: str, where: str) -> str:
    """Check an RDB URL (sqlite:///path, postgresql://..., mysql://...) and make sqlite paths absolute."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = mask_url(url)
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise SlimError(f"{where}: malformed storage URL {shown!r} ({e}); expected e.g. sqlite:///runs/x.db or "
                        "postgresql://user:password@host/db") from None  # fmt: skip
    scheme = u.drivername.split("+")[0]
    if scheme not in STORAGE_SCHEMES:
        raise SlimError(f"{where}: unsupported storage {shown!r}; allowed schemes: {', '.join(STORAGE_SCHEMES)}")
    if scheme == "sqlite":
        db = u.database or ""
        if not url.startswith(f"{u.drivername}:///") or db in ("", ":memory:") or u.host:
            raise SlimError(f"{where}: SQLite storage must name a file, as sqlite:///relative/path.db or "
                            f"sqlite:////absolute/path.db; got {shown!r}")  # fmt: skip
        p = Path(db)
        if not p.is_absolute():
            p = Path.cwd() / p
        return f"{u.drivername}:///{p}"
    if not u.host or not u.database:
        raise SlimError(
            f"{where}: storage {shown!r} needs a host and a database name, as {scheme}://user:password@host/db"
        )
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL, else None."""
    if url.startswith("sqlite"):
        return Path(url.split(":///", 1)[1])
    return None


class _Table:
    """Typed access to one TOML table; records which keys were read to report unknown ones."""

    def __init__(self, data: Any, section: str, file: Path) -> None:
        self.file = file
        self.section = section
        if not isinstance(data, dict):
            self.fail(None, f"must be a table, got {_tname(data)}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def where(self, key: str | None) -> str:
        return f"{self.file}: [{self.section}]" + (f" {key}" if key else "")

    def fail(self, key: str | None, msg: str) -> None:
        raise SlimError(f"{self.where(key)}: {msg}")

    def get(self, key: str, kind: str, default: Any = None, *, required: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:  # fmt: skip
        self.used.add(key)
        if key not in self.data:
            if required:
                self.fail(key, f"is required ({kind})")
            return default
        val = _coerce(self.data[key], kind)
        if val is _BAD:
            self.fail(key, f"expected {kind}, got {_tname(self.data[key])} {self.data[key]!r}")
        if check is not None and (msg := check(val)):
            self.fail(key, f"{msg}, got {val!r}")
        return val

    def choice(self, key: str, allowed: tuple[str, ...], default: str | None) -> str:
        val = self.get(key, "a string", default, required=default is None)
        if val not in allowed:
            self.fail(key, f"unknown value {val!r}; allowed: {', '.join(allowed)}")
        return val

    def path(self, key: str) -> Path | None:
        val = self.get(key, "a path string", None, check=lambda v: "must not be empty" if not v else None)
        return _abspath(val) if val is not None else None

    def finish(self, allowed_extra: tuple[str, ...] = ()) -> None:
        unknown = [k for k in self.data if k not in self.used and k not in allowed_extra]
        if unknown:
            allowed = sorted(self.used | set(allowed_extra))
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(None, f"unknown key {unknown[0]!r}{hint}; allowed: {', '.join(allowed)}")


_BAD = object()


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(v), type(v).__name__
    )


def _coerce(v: Any, kind: str) -> Any:
    """TOML value -> Python value of ``kind``, or _BAD. Booleans are never numbers."""
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind.startswith("an integer or a fraction"):
        return v if num else _BAD
    if kind.startswith("an integer"):
        return v if isinstance(v, int) and not isinstance(v, bool) else _BAD
    if kind.startswith("a number"):
        return float(v) if num and math.isfinite(v) else _BAD
    if kind.startswith("a boolean"):
        return v if isinstance(v, bool) else _BAD
    if kind.startswith("a list of strings"):
        if isinstance(v, str):
            return (v,)
        return tuple(v) if isinstance(v, list) and all(isinstance(s, str) for s in v) else _BAD
    if kind.startswith("a list of numbers"):
        ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        return tuple(float(x) for x in v) if ok else _BAD
    return v if isinstance(v, str) else _BAD  # strings and paths


def _abspath(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be >= {n}"


# ----------------------------------------------------------------------------- sections


def _objectives(t: _Table) -> tuple[Objective, ...]:
    specs = t.get("objectives", 'a list of strings like "val_acc:max"', ("val_acc:max",))
    allowed = ", ".join(f"{m}:max|min" for m in OBJECTIVE_METRICS)
    if not specs:
        t.fail("objectives", f"needs at least one objective; allowed: {allowed}")
    out: list[Objective] = []
    for spec in specs:
        metric, _, d = spec.partition(":")
        if metric not in OBJECTIVE_METRICS or d not in DIRECTIONS:
            t.fail("objectives", f"bad objective {spec!r}; expected METRIC:max or METRIC:min with METRIC one of "
                                 f"{', '.join(OBJECTIVE_METRICS)}")  # fmt: skip
        if any(o.metric == metric for o in out):
            t.fail("objectives", f"metric {metric!r} appears twice")
        out.append(Objective(metric, DIRECTIONS[d]))
    return tuple(out)


def _study(t: _Table) -> StudySection:
    name = t.get("name", "a string", required=True)
    if not _NAME_RE.match(name):
        t.fail("name", f"{name!r} must be 1-100 characters of letters, digits, '.', '_' or '-' (it names files)")
    storage = t.get("storage", "a storage URL string", f"sqlite:///runs/{name}.db")
    storage = validate_storage_url(storage, t.where("storage"))
    workdir = t.path("workdir") or _abspath(f"runs/{name}")
    hb = t.get("heartbeat_interval", "an integer (seconds)", 10, check=_at_least(1))
    grace = t.get("grace_period", "an integer (seconds)", None, check=_at_least(1))
    if grace is not None and grace <= hb:
        t.fail("grace_period", f"must be larger than heartbeat_interval ({hb} s), got {grace}")
    sec = StudySection(
        name=name,
        storage=storage,
        workdir=workdir,
        sampler=t.choice("sampler", SAMPLERS, "tpe"),
        objectives=_objectives(t),
        n_trials=t.get("n_trials", "an integer", 50, check=_at_least(1)),
        backend=t.choice("backend", BACKENDS, "optuna"),
        seed=t.get("seed", "an integer", 0, check=_at_least(0)),
        timeout=t.get("timeout", "a number (seconds)", None, check=_positive),
        pruner=t.choice("pruner", PRUNERS, "median"),
        heartbeat_interval=hb,
        grace_period=grace,
        max_retry=t.get("max_retry", "an integer", 2, check=_at_least(0)),
        n_startup_trials=t.get("n_startup_trials", "an integer", 10, check=_at_least(0)),
        population_size=t.get("population_size", "an integer", 20, check=_at_least(2)),
        device=t.get(
            "device", "a string", "auto", check=lambda v: None if DEVICE_RE.match(v) else f"expected {DEVICE_HELP}"
        ),
    )
    if sec.sampler in ("cmaes", "local") and len(sec.objectives) > 1:
        t.fail("sampler", f"{sec.sampler} is single-objective; use nsga2 (or tpe) with several objectives")
    t.finish()
    return sec


def _model(t: _Table) -> ModelSection:
    sec = ModelSection(
        factory=t.get("factory", 'a model name (e.g. resnet56) or "pkg.module:fn"', required=True),
        checkpoint=t.path("checkpoint"),
        num_classes=t.get("num_classes", "an integer", None, check=_at_least(2)),
        in_channels=t.get("in_channels", "an integer", None, check=_at_least(1)),
        input_size=t.get("input_size", "an integer (pixels)", None, check=_at_least(1)),
        pretrain_epochs=t.get("pretrain_epochs", "a number", 0.0, check=_at_least(0)),
        pretrain_lr=t.get("pretrain_lr", "a number", 0.05, check=_positive),
        pretrain_batch_size=t.get("pretrain_batch_size", "an integer", 128, check=_at_least(1)),
    )
    if sec.checkpoint is None and sec.pretrain_epochs <= 0:
        t.fail(None, "needs a checkpoint, or pretrain_epochs > 0 to train a baseline first "
                     "(or make one with `slimsearch train`)")  # fmt: skip
    t.finish()
    return sec


def _data(t: _Table) -> DataSection:
    def val_check(v: Any) -> str | None:
        if isinstance(v, int) and v >= 1:
            return None
        if isinstance(v, float) and 0 < v < 1:
            return None
        return "must be a count >= 1 or a fraction in (0, 1)"

    sec = DataSection(
        dataset=t.choice("dataset", DATASETS, "digits"),
        root=t.path("root"),
        val_size=t.get("val_size", "an integer or a fraction", 0.1, check=val_check),
        seed=t.get("seed", "an integer", 0, check=_at_least(0)),
    )
    if sec.dataset not in ("digits", "synthetic") and sec.root is None:
        t.fail("root", f"is required for dataset {sec.dataset!r} (a folder or archive)")
    if sec.root is not None and not sec.root.exists():
        t.fail("root", f"{sec.root} does not exist")
    t.finish()
    return sec


def _constraint(t: _Table) -> ConstraintSection:
    ratio = t.get("max_macs_ratio", "a number", None, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    macs = t.get("max_macs", "a number (MACs per image)", None, check=_positive)
    if ratio is not None and macs is not None:
        t.fail(None, "give max_macs_ratio or max_macs, not both")
    fit = t.choice("fit", FIT_MODES, "scale")
    lat = t.get("max_latency_ratio", "a number", None, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    batch = t.get("latency_batch", "an integer", 1, check=_at_least(1))
    t.finish()
    return ConstraintSection(max_macs_ratio=ratio, max_macs=macs, fit=fit, max_latency_ratio=lat, latency_batch=batch)


def _seeds(t: _Table) -> SeedsSection:
    if not t.data:  # no seeds: skip importing the strategies (and torch with them)
        return SeedsSection()
    registry = known_seed_strategies()
    names = t.get("strategies", "a list of strings", ())
    for n in names:
        if n not in registry:
            t.fail("strategies", f"unknown seed strategy {n!r}; known: {', '.join(sorted(registry))}")
    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    extra: list[str] = []
    for key, val in t.data.items():
        if key == "strategies":
            continue
        if isinstance(val, dict) and key in registry:  # [seeds.<name>] table
            if key not in params:
                t.fail(key, f"parameters for {key!r}, which is not in strategies {list(names)}")
            params[key].update(val)
            extra.append(key)
            continue
        owner = next((n for n in sorted(registry, key=len, reverse=True) if key.startswith(n + "_")), None)
        if owner is None:
            continue  # reported as unknown by finish()
        if owner not in params:
            t.fail(key, f"is a parameter of seed strategy {owner!r}, which is not in strategies {list(names)}")
        params[owner][key[len(owner) + 1 :]] = val
        extra.append(key)
    budget = t.get("budget", "an integer (evaluator calls)", None, check=_at_least(1))
    t.finish(tuple(extra))
    for n in names:
        check = SEED_PARAM_CHECKS.get(n)
        if check is not None:
            check(params[n], t.where(None))
    return SeedsSection(strategies=tuple(names), params=params, budget=budget)


def _export(t: _Table) -> ExportSection:
    formats = t.get("formats", "a list of strings", ("torchscript",))
    for f in formats:
        if f not in EXPORT_FORMATS:
            t.fail("formats", f"unknown format {f!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    sec = ExportSection(
        formats=tuple(formats),
        out=t.path("out"),
        finetune_epochs=t.get("finetune_epochs", "a number", 0.0, check=_at_least(0)),
        finetune_lr=t.get("finetune_lr", "a number", 0.01, check=_positive),
        finetune_batch_size=t.get("finetune_batch_size", "an integer", 128, check=_at_least(1)),
        kd=t.get("kd", "a boolean", False),
        memory_format=t.get("memory_format", "a string", "contiguous"),
        top_k=t.get("top_k", "an integer", 1, check=_at_least(1)),
    )
    if sec.memory_format not in EXPORT_MEMORY_FORMATS:
        allowed = ", ".join(EXPORT_MEMORY_FORMATS)
        t.fail("memory_format", f"unknown memory format {sec.memory_format!r}; allowed: {allowed}")
    if sec.top_k > 1 and sec.finetune_epochs <= 0:
        t.fail("top_k", "ranks the trials after the final fine-tune: set finetune_epochs > 0 too")
    t.finish()
    return sec


def _delegate(builder: Callable[..., Any], data: Any, section: str, file: Path) -> Any:
    """Call a spaces/evaluators ``from_dict`` and prefix its errors with the file name."""
    if not isinstance(data, dict):
        raise SlimError(f"{file}: [{section}]: must be a table, got {_tname(data)}")
    try:
        return builder(data, where=f"[{section}]")
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


def study_from_dict(raw: Mapping[str, Any], path: str | Path = "<study>") -> StudyConfig:
    """Validate an already-parsed study table (``parse_toml`` output)."""
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.spaces.config import SpaceConfig

    file = Path(path)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        raise SlimError(f"{file}: unknown section [{unknown[0]}]{hint}; allowed: {', '.join(SECTIONS)}")
    for s in ("study", "model"):
        if s not in raw:
            raise SlimError(f"{file}: missing section [{s}]")
    data = {k: _expand_all(v, f"{file}: [{k}]") for k, v in raw.items()}
    study = _study(_Table(data["study"], "study", file))
    cfg = StudyConfig(
        path=file,
        study=study,
        model=_model(_Table(data["model"], "model", file)),
        data=_data(_Table(data.get("data", {}), "data", file)),
        constraint=_constraint(_Table(data.get("constraint", {}), "constraint", file)),
        space=_delegate(SpaceConfig.from_dict, data.get("space", {}), "space", file),
        seeds=_seeds(_Table(data.get("seeds", {}), "seeds", file)),
        evaluator=_delegate(EvaluatorConfig.from_dict, data.get("evaluator", {}), "evaluator", file),
        export=_export(_Table(data.get("export", {}), "export", file)),
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
