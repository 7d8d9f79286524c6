"""core/budget.py: scaling a policy's kept filters onto a MACs bound. Random weights, no data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from slimsearch.core.apply import apply_policy
from slimsearch.core.budget import (
    bisect_budget,
    fit_macs,
    policy_macs,
    prunable_leaders,
    scale_kept,
    top_up_filters,
)
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


class _Coupled(nn.Module):
    """``a`` and ``short`` are added, so they form one prunable group led by ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.short = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(F.relu(self.stem(x))) + self.short(x))
        return self.fc(F.relu(self.b(y)).mean((2, 3)))


def test_bisect_finds_smallest_setting_within_budget() -> None:
    def macs(x: float) -> float:  # a non-increasing step function, steps of 1/16
        return 1000.0 * (1 - int(x * 16) / 16)

    x, m = bisect_budget(macs, 600.0, hi=0.95, iters=14)
    assert m <= 600.0 and m == macs(x)
    assert macs(x - 1e-3) > 600.0  # just below the returned setting the budget is broken
    assert abs(x - 7 / 16) < 1e-3  # 1 - 7/16 = 0.5625 is the first step under 0.6
    with pytest.raises(SlimError, match="out of reach"):
        bisect_budget(macs, 10.0, hi=0.5)


def test_scale_keeps_allocation_masks_and_criteria(resnet20: nn.Module) -> None:
    names = prunable_leaders(resnet20, SHAPE)
    first, second = names[0], names[1]
    mask = tuple(range(0, 16, 2))  # GA-style explicit kept filters
    policy = Policy({first: LayerPolicy(prune_rate=0.5, criterion="mask", keep=mask),
                     second: LayerPolicy(prune_rate=0.5, criterion="hpc", clusters=8)})  # fmt: skip
    assert scale_kept(resnet20, policy, 0.0, SHAPE) == policy
    p = scale_kept(resnet20, policy, 0.5, SHAPE)
    assert set(p[first].keep) <= set(mask) and len(p[first].keep) == 4 and p[first].criterion == "mask"
    w = resnet20.get_submodule(first).weight.detach().flatten(1).abs().sum(1)
    assert min(float(w[i]) for i in p[first].keep) >= max(float(w[i]) for i in set(mask) - set(p[first].keep))
    assert p[second].clusters == 4 and p[second].criterion == "hpc"
    assert p[names[2]].keep_count(16) == 8 and p[names[2]].criterion == "l1"  # unlisted layers pruned too
    assert set(scale_kept(resnet20, policy, 0.5, SHAPE, criterion=None).layers) == {first, second}
    empty = scale_kept(resnet20, Policy(), 0.25, SHAPE, criterion="hpc")  # e.g. ABSHPC that pruned nothing
    assert set(empty.layers) == set(names) and {lp.criterion for lp in empty.layers.values()} == {"hpc"}
    assert all(lp.keep_count(16) == 12 for n, lp in empty.layers.items() if n.startswith("layer1"))
    with pytest.raises(SlimError, match="scale factor"):
        scale_kept(resnet20, policy, 1.0, SHAPE)


def test_scale_clamps_explicit_ranks_to_the_pruned_kernel(resnet20: nn.Module) -> None:
    name = "layer1.0.conv1"  # 16 -> 16 channels, 3x3
    policy = Policy({name: LayerPolicy(decomposition="tucker", rank=(16, 16))})
    p = scale_kept(resnet20, policy, 0.5, SHAPE, criterion=None)
    assert p[name].keep_count(16) == 8 and p[name].rank == (16, 8)  # out rank <= 8 kept filters
    apply_policy(resnet20, p, input_shape=SHAPE)  # a rank above the kernel would raise


def test_scale_keeps_coupled_members_consistent() -> None:
    torch.manual_seed(0)
    net = _Coupled().eval()
    assert prunable_leaders(net, SHAPE) == ["stem", "a", "b"]
    policy = Policy({"a": LayerPolicy(prune_rate=0.25), "short": LayerPolicy(prune_rate=0.25, decomposition="none")})
    p = scale_kept(net, policy, 0.5, SHAPE, criterion=None)
    assert set(p.layers) == {"a", "short"}  # stem and b are not in the policy: left alone
    assert p["a"].keep_count(16) == p["short"].keep_count(16) == 6  # floor(12 * 0.5)
    out = apply_policy(net, p, input_shape=SHAPE)
    assert out.a.out_channels == out.short.out_channels == out.b.in_channels == 6 and out.stem.out_channels == 16


