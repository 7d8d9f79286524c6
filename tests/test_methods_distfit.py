"""Distribution fitting (search/methods/distfit.py): policies, Wasserstein report, scan-driven rates, seeds."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import shared_path
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model, load_checkpoint
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.methods import METHOD_SEEDS, distfit_policy, distfit_search, seed_policies, wasserstein_report
from torch import nn

# block-inner convs (conv1 of a block: its filters feed only conv2) across the three stages
INNER = ["layer1.0.conv1", "layer1.4.conv1", "layer2.2.conv1", "layer2.7.conv1", "layer3.3.conv1", "layer3.8.conv1"]


@pytest.fixture(scope="module")
def resnet56() -> nn.Module:
    model = build_model("resnet56")
    load_checkpoint(model, shared_path("models", "resnet56-4bfd9763.th"))
    return model.eval()


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_distfit_fits_norm_distribution_better_than_l1_on_resnet56(resnet56: nn.Module, rate: float) -> None:
    policy = distfit_policy(resnet56, INNER, rate)
    rep = wasserstein_report(resnet56, policy, compare=("l1", "l2"))
    assert set(rep) == set(INNER)
    for name in INNER:
        row = rep[name]
        n = row["filters"]
        assert row["keep"] == n - int(rate * n + 1e-9)
        assert row["distfit"] < row["l1"], (name, row)
        assert row["distfit"] < row["l2"], (name, row)


def test_distfit_beats_l1_on_all_block_inner_layers_at_half(resnet56: nn.Module) -> None:
    inner = [n for n, _ in resnet56.named_modules() if n.startswith("layer") and n.endswith("conv1")]
    assert len(inner) == 27
    rep = wasserstein_report(resnet56, distfit_policy(resnet56, inner, 0.5), compare=("l1",))
    wins = [n for n in inner if rep[n]["distfit"] < rep[n]["l1"]]
    assert wins == inner


def test_policy_rates_and_validation() -> None:
    model = build_model("resnet20")
    names = ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    p = distfit_policy(model, names, {"layer1.0.conv1": 0.0, "layer2.0.conv1": 0.5, "layer3.0.conv1": 1 / 3})
    assert "layer1.0.conv1" not in p.layers  # rate 0 -> untouched
    assert p["layer2.0.conv1"].keep_count(32) == 16 and p["layer3.0.conv1"].keep_count(64) == 43
    assert Policy.from_json(p.to_json())["layer3.0.conv1"].keep_count(64) == 43
    assert all(lp.criterion == "distfit" for lp in p.layers.values())
    p.validate(model)
    with pytest.raises(SlimError, match="no rate given"):
        distfit_policy(model, names, {"layer1.0.conv1": 0.1})
    with pytest.raises(SlimError, match=r"must be in \[0, 1\)"):
        distfit_policy(model, names, 1.0)


def test_search_from_scan_and_report_is_json() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    names = ["layer1.0.conv1", "layer2.0.conv1"]
    calls = []

    def acc(policy: Policy) -> float:  # layer1 tolerates up to 40%, layer2 up to 70% (1 pt budget each)
        calls.append(policy.hash)
        tol = {"layer1.0.conv1": 0.4, "layer2.0.conv1": 0.7}
        return 0.9 - sum(0.05 * (lp.prune_rate > tol[n]) for n, lp in policy.layers.items())

    res = distfit_search(model, names, acc=acc, tol=0.01)
    assert res.report["rates"] == {"layer1.0.conv1": 0.4, "layer2.0.conv1": 0.7}
    assert res.report["evaluator_calls"] == len(calls) == 1 + 2 * 9 + 1
    assert res.report["final_acc"] == 0.9
    assert set(res.report["wasserstein"]) == set(names)
    json.dumps(res.to_dict())
    with pytest.raises(SlimError, match="either rates or an accuracy"):
        distfit_search(model, names)


def test_seed_adapters() -> None:
    model = build_model("resnet20")
    names = ["layer1.0.conv1", "layer2.0.conv1"]
    pols = seed_policies("distfit", model=model, layers=names, rates=[0.25, 0.5])
    assert [p["layer2.0.conv1"].keep_count(32) for p in pols] == [24, 16]
    assert set(METHOD_SEEDS) == {"abshpc", "mtd", "ga", "distfit"}
    [p] = METHOD_SEEDS["abshpc"](model=model, layers=names, acc=lambda p: 0.9, criterion="l1")
    # everything passes: the last layer ends one filter below its bound 31/32, the first at that rate 15/16
    assert p["layer2.0.conv1"].keep_count(32) == 2 and p["layer1.0.conv1"].keep_count(16) == 2
    assert p["layer1.0.conv1"].criterion == "l1"
    with pytest.raises(SlimError, match="unknown method"):
        seed_policies("nope", model=model, layers=names)
    with pytest.raises(SlimError, match="needs input images"):
        seed_policies("ga", model=model, layers=names, acc=lambda p: 0.9)


def test_study_registry_params_check() -> None:
    from slimsearch.search.seed_params import SEED_PARAM_CHECKS, allowed_params

    assert "epsilon" in allowed_params("abshpc") and "model" not in allowed_params("abshpc")
    assert "rates" in allowed_params("distfit") and "generations" in allowed_params("ga")
    SEED_PARAM_CHECKS["mtd"]({"tol": 0.02, "cp_rank": 0.3}, "[seeds]")
    with pytest.raises(SlimError, match="mtd_bogus: unknown option"):
        SEED_PARAM_CHECKS["mtd"]({"bogus": 1}, "[seeds]")
    with pytest.raises(SlimError, match="mtd_tol: expected float"):
        SEED_PARAM_CHECKS["mtd"]({"tol": "x"}, "[seeds]")


def test_the_wasserstein_report_selects_group_filters_through_the_model(resnet56: nn.Module) -> None:
    from slimsearch.core.apply import kept_indices
    from slimsearch.core.criteria import norm_wasserstein

    name = INNER[0]
    policy = Policy({name: LayerPolicy(prune_rate=0.5, criterion="group")})
    row = wasserstein_report(resnet56, policy, compare=("l2",))[name]
    w = dict(resnet56.named_modules())[name].weight.detach()
    assert row["group"] == pytest.approx(norm_wasserstein(w, kept_indices(resnet56, policy)[name]))
    assert row["keep"] == w.shape[0] // 2 and "l2" in row
