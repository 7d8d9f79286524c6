"""MACs/params against published and hand-computed numbers; latency result structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from slimsearch.core.cost import Cost, LatencyResult, count_cost, layer_macs, measure_latency
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from torch import nn


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


def test_latency_of_a_frozen_torchscript_program() -> None:
    frozen = torch.jit.freeze(torch.jit.script(TinyNet().eval()))  # no parameters, no train/eval flags
    res = measure_latency(frozen, (1, 3, 8, 8), batch_size=2, threads=1, repeats=3, warmup=1)
    assert 0 < res.median_ms <= res.p90_ms and res.batch_size == 2


def test_latency_rejects_bad_arguments() -> None:
    with pytest.raises(SlimError, match="repeats"):
        measure_latency(TinyNet(), (1, 3, 8, 8), batch_size=1, repeats=0)


def test_cost_is_frozen() -> None:
    c = Cost(macs=3, params=4)
    with pytest.raises(AttributeError):
        c.macs = 5  # type: ignore[misc]


# --- the fast counter (shape-only convolutions under a TorchFunctionMode) against the reference --------------


def _zoo_variants() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Zoo models as built, pruned (every prunable layer at 0.5) and pruned + decomposed (a CP and a Tucker-2)."""
    from slimsearch.core.apply import apply_policy
    from slimsearch.core.graph import compressible_layers
    from slimsearch.core.policy import LayerPolicy, Policy

    out = []
    for name in ("resnet20", "vgg11", "alexnet", "smallcnn"):
        shape = (1, 1, 8, 8) if name == "smallcnn" else (1, 3, 32, 32)
        model = build_model(name).eval()
        layers = compressible_layers(model, shape)
        pruned = Policy({li.name: LayerPolicy(prune_rate=0.5) for li in layers if li.prunable})
        small = [li.name for li in layers if li.decomposable and li.in_channels > 3 and li.in_channels <= 32][:2]
        mixed = dict(pruned.layers)
        for lname, dec in zip(small, ("tucker", "cp"), strict=False):
            base = mixed.get(lname, LayerPolicy())
            mixed[lname] = LayerPolicy(
                prune_rate=base.prune_rate, decomposition=dec, rank=(4, 4) if dec == "tucker" else 4
            )
        out.append((name, model, shape))
        out.append((f"{name} pruned", apply_policy(model, pruned, input_shape=shape), shape))
        out.append((f"{name} pruned+decomposed", apply_policy(model, Policy(mixed), input_shape=shape), shape))
    return out


def test_fast_count_equals_the_reference_on_the_zoo() -> None:
    from slimsearch.core.cost import _counted_forward, _fast_countable
    from torch.utils.flop_counter import FlopCounterMode

    for label, model, shape in _zoo_variants():
        assert _fast_countable(model), label
        fast = _counted_forward(model, shape, per_layer=True)
        reference = _counted_forward(model, shape, per_layer=True, fast=False)
        assert fast == reference, label
        assert fast[0] > 0 and sum(fast[1].values()) == fast[0], label
        with torch.no_grad(), FlopCounterMode(display=False) as upstream:  # torch's own counter, real forward
            model(torch.zeros(shape))
        assert fast[0] == upstream.get_total_flops() // 2, label


def test_fast_counter_counts_matmuls_outside_modules() -> None:
    from slimsearch.core.cost import _counted_forward_once, _FlopCounter, _ShapeForward

    class Stray(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.w = nn.Parameter(torch.randn(4 * 8 * 8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).flatten(1) @ self.w

    expected = 4 * 8 * 8 * 3 * 9 + 4 * 8 * 8 * 5
    x = torch.zeros(1, 3, 8, 8)
    assert _counted_forward_once(Stray(), x, False, _ShapeForward())[0] == expected  # the matmul via the aten counter
    assert _counted_forward_once(Stray(), x, False, _FlopCounter())[0] == expected
    assert count_cost(Stray(), (1, 3, 8, 8)).macs == expected  # a class from outside the zoo: reference path


def test_flop_free_functions_reach_no_counted_op() -> None:
    from slimsearch.core.cost import _FLOP_FREE
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    mean, var, w, b = torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4)
    calls = {
        F.relu: (x,), F.relu6: (x,), F.batch_norm: (x, mean, var, w, b), F.pad: (x, (1, 1, 1, 1)),
        F.adaptive_avg_pool2d: (x, 1), F.max_pool2d: (x, 2), F.avg_pool2d: (x, 2), F.dropout: (x, 0.5),
        torch.relu: (x,), torch.add: (x, y), torch.flatten: (x, 1), torch.cat: ((x, y),),
        torch.Tensor.add: (x, y), torch.Tensor.__add__: (x, y), torch.Tensor.__getitem__: (x, (slice(None), 0)),
        torch.Tensor.dim: (x,), torch.Tensor.size: (x,), torch.Tensor.flatten: (x, 1), torch.Tensor.view: (x, -1),
        torch.Tensor.reshape: (x, (2, -1)), torch.Tensor.mean: (x, (2, 3)), torch.Tensor.relu: (x,),
    }  # fmt: skip
    assert set(calls) == set(_FLOP_FREE)
    for func, args in calls.items():
        with FlopCounterMode(display=False) as counter:
            func(*args)
        assert counter.get_total_flops() == 0, func


@given(
    n=st.integers(1, 2),
    groups=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    channel_error=st.sampled_from([0, 0, 0, -1, 1]),
    bias=st.sampled_from([None, "ok", "wrong"]),
)
@settings(max_examples=300, deadline=None)
def test_conv_zeros_vouches_only_for_calls_that_succeed_with_that_shape(
    n: int, groups: int, cin_per_group: int, cout_per_group: int, size: tuple, kernel: tuple, stride: tuple,
    padding: tuple, dilation: tuple, channel_error: int, bias: str | None,
) -> None:  # fmt: skip
    from slimsearch.core.cost import conv_zeros

    cin = max(1, groups * cin_per_group + channel_error)
    x = torch.randn(n, cin, *size)
    w = torch.randn(groups * cout_per_group, cin_per_group, *kernel)
    b = None if bias is None else torch.randn(w.shape[0] + (bias == "wrong"))
    with torch.no_grad():
        zeros = conv_zeros(x, w, b, stride, padding, dilation, groups)
        try:
            real = F.conv2d(x, w, b, stride, padding, dilation, groups)
        except RuntimeError:
            real = None
    if zeros is not None:
        assert real is not None and zeros.shape == real.shape and zeros.dtype == real.dtype
        assert not zeros.any()
    elif channel_error == 0 and bias != "wrong" and real is not None:
        pytest.fail("conv_zeros declined a valid plain convolution")


def test_conv_zeros_declines_outside_no_grad_and_unusual_tensors() -> None:
    from slimsearch.core.cost import conv_zeros

    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    assert conv_zeros(x, w, None, (1, 1), (1, 1), (1, 1), 1) is None  # grad mode on
    with torch.no_grad():
        assert conv_zeros(x, w, None, (1, 1), (1, 1), (1, 1), 1).shape == (1, 3, 5, 5)
        assert conv_zeros(x.half(), w.half(), None, (1, 1), (1, 1), (1, 1), 1) is None
        assert conv_zeros(x.transpose(2, 3), w, None, (1, 1), (1, 1), (1, 1), 1) is None  # not contiguous
        assert conv_zeros(x, w, None, (1, 1), "same", (1, 1), 1) is None
        assert conv_zeros(x, w, None, (1, 1), (1, 1), (1, 1), 2) is None  # 2 channels, groups 2, weight wants 4
