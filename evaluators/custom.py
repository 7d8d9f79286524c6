"""``[evaluator] kind = "custom"``: the user's own scoring, for metrics other than top-1 (mAP, F1) or a fine-tune
of their own.

``fn = "pkg.module:score"`` is called as ``score(model, data, budget)`` on every candidate that meets the bounds:
``model`` is the compressed network on the study's device (BN statistics recalibrated; set the train/eval mode
you need), ``data`` the study's ``DataSplits`` with ``test`` withheld (None: the search never sees it), and
``budget`` a dict of the ``[evaluator]`` settings (steps, batch_size, lr, kd, seed) plus ``baseline``, the
uncompressed model (eval mode; a teacher for distillation; do not modify it). It returns a dict with
``"val_acc"`` (the score the search maximises, a finite number; any scale) and optionally more numbers, stored
as extra metrics. Anything it raises fails that trial with the exception's type, message and file:line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from slimsearch.core.errors import SlimError
from slimsearch.evaluators.config import EvaluatorConfig
from torch import nn


def budget_of(cfg: EvaluatorConfig, baseline: nn.Module) -> dict[str, Any]:
    """The ``budget`` argument of a custom evaluator."""
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "kd": cfg.kd, "seed": cfg.seed,
            "baseline": baseline}  # fmt: skip


def check_scores(spec: str, out: Any) -> dict[str, float]:
    """The returned dict as metrics: ``val_acc`` required and finite, every value a number."""
    if not isinstance(out, Mapping):
        raise SlimError(f"custom evaluator {spec!r} returned {type(out).__name__}, not a dict with 'val_acc'")
    if "val_acc" not in out:
        raise SlimError(f"custom evaluator {spec!r} returned keys {sorted(out)[:5]} without 'val_acc'")
    metrics: dict[str, float] = {}
    for k, v in out.items():
        try:
            metrics[str(k)] = float(v)
        except (TypeError, ValueError):
            raise SlimError(f"custom evaluator {spec!r}: {k!r} is {type(v).__name__}, not a number") from None
    if not math.isfinite(metrics["val_acc"]):
        raise SlimError(f"custom evaluator {spec!r} returned val_acc {metrics['val_acc']}")
    return metrics


def score(cfg: EvaluatorConfig, model: nn.Module, splits: Any, baseline: nn.Module) -> dict[str, float]:
    """Call the study's custom evaluator on ``model`` (``splits.test`` withheld); its checked scores."""
    from slimsearch.core.data import DataSplits
    from slimsearch.core.models import import_factory, user_frame

    spec = str(cfg.fn)
    fn = import_factory(spec, None, "[evaluator] fn")  # the study folder is on sys.path: build_study_context
    try:
        out = fn(model, DataSplits(splits.train, splits.val, None), budget_of(cfg, baseline))
    except Exception as e:  # the user's code: the trial fails with where it raised
        msg = " ".join(str(e).split())[:200]
        raise SlimError(f"custom evaluator {spec!r} raised {type(e).__name__}{user_frame(e.__traceback__)}: "
                        f"{msg}") from e  # fmt: skip
    return check_scores(spec, out)