def test_fit_macs_meets_the_bound_tightly(resnet20: nn.Module) -> None:
    graph = model_graph(resnet20, SHAPE)
    names = [n for n in prunable_leaders(resnet20, SHAPE) if graph.layers[n].group is None]  # block-inner convs
    base = count_cost(resnet20, SHAPE).macs
    # a deep-heavy allocation: the first stage untouched, later stages pruned
    policy = Policy({n: LayerPolicy(prune_rate=0.0 if n.startswith("layer1") else 0.5) for n in names})
    assert fit_macs(resnet20, policy, base, SHAPE) == (policy, 0.0)  # within the bound: unchanged
    bound = 0.5 * base
    assert policy_macs(resnet20, policy, SHAPE) > bound
    fitted, t = fit_macs(resnet20, policy, bound, SHAPE)
    assert t is not None and 0 < t < 1 and fitted == scale_kept(resnet20, policy, t, SHAPE, criterion=None)
    macs = policy_macs(resnet20, fitted, SHAPE)
    assert 0.9 * bound < macs <= bound

    def macs_at(x: float) -> float:
        return policy_macs(resnet20, scale_kept(resnet20, policy, x, SHAPE, criterion=None), SHAPE)

    _, tightest = bisect_budget(macs_at, bound, iters=14)
    assert macs == tightest  # as close to the bound as the channel grid allows (16-filter layers: 5 % steps)
    assert macs_at(0.9 * t) > bound
    # the allocation survives: every layer keeps ~(1 - t) of what it kept, so layer1 keeps twice the share
    kept = {n: fitted[n].keep_count(resnet20.get_submodule(n).out_channels) for n in names}
    share = {n: kept[n] / resnet20.get_submodule(n).out_channels for n in names}
    assert all(abs(share[n] - (1 - t)) <= 1 / 16 for n in names if n.startswith("layer1"))
    assert all(abs(share[n] - 0.5 * (1 - t)) <= 1 / 32 for n in names if not n.startswith("layer1"))
    # only listed layers can shrink: a bound below what the unlisted layers cost is out of reach
    alone = Policy({names[-1]: LayerPolicy(prune_rate=0.5)})
    assert fit_macs(resnet20, alone, 0.3 * base, SHAPE) == (alone, None)
    assert fit_macs(resnet20, alone, 0.6 * base, SHAPE, criterion="l1")[1] is not None


def test_negative_scale_prunes_less_and_masks_get_their_strongest_filters_back(resnet20: nn.Module) -> None:
    names = prunable_leaders(resnet20, SHAPE)
    first, second, third = names[:3]
    mask = (0, 1, 2, 3)
    policy = Policy({first: LayerPolicy(prune_rate=0.75, criterion="mask", keep=mask),
                     second: LayerPolicy(prune_rate=0.5, criterion="hpc", clusters=8),
                     third: LayerPolicy(prune_rate=0.25)})  # fmt: skip
    p = scale_kept(resnet20, policy, -1.0, SHAPE, criterion=None)  # keep twice as many, at most all
    assert len(p[first].keep) == 8 and set(mask) <= set(p[first].keep) and p[first].keep_count(16) == 8
    w = resnet20.get_submodule(first).weight.detach().flatten(1).abs().sum(1)
    back, dropped = set(p[first].keep) - set(mask), set(range(16)) - set(p[first].keep)
    assert min(float(w[i]) for i in back) >= max(float(w[i]) for i in dropped)
    assert p[second].clusters == 16 and p[second].prune_rate == 0.0
    assert p[third].keep_count(16) == 16
    floor = scale_kept(resnet20, policy, -1.0, SHAPE, criterion=None, min_rate=0.25)  # the space's smallest rate
    assert floor[second].keep_count(16) == floor[third].keep_count(16) == 12
    with pytest.raises(SlimError, match="scale factor"):
        scale_kept(resnet20, policy, float("-inf"), SHAPE)


