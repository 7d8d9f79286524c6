"""ABSHPC adaptive binary search (search/methods/abshpc.py) on synthetic and deterministic evaluators."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest
import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from slimsearch.core.policy import Policy, rate_for_removed
from slimsearch.search.methods import abshpc_search, call_bound
from torch import nn

SIZES = [8, 16, 32, 12, 64, 5]


def convnet(sizes: list[int]) -> tuple[nn.Module, list[str]]:
    layers, c = [], 3
    for n in sizes:
        layers.append(nn.Conv2d(c, n, 3, padding=1))
        c = n
    return nn.Sequential(*layers), [str(i) for i in range(len(sizes))]


def removed_counts(policy: Policy, model: nn.Module, names: list[str]) -> dict[str, int]:
    convs = dict(model.named_modules())
    return {n: convs[n].out_channels - policy.get(n).keep_count(convs[n].out_channels) for n in names}


def threshold_acc(thresholds: dict[str, int], sizes: dict[str, int], a0: float = 0.9):
    """Accuracy a0 while every layer removes at most its threshold filters, a0 − 0.1 otherwise (per layer)."""

    def acc(policy: Policy) -> float:
        bad = 0
        for name, lp in policy.layers.items():
            removed = sizes[name] - lp.keep_count(sizes[name])
            bad += removed > thresholds[name]
        return a0 - 0.1 * bad

    return acc


def test_rate_for_removed_round_trips_through_json() -> None:
    for n in (3, 7, 12, 64, 100, 512):
        for removed in range(n):
            r = rate_for_removed(removed, n)
            assert math.floor(r * n) == removed
            assert math.floor(round(r, 6) * n) == removed
    with pytest.raises(SlimError):
        rate_for_removed(5, 5)


@pytest.mark.parametrize("seed", range(6))
def test_threshold_curve_finds_largest_admissible_rate_within_one_filter(seed: int) -> None:
    model, names = convnet(SIZES)
    sizes = dict(zip(names, SIZES, strict=True))
    rng = random.Random(seed)
    thresholds = {n: rng.randrange(0, sizes[n]) for n in names}
    calls = []
    acc = threshold_acc(thresholds, sizes)

    def counted(p: Policy) -> float:
        calls.append(p.hash)
        return acc(p)

    res = abshpc_search(model, names, counted, epsilon=0.005)
    got = removed_counts(res.policy, model, names)
    # analytic answer, last layer first: at most the threshold, at most the previous layer's rate
    bound = Fraction(sizes[names[-1]] - 1, sizes[names[-1]])
    for n in reversed(names):
        expected = min(thresholds[n], math.floor(bound * sizes[n]))
        assert got[n] <= expected, (n, got[n], expected)
        assert expected - got[n] <= 1, (n, got[n], expected)
        bound = Fraction(got[n], sizes[n])
    assert res.report["evaluator_calls"] == len(calls) == len(set(calls))
    assert res.report["evaluator_calls"] <= call_bound(SIZES) == res.report["call_bound"]
    assert res.report["a0"] == 0.9 and res.report["final_acc"] == 0.9
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", range(20))
def test_monotone_constraint_holds_for_random_curves(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([4, 7, 16, 33, 64]) for _ in range(rng.randint(2, 7))]
    model, names = convnet(sizes)
    noise: dict[str, float] = {}

    def acc(policy: Policy) -> float:  # arbitrary (non-monotone) deterministic curve per policy
        return noise.setdefault(policy.hash, 0.9 if not policy.layers else rng.uniform(0.88, 0.9))

    eps = rng.choice([0.0, 0.005, 0.01])
    res = abshpc_search(model, names, acc, epsilon=eps)
    got = removed_counts(res.policy, model, names)
    rates = [Fraction(got[n], s) for n, s in zip(names, sizes, strict=True)]
    for earlier, later in zip(rates, rates[1:], strict=False):
        assert earlier <= later  # forward order: each rate ≤ the rate of the layer after it (processed before)
    assert all(r < 1 for r in rates)
    assert res.report["evaluator_calls"] <= call_bound(sizes)
    # every accepted step kept the loss within epsilon of a0
    assert res.report["a0"] - res.report["final_acc"] <= eps + 1e-12
    for name in names:
        assert res.report["layers"][name]["removed"] == got[name]


def test_smooth_curve_and_rate_resolution_reduce_calls() -> None:
    model, names = convnet([64, 64, 64])

    def acc(policy: Policy) -> float:  # loses 1 pt per 10% removed in total (cumulative)
        return 0.9 - 0.1 * sum(lp.prune_rate for lp in policy.layers.values())

    fine = abshpc_search(model, names, acc, epsilon=0.05 + 1e-9)
    coarse = abshpc_search(model, names, acc, epsilon=0.05 + 1e-9, rate_resolution=0.1)
    # the whole budget of 0.5 in summed rate goes to the last layer first
    assert removed_counts(fine.policy, model, names) == {"0": 0, "1": 0, "2": 32}
    assert coarse.report["evaluator_calls"] < fine.report["evaluator_calls"]
    assert sum(removed_counts(coarse.policy, model, names).values()) <= 32


def test_bad_arguments() -> None:
    model, names = convnet([8, 8])
    with pytest.raises(SlimError, match="not a Conv2d"):
        abshpc_search(model, ["nope"], lambda p: 1.0)
    with pytest.raises(SlimError, match="epsilon"):
        abshpc_search(model, names, lambda p: 1.0, epsilon=-1)
    with pytest.raises(SlimError, match="no layers"):
        abshpc_search(model, [], lambda p: 1.0)


def test_smallcnn_policy_validates_and_applies() -> None:
    pytest.importorskip("slimsearch.core.apply")
    from slimsearch.core.apply import apply_policy
    from slimsearch.core.cost import count_cost

    torch.manual_seed(0)
    model = build_model("smallcnn").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    def acc(policy: Policy) -> float:  # deterministic: quadratic in each layer's rate, later layers cheaper
        return 0.95 - sum((i + 1) ** -1 * 0.05 * policy.get(n).prune_rate ** 2 for i, n in enumerate(names))

    res = abshpc_search(model, names, acc, epsilon=0.005, input_shape=(1, 1, 8, 8))
    res.policy.validate(model)
    assert all(lp.criterion == "hpc" for lp in res.policy.layers.values())
    assert res.policy.layers, "some layer must be pruned under this curve"
    small = apply_policy(model, res.policy, input_shape=(1, 1, 8, 8))
    out = small(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    for name, lp in res.policy.layers.items():
        n = dict(model.named_modules())[name].out_channels
        assert dict(small.named_modules())[name].out_channels == lp.keep_count(n)
    cost = res.report["cost"]
    assert cost["params"] == count_cost(small, (1, 1, 8, 8)).params < cost["base_params"]
    assert 0 < cost["macs_ratio"] < 1
    assert Policy.from_json(res.policy.to_json()) == res.policy
    json.dumps(res.to_dict())
