"""slimsearch.core.prune: physical surgery equals masking, MACs/params fall as computed by hand, plans are checked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import Coupled, PadNet, randomize_bn
from slimsearch.core.apply import masked_model
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.models import OptionAShortcut, build_model
from slimsearch.core.prune import prune_layers, resolve_plan
from torch import nn


def random_plan(model: nn.Module, names: list[str], seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    plan = {}
    for name in names:
        n = mods[name].out_channels
        k = int(torch.randint(1, n, (1,), generator=g))
        plan[name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return plan


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "alexnet"])
def test_pruned_model_equals_masked_original(name: str) -> None:
    model = randomize_bn(build_model(name))
    graph = model_graph(model)
    # one plan entry per group (ResNet: the residual stream of each stage, through the option-A shortcuts)
    prunable = [n for n, li in graph.layers.items() if li.prunable and li.group in (None, n)]
    plan = random_plan(model, prunable, seed=1)
    pruned = prune_layers(masked := masked_model(model, {}), plan)  # prune a copy (masked_model({}) = deepcopy)
    assert pruned is masked
    reference = masked_model(model, plan)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref, orig = pruned(x), reference(x), model(x)
    assert out.shape == (3, 10)
    # pruning changed the function (so the equality below means something); fp32 outputs are O(0.01..10)
    assert (out - orig).abs().max() > 0.05 * orig.abs().max()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    mods = dict(pruned.named_modules())
    for conv_name, kept in plan.items():
        for member in graph.groups.get(conv_name, [conv_name]):
            assert mods[member].out_channels == len(kept)
            assert mods[member].weight.shape[0] == len(kept)


def _three_conv(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.parametrize("bias", [False, True])
def test_macs_and_params_fall_as_computed_by_hand(bias: bool) -> None:
    model = _three_conv(bias).eval()
    hw, b = 8 * 8, int(bias)
    before = count_cost(model, (1, 3, 8, 8))
    assert before.macs == (8 * 3 * 9 + 16 * 8 * 9 + 16 * 16 * 9) * hw + 16 * 10
    assert before.params == (8 * 27 + b * 8 + 16) + (16 * 72 + b * 16 + 32) + (16 * 144 + b * 16 + 32) + 170
    prune_layers(model, {"0": [0, 1, 2, 4, 5, 7]}, example_input=(1, 3, 8, 8))  # remove filters 3 and 6 of 8
    after = count_cost(model, (1, 3, 8, 8))
    assert after.macs == (6 * 3 * 9 + 16 * 6 * 9 + 16 * 16 * 9) * hw + 16 * 10
    assert after.params == (6 * 27 + b * 6 + 12) + (16 * 54 + b * 16 + 32) + (16 * 144 + b * 16 + 32) + 170
    assert before.macs - after.macs == 2 * 3 * 9 * hw + 16 * 2 * 9 * hw
    assert model[1].num_features == 6 and model[1].running_mean.shape == (6,) and model[3].in_channels == 6


def test_kept_filters_and_channels_are_the_original_ones() -> None:
    model = _three_conv(True).eval()
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    prune_layers(model, {"0": [1, 5], "3": [0, 2, 9]}, example_input=(1, 3, 8, 8))
    assert torch.equal(model[0].weight, orig["0.weight"][[1, 5]])
    assert torch.equal(model[0].bias, orig["0.bias"][[1, 5]])
    assert torch.equal(model[1].running_var, orig["1.running_var"][[1, 5]])
    assert torch.equal(model[3].weight, orig["3.weight"][[0, 2, 9]][:, [1, 5]])
    assert torch.equal(model[6].weight, orig["6.weight"][:, [0, 2, 9]])


def test_coupled_group_shares_one_kept_set_and_equals_masking() -> None:
    model = randomize_bn(Coupled())
    graph = model_graph(model, (1, 3, 8, 8))
    assert graph.groups == {"a": ["a", "b", "dw"]}
    assert all(graph.layers[n].prunable for n in ("a", "b", "dw", "c", "d"))
    plan = {"b": [0, 3, 4, 7], "c": [1, 2, 5], "d": [0, 3]}  # b is a member: its kept set drives a and dw
    assert resolve_plan(graph, plan) == {"a": (0, 3, 4, 7), "c": (1, 2, 5), "d": (0, 3)}
    reference = masked_model(model, plan)
    pruned = prune_layers(masked_model(model, {}), plan)
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.dw.out_channels, pruned.dw.groups) == (4, 4, 4, 4)
    assert pruned.e.in_channels == 5  # concat of 3 + 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimError, match="'a' and 'b' are coupled"):
        resolve_plan(graph, {"a": [0, 1], "b": [0, 2]})


def test_plan_errors_name_the_layer() -> None:
    model = build_model("resnet20")
    graph = model_graph(model)
    with pytest.raises(SlimError, match=r"'c1' cannot be pruned: channel padding"):
        prune_layers(PadNet(), {"c1": [0, 1]}, example_input=(1, 3, 8, 8))
    with pytest.raises(SlimError, match=r"'layer1\.0\.conv2' and 'conv1' are coupled"):
        resolve_plan(graph, {"layer1.0.conv2": [0, 1], "conv1": [0, 2]})
    with pytest.raises(SlimError, match="'nope' is not a Conv2d"):
        resolve_plan(graph, {"nope": [0]})
    with pytest.raises(SlimError, match="keeps no filters"):
        resolve_plan(graph, {"layer1.0.conv1": []})
    with pytest.raises(SlimError, match=r"in 0\.\.15"):
        resolve_plan(graph, {"layer1.0.conv1": [3, 16]})
    assert model.layer1[0].conv2.out_channels == 16  # errors come before any surgery


def test_keeping_everything_is_a_no_op() -> None:
    model = _three_conv(False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_layers(model, {"0": list(range(8))}, example_input=(1, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Split(nn.Module):
    """A conv whose channels are split between two consumers: index maps must fall back to graph walks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.split(F.relu(self.a(x)), 4, dim=1)
        return self.fc(torch.cat([self.b(left), self.c(right)], 1).mean((2, 3)))


