"""core/macs.py: a policy's MACs from the architecture's table equal the count on its structure."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from slimsearch.core.apply import apply_policy, structure_only
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.macs import macs_table, policy_macs
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn


class _Mixed(nn.Module):
    """An added pair with a depthwise follower (one coupled group), a concat, a strided conv, a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.d = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
        self.e = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.dw(F.relu(self.a(x) + self.b(x))))
        z = torch.cat([F.relu(self.c(y)), F.relu(self.d(x))], 1)
        return self.fc(F.max_pool2d(F.relu(self.e(z)), 2).flatten(1))


def _random_policy(model: nn.Module, shape: tuple[int, ...], rng: random.Random) -> Policy:
    """Random pruning (rates, GA-style keep masks, cluster counts) and decompositions with explicit or ratio
    ranks on the graph's prunable leaders and decomposable convs."""
    g = model_graph(model, shape)
    layers: dict[str, LayerPolicy] = {}
    for name, info in g.layers.items():
        lp = LayerPolicy()
        if info.prunable and info.group in (None, name) and rng.random() < 0.8:
            n = info.out_channels
            kind = rng.choice(("rate", "keep", "clusters"))
            if kind == "rate":
                lp = LayerPolicy(prune_rate=rng.choice((0.1, 0.25, 0.5, 0.7)), criterion="l1")
            elif kind == "keep":
                keep = tuple(sorted(rng.sample(range(n), rng.randint(1, n))))
                lp = LayerPolicy(prune_rate=1 - len(keep) / n, criterion="l1", keep=keep)
            else:
                k = rng.randint(1, n)
                lp = LayerPolicy(prune_rate=1 - k / n, criterion="hpc", clusters=k)
        if info.decomposable and min(info.kernel) > 1 and rng.random() < 0.4:
            dec = rng.choice(("cp", "tucker"))
            if rng.random() < 0.5:
                lp = LayerPolicy(**{**lp.to_dict(), "decomposition": dec, "rank_ratio": rng.choice((0.25, 0.5, 1.0))})
            else:
                rank = 1 if dec == "cp" else (1, 1)
                lp = LayerPolicy(**{**lp.to_dict(), "decomposition": dec, "rank": rank})
        if lp != LayerPolicy():
            layers[name] = lp
    return Policy(layers)


def _structure_macs(model: nn.Module, policy: Policy, shape: tuple[int, ...]) -> int:
    return count_cost(structure_only(model, policy, input_shape=shape), shape).macs


@pytest.mark.parametrize(
    ("make", "shape", "n"),
    [
        (lambda: build_model("resnet20"), (1, 3, 32, 32), 12),
        (lambda: build_model("resnet56"), (1, 3, 32, 32), 4),
        pytest.param(lambda: build_model("vgg16"), (1, 3, 32, 32), 2, marks=pytest.mark.slow),
        (lambda: build_model("alexnet"), (1, 3, 32, 32), 6),
        (lambda: build_model("smallcnn"), (1, 1, 8, 8), 6),
        (_Mixed, (1, 3, 8, 8), 12),
    ],
)
def test_table_equals_the_structure_count(make, shape, n) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = make().eval()
    table = macs_table(model, shape)
    assert table.exact
    assert table.macs(model, Policy()) == count_cost(model, shape).macs
    rng = random.Random(0)
    for _ in range(n):
        policy = _random_policy(model, shape, rng)
        got = table.macs(model, policy)
        assert got is not None and got == _structure_macs(model, policy, shape), policy.to_dict()


def test_mixed_graph_counts_the_coupled_depthwise_and_concat_channels() -> None:
    model = _Mixed().eval()
    shape = (1, 3, 8, 8)
    # b prunes its group (a, b, dw) to 3 of 8; d keeps 2 of 4, so e reads 6 + 2 channels
    policy = Policy({"b": LayerPolicy(prune_rate=5 / 8), "d": LayerPolicy(prune_rate=0.5)})
    pruned = apply_policy(model, policy, input_shape=shape)
    assert (pruned.dw.out_channels, pruned.c.in_channels, pruned.e.in_channels) == (3, 3, 8)
    assert policy_macs(model, policy, shape) == count_cost(pruned, shape).macs


def test_evbmf_ranks_fall_back_to_the_structure_count() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    shape = (1, 3, 32, 32)
    policy = Policy({"layer2.0.conv1": LayerPolicy(prune_rate=0.5, decomposition="tucker")})  # EVBMF ranks
    assert macs_table(model, shape).macs(model, policy) is None
    assert policy_macs(model, policy, shape) == count_cost(apply_policy(model, policy, input_shape=shape), shape).macs


def test_batch_size_of_the_shape_does_not_matter() -> None:
    model = build_model("alexnet").eval()
    policy = Policy({"features.0": LayerPolicy(prune_rate=0.5)})
    assert policy_macs(model, policy, (4, 3, 32, 32)) == policy_macs(model, policy, (1, 3, 32, 32))


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (
            Policy({"layer1.0.conv2": LayerPolicy(prune_rate=0.5), "conv1": LayerPolicy(prune_rate=0.25)}),
            "'conv1' and 'layer1.0.conv2' are coupled",
        ),
        (Policy({"nope": LayerPolicy(prune_rate=0.5)}), "nope"),
        (Policy({"conv1": LayerPolicy(decomposition="cp", rank=10_000)}), "CP rank 10000"),
    ],
)
def test_bad_policies_are_refused_as_apply_policy_refuses_them(policy: Policy, match: str) -> None:
    model = build_model("resnet20").eval()
    with pytest.raises(SlimError, match=match):
        policy_macs(model, policy, (1, 3, 32, 32))
    with pytest.raises(SlimError, match=match):
        apply_policy(model, policy, input_shape=(1, 3, 32, 32))
