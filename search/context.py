"""Everything a trial needs, built from a ``StudyConfig`` alone (so each worker process rebuilds it).

Order matters for the "bad input creates nothing" rule: the data and model are checked (and the
checkpoint loaded) before anything is written; only then may a baseline be pre-trained and cached
in ``<workdir>/baseline.pt`` (reused on resume and by every worker).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from slimsearch.core.budget import FIT_REL_TOL, fit_cost
from slimsearch.core.data import DataSplits, load_splits, progress_to
from slimsearch.core.device import resolve_device
from slimsearch.core.errors import SlimError
from slimsearch.core.macs import policy_macs
from slimsearch.core.models import build_model, load_checkpoint
from slimsearch.core.policy import Policy
from slimsearch.core.rounding import round_policy
from slimsearch.evaluators.context import EvalContext, build_context
from slimsearch.search.study import StudyConfig
from slimsearch.spaces.describe import exclusions
from slimsearch.spaces.space import SearchSpace
from torch import nn

Log = Callable[[str], None]
LATENCY_WARM_S = 120.0  # longest a study start spends timing layer shapes ahead


@dataclass
class StudyContext:
    """The baseline model (eval mode), data splits, input shape (1, C, H, W), the evaluators'
    ``EvalContext``, the search space, and where the baseline weights came from."""

    cfg: StudyConfig
    model: nn.Module
    splits: DataSplits
    input_shape: tuple[int, ...]
    eval_ctx: EvalContext
    space: SearchSpace
    baseline_path: Path | None
    baseline_sha: str
    _latency_warmed: bool = field(default=False, init=False, repr=False)

    @property
    def base_macs(self) -> int:
        return int(self.eval_ctx.base.macs)

    def fit(self, policy: Policy) -> Policy:
        """The policy a search trial evaluates: with ``[constraint] fit = "scale"``, one above the MACs bound gets
        every layer it prunes scaled harder by one factor until it fits (within the space's largest rate;
        layers outside the space stay as they are), then likewise onto the latency bound; ``"fill"`` also
        prunes one more than 2 % below its bound less (within the space's smallest rate); ``fit_tolerance``
        gives filters back one at a time until the fit is within it. The latency fit aims
        ``[constraint] latency_margin`` below the latency bound (room for the table's error). Deterministic, so a
        resumed or retried trial evaluates the same policy: the latency fit predicts from the study's stored
        table (``core.latency``), where a shape is measured once (a retry racing another process for a new
        shape may differ by a filter or two)."""
        ctx, mode = self.eval_ctx, self.cfg.constraint.fit
        n = getattr(self.space.cfg, "round_to", None)  # [space] round_to: every cost is of the rounded policy

        def rounded(p: Any) -> Any:
            return round_policy(self.model, p, n, self.input_shape)

        if mode not in ("scale", "fill"):
            return rounded(policy)
        min_rate, max_rate = self.space.cfg.prune_rate
        fill, tol = mode == "fill", self.cfg.constraint.fit_tolerance
        rel_tol, top_up = (FIT_REL_TOL, False) if tol is None else (tol, True)
        # listed only for a decomposition (e.g. coupled = false's residual-stream convs): the fit never prunes them
        fixed = frozenset(policy.layers) - {n for u in self.space.units for n in u.layers}
        if ctx.max_macs is not None:
            policy, _ = fit_cost(self.model, policy, lambda p: policy_macs(self.model, rounded(p), self.input_shape),
                                 ctx.max_macs, self.input_shape, max_rate=max_rate, min_rate=min_rate,
                                 fill=fill, rel_tol=rel_tol, top_up=top_up, fixed=fixed)  # fmt: skip
        if ctx.max_latency_ratio is not None:
            table = ctx.latency_table()
            if table.predict(self.model, rounded(policy)) is not None:  # None: EVBMF ranks, measured by the evaluator
                bound = ctx.max_latency_ratio * table.base_ms * (1.0 - self.cfg.constraint.latency_margin)
                # Filled onto the MACs bound already: the latency fit only shrinks what is over its bound (and
                # its top-up gives back no filter that would break the MACs bound).
                max_macs = ctx.max_macs

                def macs_ok(p: Policy) -> bool:
                    return max_macs is None or policy_macs(self.model, rounded(p), self.input_shape) <= max_macs

                policy, _ = fit_cost(self.model, policy, lambda p: table.predict(self.model, rounded(p)), bound,
                                     self.input_shape, max_rate=max_rate, min_rate=min_rate,
                                     fill=fill and ctx.max_macs is None, rel_tol=rel_tol,
                                     top_up=top_up, allowed=macs_ok, fixed=fixed)  # fmt: skip
        return rounded(policy)

    def latency_info(self, log: Log | None = None) -> dict[str, Any] | None:
        """The latency bound in milliseconds and its table (None without a bound). The first call measures the
        table, or loads the study's stored one (a corrupt or mismatched file is a ``SlimError``), and times the
        shapes one-group pruning gives ahead (``LatencyTable.warm``, at most ``LATENCY_WARM_S`` seconds)."""
        e = self.eval_ctx
        if e.max_latency_ratio is None:
            return None
        try:
            table = e.latency_table()
        except SlimError as err:
            raise SlimError(f"{self.cfg.path}: [constraint] max_latency_ratio: {err}") from None
        if not self._latency_warmed:
            self._latency_warmed = True
            t = time.perf_counter()
            units = [u.layers for u in self.space.units]
            n = table.warm(self.model, units, max_rate=self.space.cfg.prune_rate[1], budget_s=LATENCY_WARM_S,
                           round_to=getattr(self.space.cfg, "round_to", None))  # fmt: skip
            if n and log is not None:
                log(f"latency table: {n} layer shapes timed in {time.perf_counter() - t:.0f} s "
                         f"({table.size} stored)")  # fmt: skip
        return {"batch": e.latency_batch, "base_ms": table.base_ms, "max_ratio": e.max_latency_ratio,
                "bound_ms": e.max_latency_ratio * table.base_ms, "table": str(table.path or "")}  # fmt: skip


def baseline_cache_path(cfg: StudyConfig) -> Path:
    return cfg.study.workdir / "baseline.pt"


def _state_sha(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_data(cfg: StudyConfig) -> DataSplits:
    """The study's train/val/test splits; a wrong root or dataset is a ``SlimError`` naming the file."""
    d = cfg.data
    if d.splits is not None:  # given in Python (slimsearch.load_study(..., data=...))
        return d.splits
    if d.factory is not None:
        return load_factory_data(cfg)
    try:
        return load_splits(d.dataset, d.root, d.val_size, d.seed, image_size=d.image_size, val_from=d.val_from,
                           val_root=d.val_root)  # fmt: skip
    except SlimError as e:
        raise SlimError(f"{cfg.path}: [data]: {e}") from None


def study_dir(cfg: StudyConfig) -> Path | None:
    """The study file's folder: where ``module:fn`` names of the study's user code are also looked up."""
    return Path(cfg.path).resolve().parent if Path(cfg.path).is_file() else None


def load_factory_data(cfg: StudyConfig) -> Any:
    """``[data] factory``: call the user's function (with the parameters it declares among root, seed, val_size)
    and take its splits (``core.user_data``); what it raises is reported with its file and line."""
    from slimsearch.core.models import factory_kwargs, import_factory, user_frame
    from slimsearch.core.user_data import to_splits

    d, what = cfg.data, "[data] factory"
    spec = str(d.factory)
    try:
        fn = import_factory(spec, study_dir(cfg), what)
        kwargs = factory_kwargs(spec, fn, {"root": d.root, "seed": d.seed, "val_size": d.val_size}, what)
    except SlimError as e:
        raise SlimError(f"{cfg.path}: {e}") from None
    try:
        result = fn(**kwargs)
    except Exception as e:  # the user's code: one line with where it raised, the traceback chained
        msg = " ".join(str(e).split())[:200]
        raise SlimError(f"{cfg.path}: {what} {spec!r} raised {type(e).__name__}{user_frame(e.__traceback__)}: "
                        f"{msg}") from e  # fmt: skip
    try:
        return to_splits(result, spec)
    except SlimError as e:
        raise SlimError(f"{cfg.path}: {e}") from None


def input_shape_for(cfg: StudyConfig, splits: DataSplits) -> tuple[int, int, int, int]:
    """(1, C, H, W) from the data, with [model] in_channels / input_size overriding."""
    ds = splits.train
    c = cfg.model.in_channels or ds.in_channels
    if cfg.model.input_size:
        return (1, int(c), int(cfg.model.input_size), int(cfg.model.input_size))
    return (1, int(c), int(ds.x.shape[-2]), int(ds.x.shape[-1]))


def build_baseline(cfg: StudyConfig, splits: DataSplits) -> nn.Module:
    """The untrained model of [model], sized for the data (classes, channels)."""
    m = cfg.model
    if m.module is not None:  # given in Python: a copy, so pre-training and eval() leave the caller's alone
        return copy.deepcopy(m.module)
    num_classes = m.num_classes or splits.train.num_classes
    _, in_channels, h, w = input_shape_for(cfg, splits)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.study.seed)  # same initial weights in every process (pre-training)
            return build_model(m.factory, num_classes=num_classes, in_channels=in_channels,
                               input_size=h if h == w else (h, w), search_dir=study_dir(cfg))  # fmt: skip
    except SlimError as e:
        raise SlimError(f"{cfg.path}: [model] factory: {e}") from None


def _load(model: nn.Module, path: Path, cfg: StudyConfig, key: str) -> nn.Module:
    try:
        return load_checkpoint(model, path)
    except SlimError as e:
        raise SlimError(f"{cfg.path}: [model] {key}: {e}") from None


def precheck_checkpoint(cfg: StudyConfig) -> None:
    """The [model] checkpoint is a readable state dict whose keys fit the model, checked before any data is loaded
    (an archive is extracted and images decoded into caches on the first load). Layer names do not depend on the
    class or channel counts, which need the data; shapes are checked once the data gives those."""
    from slimsearch.core.models import build_model, read_state_dict

    path = cfg.model.checkpoint
    if path is None or cfg.model.module is not None:
        return
    try:
        sd = read_state_dict(path)
    except SlimError as e:
        raise SlimError(f"{cfg.path}: [model] checkpoint: {e}") from None
    m = cfg.model
    # Guesses from the checkpoint (first conv's input channels, last matrix's rows); a factory that rejects them
    # is checked for real once the data gives the counts, so a wrong guess never refuses a good study.
    convs = [v for v in sd.values() if v.ndim == 4]
    mats = [v for v in sd.values() if v.ndim == 2]
    in_ch = m.in_channels or (int(convs[0].shape[1]) if convs else 3)
    classes = m.num_classes or (int(mats[-1].shape[0]) if mats else 10)
    try:
        with torch.random.fork_rng(devices=[]):
            probe = build_model(m.factory, num_classes=classes, in_channels=in_ch, input_size=m.input_size,
                                search_dir=study_dir(cfg))  # fmt: skip
    except Exception:  # SlimError included: reported after the data, with the real counts
        return
    own = probe.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"] if unexpected else []
        raise SlimError(f"{cfg.path}: [model] checkpoint: checkpoint {path} does not fit model "
                        f"{type(probe).__name__}: {'; '.join(parts)}")  # fmt: skip


def check_classes(cfg: StudyConfig, splits: Any) -> None:
    """[model] num_classes must cover every label of the data (else training fails deep inside a loss)."""
    want = cfg.model.num_classes
    have = int(splits.train.num_classes)
    if want is not None and want < have:
        raise SlimError(f"{cfg.path}: [model] num_classes: {want}, but dataset {cfg.data.dataset} has {have} classes "
                        f"(labels 0..{have - 1}); set num_classes >= {have} or leave it out")  # fmt: skip


def pretrain_baseline(
    cfg: StudyConfig, model: nn.Module, splits: DataSplits, log: Log, fingerprint: str = "", device: str = "cpu"
) -> Path:
    """Train ``model`` for [model] pretrain_epochs on ``device`` (resumable, ``search.pretrain``) and save it
    atomically as ``<workdir>/baseline.pt`` with the recipe's ``fingerprint`` (``model`` is back on the CPU)."""
    from slimsearch.search.pretrain import pretrain

    path = baseline_cache_path(cfg)
    pretrain(cfg, model, splits, path, fingerprint, log, device)
    return path


def build_study_context(cfg: StudyConfig, *, log: Log | None = None, allow_pretrain: bool = True) -> StudyContext:
    """Data, baseline model (checkpoint, cached pre-trained baseline, or pre-train now), EvalContext, space.

    ``allow_pretrain=False`` (workers) refuses to train a baseline: it must already be cached by
    ``slimsearch run``, so every process searches the same weights.
    """
    log = log or (lambda s: None)
    # cuda without CUDA: one line, before anything is read or written.
    device = resolve_device(cfg.study.device, f"{cfg.path}: [study] device")
    if cfg.evaluator.kind == "custom":  # importable here (study folder on sys.path) before anything runs
        from slimsearch.core.models import import_factory

        try:
            import_factory(str(cfg.evaluator.fn), study_dir(cfg), "[evaluator] fn")
        except SlimError as e:
            raise SlimError(f"{cfg.path}: {e}") from None
    precheck_checkpoint(cfg)  # cheap: before the data is extracted or decoded into caches
    with progress_to(log):  # archive extraction and first decode say how far they are
        splits = load_data(cfg)
    check_classes(cfg, splits)
    model = build_baseline(cfg, splits)
    shape = input_shape_for(cfg, splits)
    classes = cfg.model.num_classes or splits.train.num_classes
    source: Path | None
    if cfg.model.checkpoint is not None:
        source = cfg.model.checkpoint
        _load(model, source, cfg, "checkpoint")
    elif cfg.model.module is not None and cfg.model.pretrain_epochs <= 0:
        source = None  # an nn.Module given in Python: its weights are the baseline
    else:
        from slimsearch.search.pretrain import recipe_fingerprint, stored_fingerprint

        source = baseline_cache_path(cfg)
        fp = recipe_fingerprint(cfg, shape, splits)
        stored = stored_fingerprint(source) if source.is_file() else None
        if source.is_file() and stored not in (None, fp):  # None: an older file without one, reused as before
            if not allow_pretrain:
                raise SlimError(f"{cfg.path}: the baseline at {source} was pre-trained with another recipe; "
                                "run `slimsearch run` first to train this one")  # fmt: skip
            log(f"the pre-training recipe changed since {source} was trained ([model], [data] or the factory's "
                "code): training a new baseline")  # fmt: skip
        if source.is_file() and stored in (None, fp):
            _load(model, source, cfg, f"pretrained baseline (delete {source} to retrain it)")
        elif allow_pretrain:
            check_forward(model, shape, cfg, classes)
            try:  # the space depends on the structure only: a bad [space] must fail before training writes
                SearchSpace.build(model, cfg.space, shape)
            except SlimError as e:
                raise SlimError(f"{cfg.path}: {e}") from None
            pretrain_baseline(cfg, model, splits, log, fp, device=str(device))
        else:
            raise SlimError(f"{cfg.path}: no baseline at {source}; start the study with `slimsearch run` first")
    model.eval()
    check_forward(model, shape, cfg, classes)
    c = cfg.constraint
    try:
        # In-memory result cache here; the runner attaches the persistent one once the input is valid.
        ectx = build_context(model, splits, shape, max_macs_ratio=c.max_macs_ratio, max_macs=c.max_macs,
                             max_latency_ratio=c.max_latency_ratio, latency_batch=c.latency_batch,
                             latency_dir=cfg.study.workdir / "latency",
                             latency_memory_format=latency_layout(cfg),
                             latency_runtime=getattr(cfg.export, "runtime", "torchscript"),
                             latency_threads=getattr(cfg.export, "threads", 1), device=device)  # fmt: skip
        space = SearchSpace.build(model, cfg.space, shape)
    except SlimError as e:
        raise SlimError(f"{cfg.path}: {e}") from None
    return StudyContext(cfg, model, splits, shape, ectx, space, source, _state_sha(model))


def latency_layout(cfg: StudyConfig) -> str:
    """The conv weight layout a latency bound predicts: the export's; contiguous for ``auto`` (whose export keeps
    channels_last only where that runs faster at batch 1)."""
    if getattr(cfg.export, "runtime", "torchscript") == "onnxruntime":
        return "contiguous"  # ORT picks its own layout
    return "contiguous" if cfg.export.memory_format == "auto" else cfg.export.memory_format


def check_forward(model: nn.Module, shape: tuple[int, ...], cfg: StudyConfig, num_classes: int | None = None) -> None:
    """One forward pass on zeros, so a model/data mismatch (input shape, ``num_classes`` outputs) is reported
    before any search starts."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(shape))
            model.train(was)
    except Exception as e:  # the user's model, the user's input shape
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlimError(f"{cfg.path}: [model] {cfg.model.factory} fails on input {list(shape)}: {first}") from None
    if out.ndim != 2:
        raise SlimError(
            f"{cfg.path}: [model] {cfg.model.factory} returns shape {list(out.shape)}, expected [batch, classes]"
        )
    if num_classes is not None:
        from slimsearch.core.models import check_num_classes

        try:
            check_num_classes(int(out.shape[1]), num_classes, cfg.model.factory)
        except SlimError as e:
            raise SlimError(f"{cfg.path}: {e}") from None


def study_info(sctx: StudyContext) -> dict[str, Any]:
    """What status/report need without rebuilding the model: baseline cost, bound, layer shapes."""
    e, excluded = sctx.eval_ctx, exclusions(sctx.space)
    return {
        "base": {
            "macs": int(e.base.macs),
            "params": int(e.base.params),
            "val_acc": e.base_val_acc,
            "input_shape": list(sctx.input_shape),
        },  # fmt: skip
        "max_macs": e.max_macs,
        "latency": sctx.latency_info(),
        "layers": [
            {
                "name": i.name,
                "out_channels": int(i.out_channels),
                "prunable": bool(i.prunable),
                "decomposable": bool(i.decomposable),
                "excluded": excluded.get(i.name),  # why the search leaves it alone (None: searched)
            }  # fmt: skip
            for i in sctx.space.all_layers
        ],
        "model": sctx.cfg.model.factory,
        "dataset": sctx.cfg.data.dataset,
        "baseline_sha": sctx.baseline_sha,
    }