@pytest.mark.parametrize(("make", "shape"), [(Coupled, (1, 3, 8, 8)), (lambda: build_model("alexnet"), None)])
def test_cached_index_maps_agree_with_direct_graph_walks(make, shape) -> None:  # noqa: ANN001
    model = make().eval()
    graph = model_graph(model, shape)
    prunable = [n for n, li in graph.layers.items() if li.prunable and (li.group is None or li.group == n)]
    for seed in range(4):
        plan = random_plan(model, prunable, seed)
        assert graph.removal_ops(plan) == graph.removal_ops(plan, direct=True)
    assert all(m is not None for m in graph._maps.values())


def test_split_channels_are_not_prunable() -> None:
    # Torch-Pruning 1.6 maps [1, 3, 4] of a 4+4 split to b:[0], c:[1, 3] (wrong), and the forward's
    # torch.split(x, 4) would break anyway: such convs must be refused, not half-pruned.
    model = _Split().eval()
    graph = model_graph(model, (1, 3, 8, 8))
    assert not graph.layers["a"].prunable and "split" in graph.layers["a"].reason
    assert graph.layers["b"].prunable and graph.layers["c"].prunable
    with pytest.raises(SlimError, match="'a' cannot be pruned: its channels are split"):
        prune_layers(model, {"a": [0, 2, 5, 6, 7]})
    assert model.a.out_channels == 8


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: build_model("vgg11"), None),
        (lambda: build_model("resnet20"), None),
        (lambda: build_model("alexnet"), None),  # last conv -> flatten -> linear: LinearPruner.prune_in_channels
        (Coupled, (1, 3, 8, 8)),  # depthwise conv and a linear after a mean: Torch-Pruning's own handlers
    ],
)
def test_fast_replay_equals_torch_pruning_handlers(make, shape, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import slimsearch.core.prune as prune

    fast_ops = []
    original = prune._fast_cut
    monkeypatch.setattr(prune, "_fast_cut", lambda *a: fast_ops.append(done := original(*a)) or done)
    model = randomize_bn(make(), seed=3)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    next(iter(model.parameters())).requires_grad_(False)  # Torch-Pruning's new Parameters require grad anyway
    graph = model_graph(model, shape)
    prunable = [n for n, li in graph.layers.items() if li.prunable and (li.group is None or li.group == n)]
    for seed in range(3):
        plan = random_plan(model, prunable, seed)
        fast, ref = copy.deepcopy(model), copy.deepcopy(model)  # deepcopy keeps the gradients
        prune.cut(fast, plan, graph)
        prune.cut(ref, plan, graph, reference=True)
        assert repr(fast) == repr(ref)
        fs, rs = fast.state_dict(keep_vars=True), ref.state_dict(keep_vars=True)
        assert list(fs) == list(rs)
        for k in rs:
            assert type(fs[k]) is type(rs[k]) and fs[k].requires_grad == rs[k].requires_grad, k
            assert torch.equal(fs[k], rs[k]) and fs[k].is_contiguous() == rs[k].is_contiguous(), k
            assert (fs[k].grad is None) == (rs[k].grad is None), k
            if rs[k].grad is not None:
                assert torch.equal(fs[k].grad, rs[k].grad), k
        for (name, a), b in zip(fast.named_modules(), ref.modules(), strict=True):
            public = [{k: v for k, v in vars(m).items() if not k.startswith("_")} for m in (a, b)]
            assert public[0] == public[1], name
    assert any(fast_ops) and (not all(fast_ops)) == (make is Coupled)  # Coupled's depthwise conv: Torch-Pruning


def test_option_a_shortcut_channel_map_matches_its_conv_stand_in() -> None:
    """remove_channels on either side and mask_out_channels keep the shortcut equal to its 1x1 conv stand-in
    (what core.graph traces) and to the unpruned shortcut's surviving channels."""
    sc = OptionAShortcut(4, 8)  # 8 -> 16 channels, input c on output c + 4
    x = torch.randn(2, 8, 6, 6)
    full = sc(x)
    assert full.shape == (2, 16, 3, 3) and not sc.select and not sc.scatter
    torch.testing.assert_close(full, sc.as_conv()(x))
    cut_in, cut_out = [1, 5], [0, 6, 9, 15]
    sc.remove_channels(cut_in, out_side=False)
    sc.remove_channels(cut_out, out_side=True)
    keep_in = [c for c in range(8) if c not in cut_in]
    keep_out = [c for c in range(16) if c not in cut_out]
    y = sc(x[:, keep_in])
    expected = full[:, keep_out].clone()
    expected[:, [keep_out.index(c + 4) for c in cut_in if c + 4 in keep_out]] = 0.0  # fed by removed inputs
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, sc.as_conv()(x[:, keep_in]))
    assert sc.select and sc.scatter and (sc.in_channels, sc.out_channels) == (6, 12)
    torch.testing.assert_close(torch.jit.script(sc)(x[:, keep_in]), y)
    masked = OptionAShortcut(4, 8)
    masked.mask_out_channels([5, 6])
    z = masked(x)
    assert z.shape == full.shape and z[:, [5, 6]].abs().max() == 0
    torch.testing.assert_close(z[:, [4, 7]], full[:, [4, 7]])


