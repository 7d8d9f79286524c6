"""MACs/params against published and hand-computed numbers; latency result structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.cost import Cost, LatencyResult, count_cost, layer_macs, measure_latency
from core.errors import SlimError
from core.models import build_model


class TinyNet(nn.Module):
    """conv 3->8 (3x3, pad 1) on 8x8, BN, ReLU, conv 8->16 (3x3, stride 2), global pool, linear 16->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x) + 1.0  # the add is not counted
        return self.fc(x.mean(dim=(2, 3)))


TINY_LAYERS = {
    "conv1": 8 * 8 * 8 * (3 * 9),  # 8 output channels x 8x8 positions x 27 inputs (bias not counted)
    "conv2": 16 * 4 * 4 * (8 * 9),  # stride 2 -> 4x4
    "fc": 16 * 10,
}


def test_resnet56_matches_published_macs_and_params() -> None:
    cost = count_cost(build_model("resnet56"))
    assert cost.macs == pytest.approx(125.49e6, rel=0.005)
    assert cost.params == 853_018  # 0.853 M
    assert cost.flops == 2 * cost.macs


def test_resnet56_layer_macs_sum_to_total() -> None:
    model = build_model("resnet56")
    per_layer = layer_macs(model)
    assert len(per_layer) == 55 + 1  # 55 convs + the classifier
    assert per_layer["conv1"] == 16 * 32 * 32 * 3 * 9
    assert per_layer["layer3.8.conv2"] == 64 * 8 * 8 * 64 * 9
    assert per_layer["linear"] == 64 * 10
    assert sum(per_layer.values()) == count_cost(model).macs


def test_tiny_net_macs_exact() -> None:
    model = TinyNet()
    assert layer_macs(model, (1, 3, 8, 8)) == TINY_LAYERS
    cost = count_cost(model, (1, 3, 8, 8))
    assert cost.macs == sum(TINY_LAYERS.values()) == 32_416
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.as_dict() == {"macs": 32_416, "flops": 64_832, "params": cost.params}


def test_batch_dimension_is_ignored() -> None:
    assert count_cost(TinyNet(), (7, 3, 8, 8)).macs == 32_416


def test_depthwise_and_grouped_convs() -> None:
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    assert count_cost(dw, (1, 16, 8, 8)).macs == 16 * 8 * 8 * 9  # each filter sees one channel
    grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)
    assert count_cost(grouped, (1, 16, 8, 8)).macs == 32 * 8 * 8 * (16 // 4) * 9
    assert count_cost(grouped, (1, 16, 8, 8)).params == 32 * 4 * 9


def test_reused_layer_counted_per_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    assert layer_macs(Twice(), (1, 4, 2, 2)) == {"conv": 2 * 4 * 4 * 4}


def test_modes_restored() -> None:
    model = TinyNet()
    model.train()
    model.bn.eval()  # a mixed state must survive exactly
    count_cost(model, (1, 3, 8, 8))
    layer_macs(model, (1, 3, 8, 8))
    measure_latency(model, (1, 3, 8, 8), batch_size=2, repeats=2, warmup=1)
    assert model.training and model.conv1.training and not model.bn.training
    model.eval()
    count_cost(model, (1, 3, 8, 8))
    assert not any(m.training for m in model.modules())


def test_bn_stats_untouched_by_counting() -> None:
    model = TinyNet().train()
    before = model.bn.running_mean.clone()
    count_cost(model, (1, 3, 8, 8))
    assert torch.equal(model.bn.running_mean, before)
    assert int(model.bn.num_batches_tracked) == 0


def test_latency_structure_and_threads_restored() -> None:
    threads = torch.get_num_threads()
    res = measure_latency(TinyNet(), (1, 3, 8, 8), batch_size=4, threads=1, repeats=5, warmup=1)
    assert isinstance(res, LatencyResult)
    assert res.batch_size == 4 and res.threads == 1
    assert 0 < res.median_ms <= res.p90_ms
    assert torch.get_num_threads() == threads


def test_latency_rejects_bad_arguments() -> None:
    with pytest.raises(SlimError, match="repeats"):
        measure_latency(TinyNet(), (1, 3, 8, 8), batch_size=1, repeats=0)


def test_cost_is_frozen() -> None:
    c = Cost(macs=3, params=4)
    with pytest.raises(AttributeError):
        c.macs = 5  # type: ignore[misc]
