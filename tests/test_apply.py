"""slimsearch.core.apply: apply_policy never mutates its input, shrinks cost, mixes pruning and decomposition,
reuses cached decompositions, and rejects bad policies with SlimError."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from nets import PadNet, randomize_bn
from slimsearch.core.apply import apply_policy, clone_model, kept_indices, layer_seed
from slimsearch.core.cost import count_cost
from slimsearch.core.criteria import select_filters
from slimsearch.core.decompose import DecompositionCache
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import compressible_layers
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn

SMALL_DECOMP = 64 * 64  # decompose only layers with out*in <= this in random policies (tensorly is slow on big ones)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], str, list[bool], list[bool]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        repr(model),
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, structure, modes, grads = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert repr(model) == structure
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


def random_policy(
    model: nn.Module, rng: random.Random, input_shape: tuple[int, ...], max_decomp: int = SMALL_DECOMP
) -> Policy:
    layers: dict[str, LayerPolicy] = {}
    n_decomposed = 0
    shared: dict[str, tuple[float, str]] = {}  # a coupled group's members share its leader's pruning
    for li in compressible_layers(model, input_shape):
        rate = round(rng.uniform(0.0, 0.9), 3) if li.prunable and rng.random() < 0.6 else 0.0
        crit = rng.choice(["l1", "l2", "random", "fpgm"])
        if li.group is not None:
            rate, crit = shared.setdefault(li.group, (rate, crit))
        dec, ratio = "none", None
        if (
            li.decomposable
            and n_decomposed < 1
            and li.out_channels * li.in_channels <= max_decomp
            and rng.random() < 0.3
        ):
            dec = rng.choice(["cp", "tucker"])
            ratio = round(rng.uniform(0.02, 0.1) if dec == "cp" else rng.uniform(0.1, 0.5), 3)
            n_decomposed += 1
        if rate or dec != "none":
            layers[li.name] = LayerPolicy(prune_rate=rate, criterion=crit, decomposition=dec, rank_ratio=ratio)
    return Policy(layers)


def check_random_policies(name: str, n: int, seed: int, max_decomp: int = SMALL_DECOMP) -> None:
    shape = (1, 1, 8, 8) if name == "smallcnn" else (1, 3, 32, 32)
    model = build_model(name).train()  # train mode: apply_policy must not flip the input's modes
    before = snapshot(model)
    base = count_cost(model, shape)
    cache = DecompositionCache()
    rng = random.Random(seed)
    x = torch.randn(2, *shape[1:])
    for _ in range(n):
        policy = random_policy(model, rng, shape, max_decomp)
        new = apply_policy(model, policy, input_shape=shape, cache=cache, seed=rng.randrange(1000))
        assert not new.training
        with torch.no_grad():
            out = new(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        cost = count_cost(new, shape)
        assert cost.macs <= base.macs and cost.params <= base.params, policy.to_json()
        if any(lp.prune_rate >= 0.5 for lp in policy.layers.values()):
            assert cost.macs < base.macs
    assert_unchanged(model, before)


@pytest.mark.parametrize(("name", "n"), [("resnet20", 5), ("smallcnn", 8), ("vgg11", 3)])
def test_random_policies_fast_subset(name: str, n: int) -> None:
    check_random_policies(name, n, seed=zlib.crc32(name.encode()) % 1000, max_decomp=32 * 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "n"),
    [("resnet20", 20), ("resnet32", 20), ("vgg11", 20), ("vgg16", 20), ("alexnet", 20), ("smallcnn", 20),
     ("resnet56", 4), ("resnet110", 3), ("vgg19", 3)],
)  # fmt: skip
def test_random_policies_full(name: str, n: int) -> None:
    check_random_policies(name, n, seed=7)


def test_kept_filters_are_selected_on_the_original_weights() -> None:
    model = build_model("vgg11").eval()
    policy = Policy(
        {"features.0": LayerPolicy(prune_rate=0.5), "features.4": LayerPolicy(prune_rate=0.25, criterion="l2")}
    )
    new = apply_policy(model, policy)
    k0 = select_filters(model.features[0].weight, 32, "l1")
    k4 = select_filters(model.features[4].weight, 96, "l2")
    assert torch.equal(kept_indices(model, policy)["features.0"], k0)
    assert torch.equal(new.features[0].weight, model.features[0].weight[k0])
    assert torch.equal(new.features[4].weight, model.features[4].weight[k4][:, k0])
    assert new.features[8].in_channels == 96 and new.features[5].num_features == 96


def test_random_criterion_is_seeded_per_layer() -> None:
    model = build_model("smallcnn")
    policy = Policy({n: LayerPolicy(prune_rate=0.5, criterion="random") for n in ("features.0", "features.3")})
    a = kept_indices(model, policy, seed=3)
    assert {k: v.tolist() for k, v in a.items()} == {
        k: v.tolist() for k, v in kept_indices(model, policy, seed=3).items()
    }
    assert not torch.equal(a["features.0"], kept_indices(model, policy, seed=4)["features.0"])
    assert not torch.equal(a["features.0"], a["features.3"])  # same size, different layer seed
    assert layer_seed(3, "features.0") != layer_seed(3, "features.3")


def test_second_application_reuses_every_decomposition() -> None:
    model = build_model("resnet20").eval()
    policy = Policy(
        {
            "layer1.0.conv1": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.5),
            "layer1.1.conv2": LayerPolicy(decomposition="cp", rank=4),
        }
    )
    cache = DecompositionCache()
    first = apply_policy(model, policy, cache=cache)
    assert cache.computed == 2
    second = apply_policy(model, policy, cache=cache)
    assert cache.computed == 2 and cache.hits_memory == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(first(x), second(x))
    assert first.layer1[0].conv1 is not second.layer1[0].conv1  # fresh modules, no shared parameters


def test_prune_then_decompose_at_full_rank_reproduces_pruning() -> None:
    model = randomize_bn(build_model("smallcnn"))
    prune = LayerPolicy(prune_rate=0.5)
    pruned = apply_policy(model, Policy({"features.0": prune, "features.3": prune}), input_shape=(1, 1, 8, 8))
    # features.3 after pruning: 16 filters x 16 input channels; Tucker at (16, 16) is an exact factorisation
    full = LayerPolicy(prune_rate=0.5, decomposition="tucker", rank=(16, 16))
    mixed = apply_policy(model, Policy({"features.0": prune, "features.3": full}), input_shape=(1, 1, 8, 8))
    seq = mixed.features[3]
    assert isinstance(seq, nn.Sequential) and [c.in_channels for c in seq] == [16, 16, 16]
    assert seq[-1].out_channels == 16 and mixed.features[4].num_features == 16
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(mixed(x), pruned(x), atol=1e-4, rtol=1e-4)
    low = apply_policy(
        model,
        Policy({"features.3": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.25)}),
        input_shape=(1, 1, 8, 8),
    )
    assert [c.out_channels for c in low.features[3]] == [8, 4, 16]  # ranks of the 16x32 post-pruning kernel: (8, 4)
    assert count_cost(low, (1, 1, 8, 8)).macs < count_cost(apply_policy(model, Policy({"features.3": prune}),
                                                           input_shape=(1, 1, 8, 8)), (1, 1, 8, 8)).macs  # fmt: skip


def test_bad_policies_raise_slim_error() -> None:
    resnet = build_model("resnet20")
    with pytest.raises(SlimError, match="'layer9.conv1' is not a Conv2d"):
        apply_policy(resnet, Policy({"layer9.conv1": LayerPolicy(prune_rate=0.5)}))
    with pytest.raises(SlimError, match=r"prune_rate must be in \[0, 1\)"):
        apply_policy(resnet, Policy({"layer1.0.conv1": LayerPolicy(prune_rate=1.0)}))
    with pytest.raises(SlimError, match=r"layer 'c1' cannot be pruned: channel padding"):
        apply_policy(PadNet(), Policy({"c1": LayerPolicy(prune_rate=0.5)}), input_shape=(1, 3, 8, 8))
    with pytest.raises(SlimError, match=r"'layer2\.0\.conv2' and 'layer2\.1\.conv2' are coupled"):
        apply_policy(
            resnet,
            Policy({n: LayerPolicy(prune_rate=r) for n, r in (("layer2.0.conv2", 0.5), ("layer2.1.conv2", 0.25))}),
        )
    small = build_model("smallcnn")
    too_big = Policy({"features.3": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank=(32, 32))})
    too_big.validate(small)  # fine against the original 32x32 kernel ...
    with pytest.raises(
        SlimError, match=r"features\.3.*Tucker ranks \(32, 32\).*after pruning the layer's kernel is 16x32x3x3"
    ):
        apply_policy(small, too_big, input_shape=(1, 1, 8, 8))  # ... but not after pruning to 16 filters


def test_tiny_rates_on_blocked_layers_remove_nothing_and_pass() -> None:
    resnet = build_model("resnet20").eval()
    new = apply_policy(resnet, Policy({"layer1.0.conv2": LayerPolicy(prune_rate=0.05)}))  # floor(0.05*16) = 0
    assert new.layer1[0].conv2.out_channels == 16
    assert count_cost(new) == count_cost(resnet)


def test_identity_policy_returns_an_equal_independent_copy() -> None:
    model = randomize_bn(build_model("smallcnn"))
    new = apply_policy(model, Policy(), input_shape=(1, 1, 8, 8))
    assert new is not model
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(new(x), model(x))
    with torch.no_grad():
        new.features[0].weight.add_(1.0)
    assert not torch.equal(new.features[0].weight, model.features[0].weight)


def test_model_digest_tells_networks_apart_by_structure_and_values() -> None:
    from slimsearch.core.apply import model_digest

    torch.manual_seed(0)
    model = build_model("smallcnn").eval()

    def one(rate: float, criterion: str = "l1") -> Policy:
        return Policy({"features.0": LayerPolicy(prune_rate=rate, criterion=criterion)})

    assert model_digest(apply_policy(model, Policy())) == model_digest(model)
    half, also, fpgm = (apply_policy(model, p) for p in (one(0.5), one(0.52), one(0.5, "fpgm")))
    assert model_digest(half) == model_digest(also) != model_digest(model)  # floor: 8 of 16 filters either way
    same_filters = kept_indices(model, one(0.5))["features.0"].equal(
        kept_indices(model, one(0.5, "fpgm"))["features.0"]
    )
    assert (model_digest(fpgm) == model_digest(half)) == same_filters
    with torch.no_grad():
        half.features[0].weight[0, 0, 0, 0] += 1e-6  # one value: another network
    assert model_digest(half) != model_digest(also)


def test_clone_model_is_independent_and_keeps_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 1)
            self.b.weight = self.a.weight
            self.register_buffer("step", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Tied()
    model.a.bias.requires_grad_(False)
    clone = clone_model(model)
    assert clone.b.weight is clone.a.weight and clone.a.weight is not model.a.weight
    assert not clone.a.bias.requires_grad and clone.b.bias.requires_grad
    with torch.no_grad():
        clone.a.weight.add_(1.0)
        clone.step.add_(1.0)
    assert not torch.equal(clone.a.weight, model.a.weight) and model.step.item() == 0.0
    clone.register_forward_hook(lambda *_: None)
    assert not model._forward_hooks  # hook dicts are not shared
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(clone_model(model)(x), model(x))


def test_clone_model_falls_back_to_deepcopy_for_unusual_state() -> None:
    model = build_model("smallcnn")
    model.features[0].register_forward_hook(lambda *_: None)  # a hook: not plain state
    model.extra = [1, 2]  # a list attribute: not plain state
    clone = clone_model(model)
    assert clone.extra == [1, 2] and clone.extra is not model.extra
    assert len(clone.features[0]._forward_hooks) == 1
    assert clone.features[0].weight is not model.features[0].weight


def test_policy_on_a_group_member_prunes_the_whole_group() -> None:
    from nets import Coupled as _Coupled

    model = randomize_bn(_Coupled())
    policy = Policy({"b": LayerPolicy(prune_rate=0.5), "dw": LayerPolicy(prune_rate=0.5, decomposition="none")})
    new = apply_policy(model, policy, input_shape=(1, 3, 8, 8))
    assert (new.a.out_channels, new.b.out_channels, new.dw.out_channels, new.c.in_channels) == (4, 4, 4, 4)
    kept = kept_indices(model, policy, example_input=(1, 3, 8, 8))
    assert set(kept) == {"a", "b", "dw"}
    assert torch.equal(kept["b"], select_filters(model.a.weight, 4, "l1"))  # chosen on the leader 'a'
    with pytest.raises(SlimError, match="'a' and 'b' are coupled"):
        apply_policy(
            model,
            Policy({"a": LayerPolicy(prune_rate=0.5), "b": LayerPolicy(prune_rate=0.25)}),
            input_shape=(1, 3, 8, 8),
        )


def test_output_check_skips_conv_arithmetic_but_catches_broken_surgery(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimsearch.core.apply as apply_mod

    model = build_model("resnet20").eval()
    policy = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5)})
    convs_run = []
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: convs_run.append(self) or None)
    new = apply_policy(model, policy)  # the check forward computes no convolution at all ...
    assert convs_run == []
    assert all("forward" not in m.__dict__ for m in new.modules())  # ... and leaves no override behind
    monkeypatch.undo()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert new(x).shape == (2, 10)
    real_cut = apply_mod.cut

    def cut_and_break(what: str) -> object:
        def broken(new: nn.Module, kept: object, graph: object) -> nn.Module:
            real_cut(new, kept, graph)
            if what == "channels":  # a consumer left with one input channel too many
                new.layer1[0].conv2 = nn.Conv2d(9, 16, 3, padding=1, bias=False)
            else:  # a changed output
                new.linear = nn.Linear(64, 7)
            return new

        return broken

    monkeypatch.setattr(apply_mod, "cut", cut_and_break("channels"))
    with pytest.raises(RuntimeError, match="channels"):
        apply_policy(model, policy)
    monkeypatch.setattr(apply_mod, "cut", cut_and_break("output"))
    with pytest.raises(RuntimeError, match=r"apply_policy produced output \(1, 7\), expected \(1, 10\)"):
        apply_policy(model, policy)
