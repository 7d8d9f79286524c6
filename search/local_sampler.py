"""Local search around the best trials: the ``[study] sampler = "local"`` option.

Why our own sampler: the policy space of a ResNet has ~50-100 parameters (a prune rate, criterion and
decomposition per layer), and a study has tens of trials. TPE's Parzen windows are then about as wide as the
ranges (the new trials land anywhere, far from the seeds), and CMA-ES sends categorical parameters to an
independent random sampler, which scrambles a seed's criteria and decompositions. The seeds (Torch-Pruning's
global allocation, uniform rates, the paper methods) are already good; what a short study can do is refine
them. So each new trial copies one of the ``top_k`` best finished trials (feasible first) and changes a few
of its parameters: numbers by a Gaussian step of ``sigma`` times their range, categories to another choice.
A (mu + lambda) evolution strategy, built on Optuna's ``BaseSampler`` so that storages, enqueued seeds,
pruners and the Ray searcher work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState


class LocalSearchSampler(optuna.samplers.BaseSampler):
    """Mutate one of the ``top_k`` best trials: each parameter changes with probability
    ``mutations / (parameters of the parent)`` (at least one changes); ``sigma`` is the Gaussian step of a
    number as a fraction of its range. Random sampling until ``n_startup_trials`` trials finished (enqueued
    seeds count). Single-objective; a trial whose ``constraint`` user attr has a positive entry ranks after
    every feasible one."""

    def __init__(
        self, seed: int | None = None, n_startup_trials: int = 0, top_k: int = 3, mutations: float = 3.0,
        sigma: float = 0.15,
    ) -> None:  # fmt: skip
        if top_k < 1 or mutations <= 0 or not 0 < sigma <= 1:
            raise ValueError(f"LocalSearchSampler: need top_k >= 1, mutations > 0, 0 < sigma <= 1, got "
                             f"{top_k}, {mutations}, {sigma}")  # fmt: skip
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self.n_startup_trials, self.top_k, self.mutations, self.sigma = n_startup_trials, top_k, mutations, sigma
        self._plans: dict[int, tuple[dict[str, Any], dict[str, BaseDistribution], set[str]]] = {}

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        parent = self._parent(study)
        if parent is None:
            return
        names = sorted(parent.params)
        p = min(1.0, self.mutations / len(names))
        chosen = {n for n in names if self._rng.random_sample() < p} or {names[self._rng.randint(len(names))]}
        self._plans[trial.number] = (parent.params, parent.distributions, chosen)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        plan = self._plans.get(trial.number)
        if plan is None or param_name not in plan[0] or plan[1][param_name] != param_distribution:
            # No parent yet, or a parameter the parent did not have (a rank ratio once decomposing).
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        value = plan[0][param_name]
        return self._mutate(value, param_distribution) if param_name in plan[2] else value

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._plans.pop(trial.number, None)

    # ------------------------------------------------------------------ helpers
    def _parent(self, study: Study) -> FrozenTrial | None:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        if not done or len(done) < self.n_startup_trials:
            return None
        sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0

        def key(t: FrozenTrial) -> tuple[bool, float]:
            infeasible = any(v > 0 for v in t.user_attrs.get("constraint", ()))
            v = t.values[0]
            return infeasible, sign * v if math.isfinite(v) else math.inf

        best = sorted(done, key=key)[: self.top_k]
        return best[self._rng.randint(len(best))]

    def _mutate(self, value: Any, dist: BaseDistribution) -> Any:
        if isinstance(dist, CategoricalDistribution):
            others = [c for c in dist.choices if c != value]
            return others[self._rng.randint(len(others))] if others else value
        if not isinstance(dist, (FloatDistribution, IntDistribution)) or dist.high == dist.low:
            return value
        lo, hi, step = float(dist.low), float(dist.high), dist.step
        if getattr(dist, "log", False):
            x = math.exp(math.log(value) + self._rng.normal(0.0, self.sigma * math.log(hi / lo)))
        else:
            x = value + self._rng.normal(0.0, self.sigma * (hi - lo))
        x = min(hi, max(lo, x))
        if step:
            x = lo + round((x - lo) / step) * step
            if math.isclose(x, value):  # the step fell inside the grid cell: move one grid point
                up, down = value + step <= hi + 1e-12, value - step >= lo - 1e-12
                x = value + step if up and (not down or self._rng.random_sample() < 0.5) else value - step
            x = round(min(hi, max(lo, x)), 10)
        return int(round(x)) if isinstance(dist, IntDistribution) else float(x)