def test_pruning_every_residual_stream_shrinks_the_shortcuts_and_the_head() -> None:
    model = randomize_bn(build_model("resnet20"))
    plan = {"conv1": [0, 3, 5, 9, 10, 15], "layer2.0.conv2": list(range(0, 32, 2)), "layer3.0.conv2": list(range(40))}
    pruned = prune_layers(copy.deepcopy(model), plan)
    assert [pruned.layer1[b].conv2.out_channels for b in range(3)] == [6, 6, 6]
    assert (pruned.layer2[0].conv1.in_channels, pruned.layer2[0].shortcut.in_channels) == (6, 6)
    assert (pruned.layer2[0].shortcut.out_channels, pruned.layer3[0].shortcut.out_channels) == (16, 40)
    assert pruned.linear.in_features == 40
    # stage-1 channel c feeds stage-2 channel c + 8, which survives when even: 0 -> 8 and 10 -> 18 (new 0 -> 4, 4 -> 9)
    assert pruned.layer2[0].shortcut.pairs() == [(0, 4), (4, 9)]
    assert pruned.layer3[0].shortcut.pairs() == [(j, 2 * j + 16) for j in range(12)]  # kept stage-2 j <= 22 -> j + 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_model(model, plan)(x), atol=1e-5, rtol=1e-5)
