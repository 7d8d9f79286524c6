"""spaces/: per-layer parameters, coupled groups, include/exclude, monotone rates, Optuna/Ray views."""

from __future__ import annotations

import random

import optuna
import pytest
import torch
import torch.nn.functional as F
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import LayerInfo
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.spaces.config import SpaceConfig
from slimsearch.spaces.space import SearchSpace
from torch import nn

optuna.logging.set_verbosity(optuna.logging.WARNING)

FULL = SpaceConfig(criteria=("l1", "fpgm"), decomposition=("none", "cp", "tucker"))


class ResToy(nn.Module):
    """stem -> residual block (b1, b2; identity shortcut couples stem and b2) -> 1x1 conv -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.b1(x)))
        x = F.relu(x + self.bn2(self.b2(y)))
        x = F.relu(self.pw(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


SHAPE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def smallcnn() -> nn.Module:
    return build_model("smallcnn")


@pytest.fixture(scope="module")
def restoy() -> nn.Module:
    return ResToy()


def names(space: SearchSpace, what: str) -> list[str]:
    return [p.name for p in space.params if p.name.endswith("." + what)]


def random_params(space: SearchSpace, rng: random.Random) -> dict:
    out = {}
    for p in space.params:
        out[p.name] = rng.choice(p.choices) if p.kind == "categorical" else rng.uniform(p.low, p.high)
    return out


def test_param_counts_per_layer_type(smallcnn: nn.Module) -> None:
    plain = SearchSpace.build(smallcnn, SpaceConfig(), (1, 1, 8, 8))
    assert names(plain, "rate") == ["features.0.rate", "features.3.rate", "features.7.rate", "features.10.rate"]
    assert len(plain.params) == 4  # one criterion and no decomposition: nothing else to choose
    full = SearchSpace.build(smallcnn, FULL, (1, 1, 8, 8))
    assert [len(names(full, w)) for w in ("rate", "criterion", "dec", "rank_ratio")] == [4, 4, 4, 4]
    rr = next(p for p in full.params if p.name == "features.3.rank_ratio")
    assert (rr.low, rr.high, rr.condition) == (0.1, 0.9, "features.3.dec")


def test_coupled_group_shares_one_rate_and_no_cp_for_1x1(restoy: nn.Module) -> None:
    space = SearchSpace.build(restoy, FULL, SHAPE)
    assert names(space, "rate") == ["stem.rate", "b1.rate", "pw.rate"]  # stem+b2 are one unit
    stem = next(p for p in space.params if p.name == "stem.rate")
    assert stem.layers == ("stem", "b2")
    assert names(space, "dec") == ["stem.dec", "b1.dec", "b2.dec", "pw.dec"]
    dec = {p.name: p.choices for p in space.params if p.name.endswith(".dec")}
    assert dec["pw.dec"] == ("none", "tucker") and dec["b1.dec"] == ("none", "cp", "tucker")
    params = {p.name: (0.5 if p.kind == "float" else p.choices[0]) for p in space.params}
    params["stem.rate"], params["b1.rate"] = 0.625, 0.25
    pol = space.policy_from_params(params)
    assert pol["stem"].prune_rate == pol["b2"].prune_rate == 0.625
    assert pol["b1"].prune_rate == 0.25


def test_include_exclude(restoy: nn.Module) -> None:
    no_b1 = SearchSpace.build(restoy, SpaceConfig(exclude=("b1",)), SHAPE)
    assert names(no_b1, "rate") == ["stem.rate", "pw.rate"] and "b1" not in no_b1.layer_names
    # Excluding one member of a coupled group keeps the whole group unpruned (pruning it would touch b2).
    no_b2 = SearchSpace.build(restoy, SpaceConfig(exclude=("b2",)), SHAPE)
    assert names(no_b2, "rate") == ["b1.rate", "pw.rate"]
    assert "coupled with excluded layer 'b2'" in no_b2.skipped["stem"]
    only_b = SearchSpace.build(restoy, SpaceConfig(include=("b*",), exclude=("b2",)), SHAPE)
    assert names(only_b, "rate") == ["b1.rate"]
    with pytest.raises(SlimError, match=r"exclude: pattern 'conv9\*' matches no conv layer"):
        SearchSpace.build(restoy, SpaceConfig(exclude=("conv9*",)), SHAPE)
    with pytest.raises(SlimError, match="nothing to search"):
        SearchSpace.build(restoy, SpaceConfig(include=("b2",)), SHAPE)  # b2 alone cannot be pruned


def test_coupled_false_keeps_groups_whole(restoy: nn.Module) -> None:
    space = SearchSpace.build(restoy, SpaceConfig(coupled=False, decomposition=("none", "tucker")), SHAPE)
    assert names(space, "rate") == ["b1.rate", "pw.rate"]
    assert "stem.dec" in names(space, "dec")  # still decomposable
    assert "[space] coupled = false" in space.skipped["b2"]
    resnet = SearchSpace.build(build_model("resnet20"), SpaceConfig(), (1, 3, 32, 32))
    inner = SearchSpace.build(build_model("resnet20"), SpaceConfig(coupled=False), (1, 3, 32, 32))
    assert (len(resnet.units), len(inner.units)) == (12, 9)  # + one residual stream per stage
    with pytest.raises(SlimError, match=r"\[space\] coupled: expected true or false"):
        SpaceConfig.from_dict({"coupled": "no"})


def test_coupled_rate_narrows_the_groups_range(restoy: nn.Module) -> None:
    space = SearchSpace.build(
        restoy, SpaceConfig.from_dict({"prune_rate": [0.0, 0.8], "coupled_rate": [0.0, 0.25]}), SHAPE
    )
    rates = {p.name: (p.low, p.high) for p in space.params if p.name.endswith(".rate")}
    assert rates == {"stem.rate": (0.0, 0.25), "b1.rate": (0.0, 0.8), "pw.rate": (0.0, 0.8)}
    pol = space.uniform_policy(0.5)
    assert (pol["stem"].prune_rate, pol["b2"].prune_rate, pol["b1"].prune_rate) == (0.25, 0.25, 0.5)
    assert space.params_from_policy(pol)["stem.rate"] == 0.25
    with pytest.raises(SlimError, match=r"coupled_rate: need 0 <= low <= high < 1"):
        SpaceConfig.from_dict({"coupled_rate": [0.5, 0.2]})
    assert SpaceConfig.from_dict({"coupled_rate": [0, 0.3]}).to_dict()["coupled_rate"] == [0.0, 0.3]


def test_monotone_rates_non_decreasing(smallcnn: nn.Module) -> None:
    space = SearchSpace.build(smallcnn, SpaceConfig(monotone=True, prune_rate=(0.0, 0.9)), (1, 1, 8, 8))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    rates_seen = []
    for _ in range(30):
        trial = study.ask()
        pol = space.suggest(trial)
        rates = [pol[n].prune_rate for n in space.layer_names]
        rates_seen.append(rates)
        assert rates == sorted(rates)
        raw = [trial.params[f"{n}.rate"] for n in space.layer_names]
        assert rates == [max(raw[: i + 1]) for i in range(len(raw))]  # the running max of the raw samples
        study.tell(trial, 0.0)
    assert any(len(set(r)) > 1 for r in rates_seen)  # not degenerate: rates do differ


def test_suggest_asks_rank_ratio_only_when_decomposing(restoy: nn.Module) -> None:
    space = SearchSpace.build(restoy, FULL, SHAPE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        pol = space.suggest(trial)
        for n in space.layer_names:
            dec = trial.params[f"{n}.dec"]
            seen.add(dec)
            assert (f"{n}.rank_ratio" in trial.params) == (dec != "none")
            assert pol[n].decomposition == dec
            assert pol[n].rank_ratio == trial.params.get(f"{n}.rank_ratio")
        study.tell(trial, 0.0)
    assert seen == {"none", "cp", "tucker"}
    pol.validate(restoy)


@pytest.mark.parametrize(
    "cfg",
    [FULL, SpaceConfig(criteria=("l1", "l2", "hpc"), monotone=True, rate_step=0.05, decomposition=("none", "tucker"))],
)
def test_params_round_trip(restoy: nn.Module, cfg: SpaceConfig) -> None:
    space = SearchSpace.build(restoy, cfg, SHAPE)
    rng = random.Random(0)
    for _ in range(50):
        p = space.policy_from_params(random_params(space, rng))
        back = space.params_from_policy(p)
        assert space.policy_from_params(back) == p
        full = space.params_from_policy(p, complete=True)
        assert set(full) == {q.name for q in space.params}
        assert space.policy_from_params(full) == p
    if cfg.rate_step:
        assert all(abs(p[n].prune_rate / 0.05 - round(p[n].prune_rate / 0.05)) < 1e-9 for n in p)


def test_params_from_policy_outside_space(restoy: nn.Module) -> None:
    space = SearchSpace.build(restoy, SpaceConfig(monotone=True), SHAPE)
    lp = LayerPolicy
    bad = Policy({"stem": lp(0.5), "b2": lp(0.5), "b1": lp(0.9), "pw": lp(0.2)})
    with pytest.raises(SlimError, match=r"b1.rate=0.9 is not in the range \[0.0, 0.8\]"):
        space.params_from_policy(bad)
    assert space.params_from_policy(bad, strict=False) == {"stem.rate": 0.5, "b1.rate": 0.8, "pw.rate": 0.8}
    split = Policy({"stem": lp(0.5), "b2": lp(0.25)})
    with pytest.raises(SlimError, match="coupled layers of 'stem' have different rates"):
        space.params_from_policy(split)
    clusters = Policy({"b1": lp(0.0, "hpc", clusters=2)})
    got = space.params_from_policy(clusters, strict=False)
    assert got["b1.rate"] == 0.75  # keep 2 of 8 filters


def test_uniform_policy(restoy: nn.Module) -> None:
    space = SearchSpace.build(restoy, FULL, SHAPE)
    pol = space.uniform_policy(0.5, "fpgm")
    assert {n: (pol[n].prune_rate, pol[n].criterion, pol[n].decomposition) for n in pol} == {
        n: (0.5, "fpgm", "none") for n in ("stem", "b1", "b2", "pw")
    }
    assert space.policy_from_params(space.params_from_policy(pol)) == pol
    with pytest.raises(SlimError, match="rate must be in"):
        space.uniform_policy(1.0)


def test_ray_param_space(restoy: nn.Module) -> None:
    from ray.tune.search.sample import Categorical, Float

    space = SearchSpace.build(restoy, SpaceConfig(criteria=("l1", "fpgm"), decomposition=("none", "tucker"),
                                                  rate_step=0.1), SHAPE)  # fmt: skip
    rs = space.ray_param_space()
    assert set(rs) == {p.name for p in space.params}
    assert isinstance(rs["stem.rate"], Float) and isinstance(rs["stem.criterion"], Categorical)
    assert isinstance(rs["pw.rank_ratio"], Float)  # conditional params are always present
    assert rs["pw.dec"].categories == ["none", "tucker"]
    point = {k: v.sample() for k, v in rs.items()}
    pol = space.policy_from_params(point)
    assert all(pol[n].rank_ratio is None for n in pol if pol[n].decomposition == "none")


def test_interleaved_group_monotone_from_layers() -> None:
    """Without a model: units ordered by their first layer; a group's rate applies to all members."""

    def info(name: str, group: str | None = None, kernel: tuple[int, int] = (3, 3)) -> LayerInfo:
        return LayerInfo(name, 8, 8, kernel, 1, True, True, group, None)

    layers = [info("a", "a"), info("b"), info("c", "a"), info("d")]
    space = SearchSpace.from_layers(layers, SpaceConfig(monotone=True))
    assert names(space, "rate") == ["a.rate", "b.rate", "d.rate"]
    pol = space.policy_from_params({"a.rate": 0.6, "b.rate": 0.2, "d.rate": 0.7})
    assert [pol[n].prune_rate for n in "abcd"] == [0.6, 0.6, 0.6, 0.7]


def test_space_config_from_dict() -> None:
    cfg = SpaceConfig.from_dict({"prune_rate": [0, 0.5], "criteria": "fpgm", "exclude": ["conv1"], "monotone": True})
    assert cfg == SpaceConfig(prune_rate=(0.0, 0.5), criteria=("fpgm",), exclude=("conv1",), monotone=True)
    assert SpaceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SlimError, match=r"\[space\]: unknown key 'rates' \(did you mean .*\?\); allowed: prune_rate"):
        SpaceConfig.from_dict({"rates": [0, 1]})
    with pytest.raises(SlimError, match=r"\[space\] criteria: unknown value 'l3'; allowed: l1, l2, fpgm"):
        SpaceConfig.from_dict({"criteria": ["l1", "l3"]})
    with pytest.raises(SlimError, match=r"prune_rate: need 0 <= low <= high < 1, got \[0.2, 1.0\]"):
        SpaceConfig.from_dict({"prune_rate": [0.2, 1.0]})
    with pytest.raises(SlimError, match="decomposition: unknown value 'svd'"):
        SpaceConfig.from_dict({"decomposition": ["svd"]})