def test_fill_spends_the_budget_of_a_policy_under_it(resnet20: nn.Module) -> None:
    graph = model_graph(resnet20, SHAPE)
    names = [n for n in prunable_leaders(resnet20, SHAPE) if graph.layers[n].group is None]
    base = count_cost(resnet20, SHAPE).macs
    bound = 0.5 * base
    policy = Policy({n: LayerPolicy(prune_rate=0.3 if n.startswith("layer1") else 0.8) for n in names})
    under = policy_macs(resnet20, policy, SHAPE)
    assert under < 0.9 * bound
    assert fit_macs(resnet20, policy, bound, SHAPE) == (policy, 0.0)  # scale only: left under the bound
    filled, t = fit_macs(resnet20, policy, bound, SHAPE, fill=True)
    assert t is not None and t < 0 and filled == scale_kept(resnet20, policy, t, SHAPE, criterion=None)
    macs = policy_macs(resnet20, filled, SHAPE)
    assert 0.98 * bound <= macs <= bound  # rel_tol 2 %
    assert all(filled[n].prune_rate < policy[n].prune_rate for n in names)  # every layer gave some back
    # a policy whose pruned layers fit even when they keep every filter comes back unpruned
    alone = Policy({names[-1]: LayerPolicy(prune_rate=0.5)})
    back, t_all = fit_macs(resnet20, alone, base, SHAPE, fill=True)
    assert back[names[-1]].prune_rate == 0.0 and t_all == -1.0
    assert fit_macs(resnet20, filled, bound, SHAPE, fill=True) == (filled, 0.0)  # within 2 %: its own fit


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_top_up_lands_every_fill_within_one_percent_of_the_bound(resnet20: nn.Module, ratio: float) -> None:
    # Rates on a 0.05 grid: many layers share one, so the one-factor fit moves them together in coarse steps and
    # stops 1-9 % under the bound; giving filters back one at a time closes the gap without crossing the bound.
    graph = model_graph(resnet20, SHAPE)
    names = [n for n in prunable_leaders(resnet20, SHAPE) if graph.layers[n].group is None]
    bound = ratio * count_cost(resnet20, SHAPE).macs
    coarse = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        policy = Policy({n: LayerPolicy(prune_rate=float(np.round(rng.uniform(0, 0.8) / 0.05) * 0.05)) for n in names})
        one, t = fit_macs(resnet20, policy, bound, SHAPE, fill=True, max_rate=0.8, rel_tol=0.01)
        coarse.append(policy_macs(resnet20, one, SHAPE) / bound)
        exact, t2 = fit_macs(resnet20, policy, bound, SHAPE, fill=True, max_rate=0.8, rel_tol=0.01, top_up=True)
        assert t2 == t
        assert 0.99 * bound <= policy_macs(resnet20, exact, SHAPE) <= bound
        assert all(exact[n].keep_count(16) >= one[n].keep_count(16) for n in names)  # it only gives filters back
        assert top_up_filters(resnet20, exact, lambda p: policy_macs(resnet20, p, SHAPE), bound, SHAPE,
                              rel_tol=0.01) == exact  # fmt: skip
        never = top_up_filters(resnet20, one, lambda p: policy_macs(resnet20, p, SHAPE), bound, SHAPE, rel_tol=0.01,
                               allowed=lambda p: False)  # fmt: skip
        assert never == one  # a second bound that refuses every step
    assert min(coarse) < 0.99  # the case the top-up is for


def test_scale_leaves_fixed_layers_alone(resnet20: nn.Module) -> None:
    # a second conv listed only for its Tucker-2 decomposition: scaling prunes the first conv, not the stream
    policy = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.2),
                     "layer1.0.conv2": LayerPolicy(decomposition="tucker", rank_ratio=0.5)})  # fmt: skip
    assert scale_kept(resnet20, policy, 0.3, SHAPE, criterion=None)["layer1.0.conv2"].prune_rate > 0  # unfixed
    p = scale_kept(resnet20, policy, 0.3, SHAPE, criterion=None, fixed=frozenset({"layer1.0.conv2"}))
    assert p["layer1.0.conv2"] == policy["layer1.0.conv2"] and p["layer1.0.conv1"].keep_count(16) == 9
