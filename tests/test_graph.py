"""slimsearch.core.graph: which convs are prunable / decomposable / coupled, on the zoo and on small custom nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import Coupled, PadNet, randomize_bn
from slimsearch.core.apply import apply_policy, kept_indices
from slimsearch.core.graph import compressible_layers, coupled_groups, fingerprint, model_graph
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn


def _prunable(name: str) -> list[str]:
    return [li.name for li in compressible_layers(build_model(name)) if li.prunable]


def test_resnet20_every_conv_is_prunable() -> None:
    layers = compressible_layers(build_model("resnet20"))
    assert len(layers) == 19  # the option-A shortcuts' conv stand-ins are not layers of the model
    assert all(li.prunable and li.reason is None and li.decomposable for li in layers)
    inner = next(li for li in layers if li.name == "layer2.0.conv1")
    assert (inner.out_channels, inner.in_channels, inner.kernel, inner.groups, inner.group) == (32, 16, (3, 3), 1, None)


def test_resnet20_residual_streams_are_one_group_per_stage() -> None:
    """The option-A shortcut separates the stages' residual streams (Torch-Pruning alone would join them)."""
    groups = coupled_groups(build_model("resnet20"))
    assert groups == {
        "conv1": ["conv1"] + [f"layer1.{b}.conv2" for b in range(3)],
        "layer2.0.conv2": [f"layer2.{b}.conv2" for b in range(3)],
        "layer3.0.conv2": [f"layer3.{b}.conv2" for b in range(3)],
    }
    infos = {li.name: li for li in compressible_layers(build_model("resnet20"))}
    assert infos["layer3.2.conv2"].group == "layer3.0.conv2"
    assert infos["layer3.2.conv1"].group is None


@pytest.mark.parametrize(("name", "n_convs"), [("vgg16", 13), ("smallcnn", 4), ("alexnet", 5)])
def test_plain_nets_have_every_conv_prunable(name: str, n_convs: int) -> None:
    layers = compressible_layers(build_model(name))
    assert len(layers) == n_convs
    assert all(li.prunable and li.decomposable and li.group is None and li.reason is None for li in layers)
    assert coupled_groups(build_model(name)) == {}


class _ResidualB(nn.Module):
    """Option-B style residual (1x1 conv shortcut), a depthwise conv and a conv classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.short = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(F.relu(self.stem(x))) + self.short(x))
        y = self.grouped(F.relu(self.dw(y)))
        return self.head(y).mean((2, 3))


def test_custom_graph_couplings_and_reasons() -> None:
    infos = {li.name: li for li in compressible_layers(_ResidualB(), (1, 3, 8, 8))}
    # a + short are added; dw follows them; the grouped conv couples its own in/out channels: all one group
    assert infos["stem"].prunable and infos["stem"].group is None
    assert infos["a"].group == infos["short"].group == "a"
    assert not infos["a"].prunable and "grouped conv 'grouped'" in infos["a"].reason
    assert not infos["grouped"].decomposable and not infos["dw"].decomposable
    assert not infos["head"].prunable and infos["head"].reason == "its channels are model outputs"


def test_spatial_padding_does_not_block_but_channel_padding_does() -> None:
    spatial = {li.name: li for li in compressible_layers(PadNet(channel_pad=False), (1, 3, 8, 8))}
    assert spatial["c1"].prunable and spatial["c2"].prunable
    chan = {li.name: li for li in compressible_layers(PadNet(channel_pad=True), (1, 3, 8, 8))}
    assert not chan["c1"].prunable and chan["c1"].reason.startswith("channel padding (F.pad) in its channel group")


def test_fingerprint_tracks_architecture_not_weights() -> None:
    a, b = build_model("smallcnn"), build_model("smallcnn")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(build_model("smallcnn", num_classes=3))


def test_graph_building_leaves_the_model_untouched() -> None:
    m = build_model("smallcnn").train()
    for p in m.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    compressible_layers(m, (1, 1, 8, 8))
    assert m.training and not any(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_fingerprint_cache_notices_changes_and_the_graph_is_rebuilt() -> None:
    from slimsearch.core.graph import _fingerprint, model_graph

    m = build_model("smallcnn").eval()
    shape = (1, 1, 8, 8)
    fp, graph = fingerprint(m), model_graph(m, shape)
    assert fp == _fingerprint(m) and fingerprint(m) == fp
    with torch.no_grad():
        m.features[0].weight.mul_(2.0)  # new values, same architecture: cache hit, same graph
    assert fingerprint(m) == fp and model_graph(m, shape) is graph

    m.features[0] = nn.Conv2d(1, 32, 3, padding=1, bias=False)  # a new but identical layer: same digest
    assert fingerprint(m) == fp == _fingerprint(m)

    changed = []
    m.features[3].stride = (2, 2)  # a hyper-parameter, set in place on the same module
    changed.append(fingerprint(m))
    m.features[3].stride = (1, 1)
    assert fingerprint(m) == fp
    m.features[0].weight.data = torch.zeros(16, 1, 3, 3)  # a tensor reshaped behind the module's back
    changed.append(fingerprint(m))
    m.features[0] = nn.Conv2d(1, 16, 3, padding=1, bias=False)  # a replaced layer
    m.features[1] = nn.BatchNorm2d(16)
    m.features[3] = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    changed.append(fingerprint(m))
    assert changed[-1] == _fingerprint(m) and len({fp, *changed}) == 4
    rebuilt = model_graph(m, shape)
    assert rebuilt is not graph and rebuilt.fingerprint == changed[-1]
    assert rebuilt.layers["features.0"].out_channels == 16 and rebuilt.layers["features.3"].in_channels == 16
    with torch.no_grad():
        assert m(torch.zeros(shape)).shape == (1, 10)


def test_fingerprint_cache_does_not_keep_models_alive() -> None:
    import gc
    import weakref

    m = build_model("smallcnn")
    m.features[0].register_forward_hook(lambda mod, args, out, owner=m: None)  # a hook referring to the model
    fingerprint(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def _sq(w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum of squares per index of ``dim``, float64."""
    w = w.detach().double().pow(2).transpose(0, dim)
    return w.reshape(w.shape[0], -1).sum(dim=1)


