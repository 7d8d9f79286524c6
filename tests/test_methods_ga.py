"""GA channel selection (search/methods/ga.py): the pure GA core, consumers, and the layer-by-layer driver."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from helpers import shared_path
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model, load_checkpoint
from slimsearch.core.policy import Policy
from slimsearch.search.methods import ga_search, ga_select, plain_consumers
from slimsearch.search.methods.ga import _errors, capture_input, channel_gram, ga_mask, reconstruction_error
from torch import nn


def random_mask(c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.zeros(c, dtype=torch.bool)
    m[torch.randperm(c, generator=gen)[:k]] = True
    return m


def test_gram_error_equals_direct_reconstruction_error() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 10, 7, 7, generator=gen)
    conv = nn.Conv2d(10, 5, 3, stride=2, padding=1, bias=True)  # the bias cancels in Y − conv(X ⊙ m)
    gram, count = channel_gram(X, conv, positions=None)
    for _ in range(5):
        m = random_mask(10, 4, gen)
        assert float(_errors(m[None], gram, count)[0]) * count == pytest.approx(
            reconstruction_error(X, conv, m), rel=1e-6
        )


def test_ga_finds_the_only_channels_that_matter() -> None:
    gen = torch.Generator().manual_seed(1)
    c, k = 20, 5
    important = [1, 6, 9, 13, 18]
    X = torch.randn(16, c, 6, 6, generator=gen)
    conv = nn.Conv2d(c, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, important] = torch.randn(8, k, 3, 3, generator=gen)
    res = ga_search(X, conv, k, pop=30, generations=30, seed=0)
    assert res.mask.dtype == torch.bool and int(res.mask.sum()) == k
    assert res.mask.nonzero().flatten().tolist() == important
    assert res.error == pytest.approx(0.0, abs=1e-12)
    assert reconstruction_error(X, conv, res.mask) == pytest.approx(0.0, abs=1e-8)
    assert res.history == sorted(res.history, reverse=True)  # the best (re-scored) error never gets worse
    assert torch.equal(ga_mask(X, conv, k, pop=30, generations=30, seed=0), res.mask)  # deterministic


@pytest.mark.parametrize("k", [1, 7, 15, 16])
def test_mask_has_exactly_k_ones(k: int) -> None:
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(4, 16, 5, 5, generator=gen)
    conv = nn.Conv2d(16, 4, 3, padding=1)
    res = ga_search(X, conv, k, pop=10, generations=5, seed=3)
    assert int(res.mask.sum()) == k and res.mask.shape == (16,)


def test_bad_k_and_grouped_consumer() -> None:
    X = torch.randn(2, 8, 4, 4)
    with pytest.raises(SlimError, match="k must be"):
        ga_search(X, nn.Conv2d(8, 4, 3), 0)
    with pytest.raises(SlimError, match="ungrouped"):
        ga_search(X, nn.Conv2d(8, 8, 3, groups=2), 3)


def test_resnet20_consumers() -> None:
    model = build_model("resnet20")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    cons = plain_consumers(model, convs)
    for n in convs:
        if n.endswith("conv1") and n.startswith("layer"):
            assert cons[n] == n[: -len("conv1")] + "conv2"  # conv1 -> bn1 -> relu -> conv2
        else:
            assert cons[n] is None  # stem and conv2 feed residual adds
    vgg = build_model("vgg11")
    vconvs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    vcons = plain_consumers(vgg, vconvs)
    assert [vcons[n] for n in vconvs[:-1]] == vconvs[1:]  # through BN, ReLU and max-pool
    assert vcons[vconvs[-1]] is None  # feeds the linear head


def test_ga_beats_random_masks_on_pretrained_resnet20_layer() -> None:
    model = build_model("resnet20")
    load_checkpoint(model, shared_path("models", "resnet20-12fca82f.th"))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=gen)  # real-ish: unit-variance, the checkpoint's normalised scale
    X = capture_input(model, "layer2.0.conv2", x)  # after bn1 + relu of layer2.0.conv1
    assert X.shape == (32, 32, 16, 16) and float(X.min()) >= 0
    conv = model.layer2[0].conv2
    k = 16
    res = ga_search(X, conv, k, pop=30, generations=25, seed=0)
    assert int(res.mask.sum()) == k
    err = reconstruction_error(X, conv, res.mask)
    rand = [reconstruction_error(X, conv, random_mask(32, k, gen)) for _ in range(20)]
    assert err < statistics.mean(rand)
    assert err < min(rand)  # in practice ~2x below the best of 20 random masks


def small_sequential() -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = build_model("smallcnn").eval()
    return model, [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_ga_select_with_scan_orders_by_sensitivity_and_outputs_masks() -> None:
    pytest.importorskip("slimsearch.core.apply")
    model, names = small_sequential()
    sens = {names[0]: 0.2, names[1]: 0.01, names[2]: 0.03, names[3]: 0.005}  # acc drop per unit rate

    def acc(policy: Policy) -> float:
        return 0.95 - sum(sens[n] * lp.prune_rate for n, lp in policy.layers.items())

    seen: list[str] = []

    def finetune(m: nn.Module, p: Policy) -> nn.Module:
        seen.append(",".join(sorted(p.layers)))
        return m

    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = ga_select(model, names, acc, x, tol=0.01, pop=12, generations=5, finetune=finetune)
    assert res.report["order"] == [names[3], names[1], names[2], names[0]]
    # rates from the scan: largest scanned rate with drop ≤ 1 pt
    assert [res.report["layers"][n]["rate"] for n in names] == [0.0, 0.9, 0.3, 0.9]
    p = res.policy
    assert names[0] not in p.layers
    for n, keep in ((names[1], 3), (names[2], 45)):
        assert p[n].criterion == "mask" and len(p[n].keep) == keep
    # last conv feeds the linear head: fallback criterion at the scanned rate
    assert p[names[3]].criterion == "l1" and p[names[3]].keep_count(64) == 6
    assert res.report["layers"][names[3]]["action"] == "fallback:l1"
    assert len(seen) == 3
    p.validate(model)
    # 1 (a0) + 4 layers x 9 rates + 1 final
    assert res.report["evaluator_calls"] == 1 + 4 * 9 + 1
    json.dumps(res.to_dict())


def test_ga_select_given_rates_applies() -> None:
    pytest.importorskip("slimsearch.core.apply")
    from slimsearch.core.apply import apply_policy

    model, names = small_sequential()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rates = dict.fromkeys(names, 0.5)
    res = ga_select(model, names, lambda p: 0.9, x, rates=rates, pop=10, generations=3, fallback=None,
                    input_shape=(1, 1, 8, 8))  # fmt: skip
    assert set(res.policy.layers) == set(names[:3])  # last layer skipped without fallback
    assert res.report["evaluator_calls"] == 2
    small = apply_policy(model, res.policy, input_shape=(1, 1, 8, 8))
    assert small(x[:2]).shape == (2, 10)
    assert res.report["cost"]["macs_ratio"] < 1
