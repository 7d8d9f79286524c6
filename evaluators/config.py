"""``[evaluator]`` of a study file: how a candidate policy is scored."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.core.schema import Key, check_fields, read_table
from slimsearch.core.tables import build_checked

KINDS = ("proxy", "finetune", "custom")
AMP_MODES = ("off", "bf16", "fp16")  # = core.device.AMP_MODES (not imported: reading a study file skips torch)
PER_GPU = "per-gpu"  # workers: one per visible GPU
SEED_MAX = 2**32 - 1  # numpy's and Optuna's seeds are 32-bit
# The [evaluator] keys of a study file (core.schema): types, bounds, defaults and docs/study-file.md's text.
EVALUATOR_KEYS: tuple[Key, ...] = (
    Key(
        "kind",
        "choice",
        "proxy",
        "how a candidate is scored: `proxy` recalibrates BatchNorm on `bn_batches` train "
        "batches and scores val accuracy (no weight update); `finetune` trains `steps` SGD steps first (with `kd`, "
        "distilled from the baseline); `custom` calls your `fn` (README, Own scoring)",
        choices=KINDS,
    ),
    Key("steps", "int", 100, "fine-tuning steps per trial (`finetune`)", lo=1, hi=1_000_000),
    Key("batch_size", "int", 128, "train batch size of the fine-tune and of BN recalibration", lo=1, hi=65_536),
    # The bound admits absurd rates on purpose: the tests make fine-tunes diverge (NaN loss -> FAIL) with lr = 1e30.
    Key(
        "lr",
        "float",
        0.01,
        "SGD learning rate of the fine-tune (a diverging one fails the trial: NaN loss)",
        lo=0,
        hi=1e30,
        lo_open=True,
    ),
    Key("kd", "bool", False, "distil from the baseline's outputs during the fine-tune"),
    Key(
        "bn_batches",
        "int",
        10,
        "train batches that recalibrate BatchNorm statistics (`proxy`, and after a fine-tune)",
        lo=1,
        hi=100_000,
    ),
    Key(
        "eval_every",
        "int",
        0,
        "score val every N steps and report it to the pruner, which may stop a poor trial "
        "early (`[study] pruner`); 0: only at the end",
        lo=0,
        hi=1_000_000,
    ),
    Key("val_batch_size", "int", 512, "batch size of val scoring (speed only)", lo=1, hi=65_536),
    Key(
        "measure_latency",
        "bool",
        False,
        "time each trial's TorchScript program (conv weights in the export's "
        "layout, one thread, `[constraint] latency_batch` images): the `latency_ms` metric and objective",
    ),
    Key("seed", "int", 0, "seed of batch order and augmentation in the evaluator", lo=0, hi=SEED_MAX),
    Key(
        "workers",
        "int",
        1,
        "evaluating processes (backend optuna; `slimsearch run --workers` overrides) or "
        'concurrent Ray trials (backend ray), or `"per-gpu"`: one per visible GPU; see docs/clusters.md',
        lo=1,
        hi=1024,
        also=(PER_GPU,),
    ),
    Key(
        "ray_address",
        "str",
        None,
        'the Ray cluster of backend ray: `"auto"`, `"host:port"` or '
        '`"ray://host:port"`; unset: a private local Ray (`run --ray-address` overrides); see docs/clusters.md',
    ),
    Key(
        "amp", "choice", "off", "autocast of the fine-tune's forward on a GPU: `off`, `bf16`, `fp16`", choices=AMP_MODES
    ),
    Key("cpus_per_trial", "int", 1, "CPUs one Ray trial holds (backend ray)", lo=1, hi=1024),
    Key(
        "gpus_per_trial",
        "float",
        None,
        "GPUs one Ray trial holds (fractions pack trials on a GPU: 0.25 runs 4); unset: 1 when `[study] device` is "
        "cuda, else 0",
        lo=0,
        hi=1024,
    ),
    Key(
        "fn",
        "str",
        None,
        '`kind = "custom"`: `"pkg.module:score"`, called as `score(model, data, budget)` and returning '
        '`{"val_acc": ...}` (found next to the study file too)',
    ),
)
FIT_MODES = ("scale", "fill", "none")
BIG = 1e15  # an upper bound for counts that have no natural one (MACs per image)
# [constraint] (core.schema): the bounds a candidate must meet; build_context checks its arguments against it too.
CONSTRAINT_KEYS: tuple[Key, ...] = (
    Key(
        "max_macs_ratio",
        "float",
        None,
        "at most this fraction of the baseline's MACs (checked before any training); give this or `max_macs`",
        lo=0,
        hi=1,
        lo_open=True,
    ),
    Key("max_macs", "float", None, "at most this many MACs per image", lo=0, hi=BIG, lo_open=True),
    Key(
        "fit",
        "choice",
        "scale",
        "`scale`: a sampled policy over a bound has every layer it prunes scaled harder "
        "by one factor until it fits (no trial wasted on an infeasible policy); `fill`: that, and one more than "
        "2 % (`fit_tolerance`) under the MACs bound is pruned less until within it (not with a macs or params "
        "objective); `none`: evaluated as sampled, infeasible trials score 0",
        choices=FIT_MODES,
    ),
    Key(
        "fit_tolerance",
        "float",
        None,
        "a fitted policy lands at most this fraction of the bound under it: after the one-factor fit, "
        "filters are given back one at a time (0.01 for comparisons at equal MACs within 1 %); unset: the "
        "one-factor fit alone, which aims within 2 % but can stop further under where many layers share a rate",
        lo=0.001,
        hi=0.2,
    ),
    Key(
        "max_latency_ratio",
        "float",
        None,
        "predicted single-thread CPU latency of the export in `[export] runtime` "
        "(TorchScript: conv weights in `[export] memory_format`, contiguous for `auto`) at most this fraction of "
        "the baseline's; 1.0 predicts without bounding (README, Latency)",
        lo=0,
        hi=1,
        lo_open=True,
    ),
    Key(
        "latency_margin",
        "float",
        0.0,
        "the latency fit (`fit` scale or fill) aims this fraction below the bound, so a policy "
        "whose prediction errs a little low still keeps the bound when its export is measured; the bound itself "
        "(trial feasibility, the export's check) is unchanged",
        lo=0,
        hi=0.5,
    ),
    Key(
        "latency_batch",
        "int",
        1,
        "images per forward of every latency number of the study: the bound's "
        "prediction, `[evaluator] measure_latency` and the export's check",
        lo=1,
        hi=4096,
    ),
)

# Not a study-file key: every latency number of a study uses [constraint] latency_batch, copied here.
_KEYS_AND_BATCH = (*EVALUATOR_KEYS, Key("latency_batch", "int", 1, "", lo=1, hi=4096))
# Fields that do not change a result (where and how fast it is computed), left out of the cache key.
_NOT_IN_KEY = ("workers", "ray_address", "val_batch_size", "cpus_per_trial", "gpus_per_trial")


@dataclass(frozen=True)
class EvaluatorConfig:
    """proxy: BN recalibration on ``bn_batches`` train batches, then val accuracy (no weight update).
    finetune: ``steps`` SGD steps (KD from the baseline when ``kd``), val accuracy every ``eval_every``
    steps reported to the search (0 = only at the end). ``amp``: autocast of the fine-tune's forward (bf16 /
    fp16 / off). ``workers``: a count or "per-gpu"; ``cpus_per_trial`` / ``gpus_per_trial`` (fractions pack
    trials on a GPU): the Ray resources of one trial (None = 0, or 1 when the study's device is cuda). Where
    trials run (the study's device, workers, resources) is not part of the result cache key; ``amp`` is.
    custom: BN recalibration, then the user's ``fn`` (``"pkg.module:score"``) scores the candidate
    (``evaluators.custom``)."""

    kind: str = "proxy"
    steps: int = 100
    batch_size: int = 128
    lr: float = 0.01
    kd: bool = False
    bn_batches: int = 10
    eval_every: int = 0
    val_batch_size: int = 512
    measure_latency: bool = False
    latency_batch: int = 1
    seed: int = 0
    workers: int | str = 1
    ray_address: str | None = None
    amp: str = "off"
    cpus_per_trial: int = 1
    gpus_per_trial: float | None = None
    fn: str | None = None  # kind = "custom": "pkg.module:score", called as score(model, data, budget)

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[evaluator]") -> None:
        """Raise ``SlimError`` naming the key when a value is wrong (``EVALUATOR_KEYS``)."""
        check_fields(self, _KEYS_AND_BATCH, where)
        if self.ray_address is not None and not self.ray_address:
            raise SlimError(f'{where} ray_address: must not be empty (e.g. "auto"), got {self.ray_address!r}')
        if self.kind == "custom" and not (isinstance(self.fn, str) and ":" in self.fn):
            raise SlimError(f'{where} fn: kind = "custom" needs fn = "pkg.module:score", got {self.fn!r}')
        if self.kind != "custom" and self.fn is not None:
            raise SlimError(f'{where} fn: applies to kind = "custom" only (kind is {self.kind!r})')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "[evaluator]", latency_batch: int = 1) -> EvaluatorConfig:
        """Build from a TOML table; unknown keys and bad values raise ``SlimError`` naming them. ``latency_batch``:
        the study's ``[constraint] latency_batch`` (one batch size for every latency number)."""
        if isinstance(d, Mapping) and "latency_batch" in d:
            raise SlimError(f"{where} latency_batch: set it in [constraint] latency_batch (images per forward of "
                            "every latency number: the bound, measure_latency and the export's check)")  # fmt: skip
        kw = read_table(d, EVALUATOR_KEYS, where)
        return build_checked(cls, {**kw, "latency_batch": latency_batch}, where)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def key(self) -> str:
        """Digest of the fields that change an evaluation's outcome (for the result cache)."""
        relevant = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        if relevant["amp"] == "off":  # the keys written before amp existed stay valid
            relevant.pop("amp")
        if relevant["fn"] is None:  # likewise fn (kind = "custom" only)
            relevant.pop("fn")
        if self.kind == "proxy":  # fine-tune settings do not matter to the proxy
            for k in ("steps", "batch_size", "lr", "kd", "eval_every"):
                relevant.pop(k)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def worker_count(self, gpus: int) -> int:
        """Local worker processes: ``workers``, or with "per-gpu" one per visible GPU (``gpus``; at least one)."""
        return max(1, int(gpus)) if self.workers == PER_GPU else int(self.workers)
