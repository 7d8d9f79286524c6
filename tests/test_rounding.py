"""Channel rounding (``core.rounding``, ``[space] round_to``): kept counts are multiples of N in apply_policy, in the
MACs and latency predictions, and in what a search's fit returns under its bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slimsearch.core.apply import apply_policy
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.macs import policy_macs
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.core.rounding import round_count, round_policy
from slimsearch.spaces.config import SpaceConfig

SHAPE = (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("k", "n", "r", "want"),
    [(13, 32, 8, 16), (11, 32, 8, 8), (12, 32, 8, 16), (3, 32, 8, 8), (31, 32, 16, 32), (20, 64, 16, 16),
     (24, 64, 16, 32), (5, 16, 16, 16), (9, 10, 4, 8), (10, 10, 4, 10), (7, 64, 1, 7)],
)  # fmt: skip
def test_round_count(k: int, n: int, r: int, want: int) -> None:
    assert round_count(k, n, r) == want


def test_round_count_rejects_bad_n() -> None:
    for bad in (0, -8, 2.5, True):
        with pytest.raises(SlimError, match="round_to"):
            round_count(5, 16, bad)  # type: ignore[arg-type]


def test_apply_policy_keeps_multiples_and_the_tables_agree() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    policy = Policy(
        {
            "layer2.0.conv1": LayerPolicy(prune_rate=0.6),  # 32 -> 13 kept -> 16
            "layer3.1.conv1": LayerPolicy(prune_rate=0.3, criterion="fpgm"),  # 64 -> 45 -> 48
            "layer3.2.conv1": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.5),  # 32 -> 32
            "layer1.0.conv1": LayerPolicy(prune_rate=0.5),  # 16 filters: one block, kept whole
        }
    )
    rounded = round_policy(model, policy, 16, SHAPE)
    got = apply_policy(model, policy, input_shape=SHAPE, round_to=16)
    assert got.layer2[0].conv1.out_channels == 16 and got.layer3[1].conv1.out_channels == 48
    assert got.layer1[0].conv1.out_channels == 16
    tucker = got.layer3[2].conv1
    assert [m.out_channels for m in tucker][-1] == 32  # the Tucker stack's last conv: the rounded filter count
    # The rounded policy rebuilds the same network without round_to (what an export's policy.json does) ...
    again = apply_policy(model, rounded, input_shape=SHAPE)
    assert [p.shape for p in again.parameters()] == [p.shape for p in got.parameters()]
    # ... and the MACs table predicts exactly its cost.
    assert policy_macs(model, rounded, SHAPE) == count_cost(got, SHAPE).macs
    assert policy_macs(model, rounded, SHAPE) > policy_macs(model, policy, SHAPE)  # 13 -> 16, 45 -> 48 here
    assert round_policy(model, policy, None, SHAPE) is policy


def test_coupled_groups_and_keep_masks_round_together() -> None:
    torch.manual_seed(1)
    model = build_model("resnet20").eval()
    keep = tuple(range(0, 32, 3))  # 11 of layer2.0.conv1's 32 filters -> 8: its strongest 8
    policy = Policy({"layer2.0.conv2": LayerPolicy(prune_rate=0.7), "layer2.0.conv1": LayerPolicy(keep=keep)})
    out = round_policy(model, policy, 8, SHAPE)
    assert out.layers["layer2.0.conv2"].keep_count(32) == 8
    mask = out.layers["layer2.0.conv1"].keep
    assert mask is not None and len(mask) == 8 and set(mask) <= set(keep)
    w = model.layer2[0].conv1.weight.detach().flatten(1).abs().sum(1)
    assert min(float(w[i]) for i in mask) >= max(float(w[i]) for i in set(keep) - set(mask))
    built = apply_policy(model, policy, input_shape=SHAPE, round_to=8)
    assert built.layer2[0].conv1.out_channels == 8 and built.layer2[2].conv2.out_channels == 8  # the stream
    assert built.conv1.out_channels == 16


def test_space_round_to_is_checked() -> None:
    assert SpaceConfig.from_dict({"round_to": 16}).round_to == 16
    assert "round_to" not in SpaceConfig().to_dict()  # unset: old studies' fingerprints stay the same
    for bad in (0, 2.0, "16", True, 4096):
        with pytest.raises(SlimError, match=r"\[space\] round_to"):
            SpaceConfig.from_dict({"round_to": bad})


def test_latency_table_warms_only_rounded_counts() -> None:
    from slimsearch.core.latency import LatencyTable

    model = build_model("smallcnn", in_channels=1).eval()
    shape = (1, 1, 8, 8)
    table = LatencyTable(model, shape, repeats=1, mode="eager")
    n = table.warm(model, [["features.0"]], max_rate=0.9, budget_s=60, round_to=8)
    assert n >= 1
    full = LatencyTable(model, shape, repeats=1, mode="eager")
    n_all = full.warm(model, [["features.0"]], max_rate=0.9, budget_s=60)
    assert n < n_all


def test_a_search_stores_rounded_policies_within_its_bound(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every trial's stored policy keeps multiples of 8 filters, and its MACs (counted on the built network)
    meet the study's bound: the fit scales the rounded policy, not the raw sample."""
    from helpers import make_baseline, trials_of, write_study
    from slimsearch.search.runner import run_study
    from slimsearch.search.study import load_study

    monkeypatch.chdir(tmp_path)
    ckpt = make_baseline(tmp_path_factory)
    cfg = load_study(write_study(tmp_path, ckpt, n_trials=4, space="round_to = 8",
                                 constraint="max_macs_ratio = 0.5"))  # fmt: skip
    run_study(cfg, progress=False, log=lambda s: None)
    model = build_model("smallcnn", in_channels=1).eval()
    graph_out = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    base = count_cost(model, (1, 1, 8, 8)).macs
    done = [t for t in trials_of(cfg) if "policy" in t.user_attrs and t.user_attrs.get("status") == "ok"]
    assert len(done) >= 2
    for t in done:
        policy = Policy.from_json(t.user_attrs["policy"])
        kept = [lp.keep_count(graph_out[n]) for n, lp in policy.layers.items()]
        assert all(k % 8 == 0 for k in kept), kept
        assert count_cost(apply_policy(model, policy, input_shape=(1, 1, 8, 8)), (1, 1, 8, 8)).macs <= 0.5 * base
