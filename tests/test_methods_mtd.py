"""MTD switching rule (search/methods/mtd.py): switch point, skipped layers, params ratio."""

from __future__ import annotations

import json

import pytest
import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from slimsearch.core.policy import Policy
from slimsearch.search.methods import mtd_search
from torch import nn


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Multi-threaded OpenBLAS spin-waits on a busy 2-core box: tensorly's small SVDs get ~50x slower."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        yield


def vgg_like() -> tuple[nn.Module, list[str]]:
    """Six 3x3 convs, first reads RGB; plus a head, so whole-model params include non-conv parts."""
    chans = [3, 16, 16, 24, 24, 32, 32]
    layers: list[nn.Module] = []
    for a, b in zip(chans, chans[1:], strict=False):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return model, names


def cp_breaks_at(j_name: str, names: list[str], a0: float = 0.9):
    """Loss 2 pt as soon as layer ``j_name`` (or any later layer) is CP-decomposed, 0 otherwise."""
    later = set(names[names.index(j_name) :])

    def acc(policy: Policy) -> float:
        hit = any(n in later and lp.decomposition == "cp" for n, lp in policy.layers.items())
        return a0 - 0.02 if hit else a0

    return acc


@pytest.mark.parametrize("j", [1, 2, 3, 5])
def test_switch_happens_exactly_at_the_failing_layer(j: int) -> None:
    model, names = vgg_like()
    calls: list[Policy] = []
    acc = cp_breaks_at(names[j], names)

    def counted(p: Policy) -> float:
        calls.append(p)
        return acc(p)

    res = mtd_search(model, names, counted, tol=0.01, cp_rank=0.5, tucker_ranks=0.5)
    dec = {n: res.policy.get(n).decomposition for n in names}
    assert dec[names[0]] == "none"  # C=3 first layer skipped
    assert res.report["layers"][names[0]]["skipped"].startswith("first layer reads the image")
    assert all(dec[n] == "cp" for n in names[1:j])
    assert all(dec[n] == "tucker" for n in names[j:])
    assert res.report["switched_at"] == names[j]
    # a0, one CP probe per layer up to and including j, one final evaluation
    assert res.report["evaluator_calls"] == len(calls) == 1 + j + 1
    assert res.report["final_acc"] == 0.9 and res.report["n_cp"] == j - 1
    json.dumps(res.to_dict())


def test_no_switch_when_cp_always_passes_and_skip_first_off() -> None:
    model, names = vgg_like()
    res = mtd_search(model, names[1:], lambda p: 0.9, cp_rank=4, final_eval=False)
    assert res.report["switched_at"] is None
    assert all(res.policy[n].decomposition == "cp" and res.policy[n].rank == 4 for n in names[1:])
    res = mtd_search(model, names, lambda p: 0.5 if p.layers else 0.9, skip_rgb_first=False, tucker_ranks=(2, 3))
    assert res.report["switched_at"] == names[0]
    assert res.policy[names[0]].rank == (2, 3)
    assert all(res.policy[n].decomposition == "tucker" for n in names)


def test_params_ratio_is_whole_model_and_exact() -> None:
    model, names = vgg_like()
    res = mtd_search(model, names, cp_breaks_at(names[3], names), cp_rank=0.25, tucker_ranks=0.25)
    total = sum(p.numel() for p in model.parameters())
    expected = total
    convs = dict(model.named_modules())
    for n in names[1:]:
        conv = convs[n]
        t, s, k, _ = conv.weight.shape
        lp = res.policy[n]
        if lp.decomposition == "cp":
            new = lp.rank * (s + k + k + t)
        else:
            r_in, r_out = lp.rank
            new = s * r_in + r_in * r_out * k * k + r_out * t
        expected += new - conv.weight.numel()
    assert res.report["params"] == expected
    assert res.report["params_ratio"] == pytest.approx(total / expected)
    assert res.report["params_ratio"] > 1


def test_params_ratio_matches_applied_smallcnn() -> None:
    pytest.importorskip("slimsearch.core.apply")
    from slimsearch.core.apply import apply_policy
    from slimsearch.core.cost import count_cost

    torch.manual_seed(0)
    model = build_model("smallcnn").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    res = mtd_search(model, names, cp_breaks_at(names[2], names), cp_rank=4, tucker_ranks=0.3,
                     input_shape=(1, 1, 8, 8))  # fmt: skip
    assert [res.policy.get(n).decomposition for n in names] == ["none", "cp", "tucker", "tucker"]
    small = apply_policy(model, res.policy, input_shape=(1, 1, 8, 8))
    measured = count_cost(small, (1, 1, 8, 8)).params
    assert res.report["params"] == measured == res.report["cost"]["params"]
    assert res.report["params_ratio"] == pytest.approx(count_cost(model, (1, 1, 8, 8)).params / measured)
    assert res.report["params_ratio"] > 1
    assert res.report["cost"]["macs_ratio"] < 1


def test_evbmf_default_ranks_validate() -> None:
    torch.manual_seed(0)
    model, names = vgg_like()
    res = mtd_search(model, names, cp_breaks_at(names[4], names))
    res.policy.validate(model)
    for n in names[1:]:
        assert res.policy[n].rank is not None


def test_bad_arguments() -> None:
    model, names = vgg_like()
    with pytest.raises(SlimError, match="tol"):
        mtd_search(model, names, lambda p: 1.0, tol=-0.1)
    with pytest.raises(SlimError, match="rank spec"):
        mtd_search(model, names, lambda p: 1.0, cp_rank="big")  # type: ignore[arg-type]