def test_group_norms_count_every_weight_removed_with_a_filter() -> None:
    """Torch-Pruning's group magnitude (p=2): coupled convs' filters, BN scales, consumers' input slices; concat
    offsets followed; a channel map (option-A shortcut) holds no weight."""
    m = randomize_bn(build_model("resnet20"), seed=3)
    mods = dict(m.named_modules())
    got = model_graph(m, (1, 3, 32, 32)).group_norms(m, "conv1")
    want = _sq(mods["conv1"].weight) + _sq(mods["bn1"].weight) + _sq(mods["layer2.0.conv1"].weight, 1)
    for b in range(3):
        blk = f"layer1.{b}"
        want += _sq(mods[f"{blk}.conv2"].weight) + _sq(mods[f"{blk}.bn2"].weight) + _sq(mods[f"{blk}.conv1"].weight, 1)
    torch.testing.assert_close(got, want.sqrt())

    c = randomize_bn(Coupled(), seed=1)
    g = model_graph(c, (1, 3, 8, 8))
    want = _sq(c.a.weight) + _sq(c.bn_a.weight) + _sq(c.b.weight) + _sq(c.dw.weight) + _sq(c.c.weight, 1)
    torch.testing.assert_close(g.group_norms(c, "a"), want.sqrt())
    torch.testing.assert_close(g.group_norms(c, "d"), (_sq(c.d.weight) + _sq(c.e.weight, 1)[6:]).sqrt())


def test_the_group_criterion_keeps_a_filter_whose_consumer_slice_carries_the_weight() -> None:
    m = build_model("resnet20").eval()
    with torch.no_grad():
        m.layer1[0].conv1.weight[0].mul_(1e-3)  # the smallest filter by its own norm...
        m.layer1[0].conv2.weight[:, 0].mul_(1e3)  # ...but the next conv reads it with huge weights
    kept = {}
    for crit in ("l1", "group"):
        pol = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5, criterion=crit)})
        kept[crit] = kept_indices(m, pol, example_input=(1, 3, 32, 32))["layer1.0.conv1"].tolist()
    assert 0 not in kept["l1"] and 0 in kept["group"] and len(kept["group"]) == 8
    out = apply_policy(m, Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5, criterion="group")}),
                       input_shape=(1, 3, 32, 32))  # fmt: skip
    assert out.layer1[0].conv1.out_channels == 8 and out.layer1[0].conv2.in_channels == 8
