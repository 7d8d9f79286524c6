"""Pure logic of benchmarks/bench_compare.py: budget bisection, Torch-Pruning with our unprunable layers ignored,
projection of a method's policy onto a MACs budget. Random-weight ResNet-20, no data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.bench_compare import (
    bisect_budget,
    policy_macs,
    project_policy,
    prunable_leaders,
    tp_prune,
    uniform_policy,
)
from core.cost import count_cost
from core.errors import SlimError
from core.graph import model_graph
from core.models import build_model
from core.policy import LayerPolicy, Policy

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def test_bisect_finds_smallest_setting_within_budget() -> None:
    def macs(x: float) -> float:  # a non-increasing step function, steps of 1/16
        return 1000.0 * (1 - int(x * 16) / 16)

    x, m = bisect_budget(macs, 600.0, hi=0.95, iters=14)
    assert m <= 600.0 and m == macs(x)
    assert macs(x - 1e-3) > 600.0  # just below the returned setting the budget is broken
    assert abs(x - 7 / 16) < 1e-3  # 1 - 7/16 = 0.5625 is the first step under 0.6
    with pytest.raises(SlimError, match="out of reach"):
        bisect_budget(macs, 10.0, hi=0.5)


def _check_tp(model: nn.Module, pruned: nn.Module, all_prunable_shrink: bool) -> None:
    """Convs core.graph cannot prune keep their channels; prunable ones shrink; the model still runs."""
    graph = model_graph(model, SHAPE)
    convs = dict(pruned.named_modules())
    shrunk = 0
    for name, info in graph.layers.items():
        out_c = convs[name].out_channels
        if not info.prunable:
            assert out_c == info.out_channels, name  # residual-stream convs untouched
        else:
            shrunk += out_c < info.out_channels
    n = len(prunable_leaders(model, SHAPE))
    assert shrunk == n if all_prunable_shrink else 0 < shrunk <= n
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert convs["linear"].out_features == 10


def test_tp_uniform_l1_bisection_meets_budget_on_prunable_layers_only(resnet20: nn.Module) -> None:
    base = count_cost(resnet20, SHAPE).macs
    budget = 0.5 * base
    r, macs = bisect_budget(lambda x: count_cost(tp_prune(resnet20, "tp_l1", x), SHAPE).macs, budget, iters=3)
    pruned = tp_prune(resnet20, "tp_l1", r)
    assert count_cost(pruned, SHAPE).macs == macs <= budget
    assert macs > 0.4 * base  # close to the budget, not far below it
    _check_tp(resnet20, pruned, all_prunable_shrink=True)


def test_tp_global_ignores_unprunable_layers(resnet20: nn.Module) -> None:
    pruned = tp_prune(resnet20, "tp_global", 0.5)
    assert count_cost(pruned, SHAPE).macs < count_cost(resnet20, SHAPE).macs
    _check_tp(resnet20, pruned, all_prunable_shrink=False)


def test_projection_keeps_allocation_masks_and_meets_budget(resnet20: nn.Module) -> None:
    names = prunable_leaders(resnet20, SHAPE)
    first, second = names[0], names[1]
    mask = tuple(range(0, 16, 2))  # GA-style explicit kept filters
    policy = Policy({first: LayerPolicy(prune_rate=0.5, criterion="mask", keep=mask),
                     second: LayerPolicy(prune_rate=0.5, criterion="hpc", clusters=8)})  # fmt: skip
    assert project_policy(resnet20, policy, 0.0) == policy
    p = project_policy(resnet20, policy, 0.5)
    assert set(p[first].keep) <= set(mask) and len(p[first].keep) == 4 and p[first].criterion == "mask"
    assert p[second].clusters == 4 and p[second].criterion == "hpc"
    assert p[names[2]].keep_count(16) == 8 and p[names[2]].criterion == "l1"  # untouched layers pruned too
    empty = project_policy(resnet20, Policy(), 0.25, criterion="hpc")  # e.g. ABSHPC that pruned nothing
    assert set(empty.layers) == set(names) and {lp.criterion for lp in empty.layers.values()} == {"hpc"}
    assert all(lp.keep_count(16) == 12 for n, lp in empty.layers.items() if n.startswith("layer1"))
    # hpc clustering is slow to apply: the budget part uses the mask layer and l1 elsewhere
    cheap = Policy({first: policy[first]})
    base = count_cost(resnet20, SHAPE).macs
    budget = 0.4 * base
    t, macs = bisect_budget(lambda x: policy_macs(resnet20, project_policy(resnet20, cheap, x)), budget, hi=0.98,
                            iters=6)  # fmt: skip
    assert macs <= budget and macs > 0.3 * base
    macs_by_t = [policy_macs(resnet20, project_policy(resnet20, cheap, x)) for x in (0.1, 0.3, 0.6)]
    assert macs_by_t == sorted(macs_by_t, reverse=True)


def test_uniform_policy_covers_prunable_leaders_only(resnet20: nn.Module) -> None:
    p = uniform_policy(resnet20, 0.3333333333, "fpgm")
    assert list(p.layers) == sorted(prunable_leaders(resnet20, SHAPE))
    assert all(lp.criterion == "fpgm" and lp.prune_rate == 0.333333 for lp in p.layers.values())
