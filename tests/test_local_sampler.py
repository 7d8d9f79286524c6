"""slimsearch.search.local_sampler: new trials are small mutations of the best finished (feasible) trials."""

from __future__ import annotations

import optuna
import pytest
from slimsearch.search.local_sampler import LocalSearchSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
CHOICES = ("l1", "fpgm", "l2")


def _objective(trial: optuna.Trial) -> float:
    xs = [trial.suggest_float(f"x{i}", 0.0, 0.8, step=0.05) for i in range(10)]
    c = trial.suggest_categorical("c", CHOICES)
    if trial.suggest_categorical("dec", ("none", "tucker")) == "tucker":
        trial.suggest_float("rank", 0.3, 0.9)
    return -sum((x - 0.4) ** 2 for x in xs) - (c != "fpgm")


def _changed(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> set[str]:
    return {k for k in a.params if k in b.params and a.params[k] != b.params[k]}


def test_children_differ_from_a_top_trial_in_a_few_parameters() -> None:
    study = optuna.create_study(direction="maximize", sampler=LocalSearchSampler(seed=0, top_k=1, mutations=2))
    seed = {**{f"x{i}": 0.0 for i in range(10)}, "c": "l1", "dec": "none"}
    study.enqueue_trial(seed)
    study.optimize(_objective, n_trials=1)
    best = study.best_trial
    study.optimize(_objective, n_trials=1)
    child = study.trials[1]
    diff = _changed(child, best)
    assert 1 <= len(diff) <= 6, diff  # ~2 expected of 12; at least one always
    for k in diff:  # numbers move on the grid and stay inside the range
        if k.startswith("x"):
            assert 0.0 <= child.params[k] <= 0.8 and abs(child.params[k] / 0.05 - round(child.params[k] / 0.05)) < 1e-9


def test_local_search_refines_a_seed_where_tpe_does_not() -> None:
    """20 numbers and a category: TPE (as the studies configure it) keeps the enqueued seed as its best in
    60 trials; local search improves on it every time."""
    n = 20

    def objective(trial: optuna.Trial) -> float:
        xs = [trial.suggest_float(f"x{i}", 0.0, 0.8, step=0.05) for i in range(n)]
        return -sum((x - 0.4) ** 2 for x in xs) - (trial.suggest_categorical("c", CHOICES) != "fpgm")

    seed = {**{f"x{i}": 0.25 for i in range(n)}, "c": "fpgm"}
    seed_value = -n * 0.15**2

    def run(sampler: optuna.samplers.BaseSampler) -> float:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.enqueue_trial(seed)
        study.optimize(objective, n_trials=60)
        return study.best_value

    local = [run(LocalSearchSampler(seed=s)) for s in range(3)]
    tpe = [
        run(optuna.samplers.TPESampler(seed=s, n_startup_trials=10, multivariate=True, group=True)) for s in range(3)
    ]
    assert min(local) > seed_value + 0.1, (local, seed_value)
    assert sum(local) > sum(tpe) + 0.15, (local, tpe)


def test_infeasible_trials_are_never_parents() -> None:
    """A trial with a positive constraint entry ranks after every feasible one, whatever its value."""
    sampler = LocalSearchSampler(seed=1, top_k=1, mutations=0.01)  # one change a child
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0, step=0.1)
        y = trial.suggest_float("y", 0.0, 1.0, step=0.1)
        trial.set_user_attr("constraint", [x - 0.5])  # feasible when x <= 0.5
        return x + y

    study.enqueue_trial({"x": 1.0, "y": 1.0})  # best value, infeasible
    study.enqueue_trial({"x": 0.0, "y": 0.0})  # the only feasible trial
    study.optimize(objective, n_trials=3)
    child = study.trials[2]
    assert len(_changed(child, study.trials[1])) == 1 and len(_changed(child, study.trials[0])) >= 1


def test_random_until_enough_trials_finished_and_bad_settings() -> None:
    study = optuna.create_study(direction="maximize", sampler=LocalSearchSampler(seed=0, n_startup_trials=5))
    study.optimize(_objective, n_trials=5)
    assert len({t.params["x0"] for t in study.trials}) >= 3  # independent draws, not copies
    for kw in ({"top_k": 0}, {"mutations": 0}, {"sigma": 0.0}, {"sigma": 1.5}):
        with pytest.raises(ValueError, match="LocalSearchSampler"):
            LocalSearchSampler(**kw)
