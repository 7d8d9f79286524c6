"""Pure logic of benchmarks/bench_compare.py: Torch-Pruning with our unprunable layers ignored, bisected onto a
MACs budget, the uniform baselines and the projection of a method's policy onto a budget. Random-weight
ResNet-20, no data (the projection's core: tests/test_budget.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slimsearch.core.apply import apply_policy
from slimsearch.core.budget import bisect_budget, policy_macs, prunable_leaders
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.core.tp_prune import tp_prune, unprunable_modules
from torch import nn

from benchmarks.bench_compare import (
    allocation_policy,
    inner_leaders,
    project,
    uniform_policy,
)

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def _check_tp(model: nn.Module, pruned: nn.Module, all_prunable_shrink: bool) -> None:
    """The convs Torch-Pruning is told to ignore (the residual streams, which it cannot trace through the
    option-A padding) keep their channels; the block-inner convs shrink; the model still runs."""
    graph = model_graph(model, SHAPE)
    convs = dict(pruned.named_modules())
    ignored = {id(m) for m in unprunable_modules(model, SHAPE)}
    named = dict(model.named_modules())
    shrunk = 0
    for name, info in graph.layers.items():
        out_c = convs[name].out_channels
        if id(named[name]) in ignored:
            assert info.group is not None, name  # only the residual streams' convs
            assert out_c == info.out_channels, name
        else:
            shrunk += out_c < info.out_channels
    n = sum(info.group is None for info in graph.layers.values())
    assert n == 9
    assert shrunk == n if all_prunable_shrink else 0 < shrunk <= n
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert convs["linear"].out_features == 10


def test_tp_uniform_l1_bisection_meets_budget_on_prunable_layers_only(resnet20: nn.Module) -> None:
    base = count_cost(resnet20, SHAPE).macs
    budget = 0.5 * base
    r, macs = bisect_budget(lambda x: count_cost(tp_prune(resnet20, "tp_l1", x, SHAPE), SHAPE).macs, budget, iters=3)
    pruned = tp_prune(resnet20, "tp_l1", r, SHAPE)
    assert count_cost(pruned, SHAPE).macs == macs <= budget
    assert macs > 0.4 * base  # close to the budget, not far below it
    _check_tp(resnet20, pruned, all_prunable_shrink=True)


def test_tp_global_ignores_unprunable_layers(resnet20: nn.Module) -> None:
    pruned = tp_prune(resnet20, "tp_global", 0.5, SHAPE)
    assert count_cost(pruned, SHAPE).macs < count_cost(resnet20, SHAPE).macs
    _check_tp(resnet20, pruned, all_prunable_shrink=False)


def test_uniform_policy_covers_prunable_leaders_only(resnet20: nn.Module) -> None:
    p = uniform_policy(resnet20, 0.3333333333, "fpgm")
    assert (
        list(p.layers)
        == sorted(inner_leaders(resnet20, SHAPE))
        == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    )
    assert all(lp.criterion == "fpgm" and lp.prune_rate == 0.333333 for lp in p.layers.values())
    streams = uniform_policy(resnet20, 0.25, "l1", coupled=True)
    assert list(streams.layers) == sorted(prunable_leaders(resnet20, SHAPE)) and "layer2.0.conv2" in streams.layers


def test_project_fits_a_method_policy_onto_the_budget(resnet20: nn.Module) -> None:
    from types import SimpleNamespace

    b = SimpleNamespace(base=resnet20, args=SimpleNamespace(bisect_iters=8))
    names = inner_leaders(resnet20, SHAPE)  # the residual streams stay whole, as for the Torch-Pruning rows
    assert len(names) == 9 and len(prunable_leaders(resnet20, SHAPE)) == 12
    pol = Policy({names[0]: LayerPolicy(prune_rate=0.5, criterion="mask", keep=tuple(range(8)))})
    native = {"method": "ga", "policy": pol, "macs": policy_macs(resnet20, pol, SHAPE)}
    base = count_cost(resnet20, SHAPE).macs
    assert project(b, native, base)[:3] == (pol, False, 0.0)  # within the budget: as it is
    fitted, projected, t, _ = project(b, native, 0.5 * base)
    assert projected and 0 < t < 0.98 and 0.45 * base < policy_macs(resnet20, fitted, SHAPE) <= 0.5 * base
    assert set(fitted.layers) == set(names) and len(fitted[names[0]].keep) < 8  # GA's unlisted layers: l1
    with pytest.raises(SlimError, match="out of reach"):
        project(b, native, 0.001 * base)


def test_latency_phase_measures_every_export_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import benchmarks.bench_compare as bc

    calls: list[str] = []
    slow = {"baseline": 4.0, "a": 2.0, "b": 1.0, "b/nhwc": 3.0}

    def fake_latency(model: str, args: object) -> dict[str, float]:
        calls.append(model)
        jitter = 0.5 if len(calls) <= 4 else 0.0  # the first round is disturbed: the best round must win
        # b's NHWC program: slower at batch 1, faster at batch 64 (as on our CPU)
        return {"b1_ms": slow[model] + jitter, "b64_ms": (5 if model == "b/nhwc" else 10) * slow[model] + jitter}

    monkeypatch.setattr(bc, "latency", fake_latency)
    exports = {"a": {"contiguous": "a"}, "b": {"contiguous": "b", "channels_last": "b/nhwc"}}
    b = SimpleNamespace(args=SimpleNamespace(lat_rounds=2), base_ts={"contiguous": "baseline"}, exports=exports)
    lat = bc.latency_phase(b)
    assert calls == ["baseline", "a", "b", "b/nhwc", "b", "b/nhwc", "a", "baseline"]
    for k in ("baseline", "a"):
        assert lat[k] == {
            "b1_ms": slow[k],
            "b64_ms": 10 * slow[k],
            "b1_layout": "contiguous",
            "b64_layout": "contiguous",
        }
    # each batch size keeps the layout that is faster there
    assert lat["b"] == {"b1_ms": 1.0, "b1_layout": "contiguous", "b64_ms": 10.0, "b64_layout": "contiguous"}
    slow["b/nhwc"] = 1.5  # now 7.5 ms at batch 64
    assert bc.latency_phase(b)["b"] == {
        "b1_ms": 1.0,
        "b1_layout": "contiguous",
        "b64_ms": 7.5,
        "b64_layout": "channels_last",
    }
    lat = {k: {m: v for m, v in d.items() if m.endswith("_ms")} for k, d in lat.items()}
    row = {"macs": 50}
    bc.add_latency(row, lat["a"], lat["baseline"], base_macs=100)
    assert row["speedup_b1"] == pytest.approx(2.0) and row["speedup_b64"] == pytest.approx(2.0)
    assert row["export_speedup_b1"] == pytest.approx(1.0)  # 2x faster at 2x fewer MACs
    assert row["latency"]["base_b1_ms"] == 4.0 and row["latency"]["b1_ms"] == 2.0


@pytest.mark.parametrize(
    ("fmt", "layout"),
    [("torchscript", "contiguous"), ("torchscript", "channels_last"), ("torchscript-frozen", "channels_last")],
)
def test_export_reload_gives_the_requested_program(tmp_path: Path, fmt: str, layout: str) -> None:
    import argparse

    import benchmarks.bench_compare as bc

    model = build_model("resnet20").eval()
    args = argparse.Namespace(latency_format=fmt, latency_memory_format=layout)
    (program,) = bc.export_reload(model, Policy(), tmp_path / "e", args).values()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=1e-4, rtol=1e-4)
    frozen = fmt == "torchscript-frozen"
    assert ("batch_norm" in str(program.inlined_graph)) != frozen and bool(list(program.parameters())) != frozen
    if not frozen:
        conv = program.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert conv.is_contiguous() == (layout == "contiguous")


def test_space_overrides_parse_toml_values() -> None:
    from benchmarks.bench_compare import space_overrides

    assert space_overrides(["decomposition=['none']", "rank_ratio = [0.2, 0.6]"]) == {
        "decomposition": ["none"],
        "rank_ratio": [0.2, 0.6],
    }
    with pytest.raises(SlimError, match="expected KEY=VALUE"):
        space_overrides(["decomposition"])
    with pytest.raises(SlimError, match="not a TOML value"):
        space_overrides(["rank_ratio=[0.2,"])


def test_verdict_over_several_search_seeds_uses_their_mean() -> None:
    import benchmarks.bench_compare as bc

    def row(method: str, acc: float, **kw: object) -> dict:
        return {"method": method, "test_acc": acc, "export_speedup_b1": 0.7, "export_speedup_b64": 0.6} | kw

    bud = {"budget": 0.5, "rows": [
        row("tp_global", 0.66), row("fpgm", 0.63),
        row("slimsearch", 0.70, search_seed=0, search_top1_test_acc=0.71, rerank=[{}, {}]),
        row("slimsearch", 0.64, search_seed=1, search_top1_test_acc=0.64, rerank=[{}, {}]),
    ]}  # fmt: skip
    res = {"references": [{"method": "baseline+ft", "test_acc": 0.87}]}
    v = bc.verdict(res, bud)
    assert v["search_seeds"]["n"] == 2 and v["search_seeds"]["test_acc_mean"] == pytest.approx(0.67)
    assert v["search_top1"]["test_acc_mean"] == pytest.approx(0.675)
    x = v["vs_best_baseline"]
    assert x["best"] == "tp_global" and x["gap_pt"] == pytest.approx(1.0) and x["met"]
    assert x["per_seed_gap_pt"] == pytest.approx([4.0, -2.0])
    assert v["vs_baseline_ft"]["gap_pt"] == pytest.approx(20.0) and not v["vs_baseline_ft"]["met"]
    one = bc.verdict(res, bud | {"rows": bud["rows"][:3]})
    assert "search_seeds" not in one and "per_seed_gap_pt" not in one["vs_best_baseline"]
    assert one["vs_best_baseline"]["gap_pt"] == pytest.approx(4.0)


def test_allocation_policy_reproduces_tp_global_counts_with_our_filters(resnet20: nn.Module) -> None:
    """The ``tp`` seed: TP global's kept-filter count on every conv, filters chosen by our criterion."""
    pruned = tp_prune(resnet20, "tp_global", 0.45, SHAPE)
    counts = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    policy = allocation_policy(resnet20, pruned, "fpgm")
    assert set(policy.layers) <= set(inner_leaders(resnet20, SHAPE)) and policy.layers
    assert {lp.criterion for lp in policy.layers.values()} == {"fpgm"}
    ours = apply_policy(resnet20, policy, input_shape=SHAPE)
    assert {n: m.out_channels for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)} == counts
    assert count_cost(ours, SHAPE).macs == count_cost(pruned, SHAPE).macs
    assert len({round(lp.prune_rate, 2) for lp in policy.layers.values()}) > 1  # global: rates differ by layer


def test_header_names_paper_settings_only_when_a_paper_strategy_ran() -> None:
    from benchmarks.bench_compare import paper_note

    s = {"abshpc_epsilon": 0.005, "abshpc_resolution": 0, "mtd_tol": 0.01, "ga_pop": 6, "ga_generations": 3,
         "scan_rates": "0.3,0.6", "candidates": "tp_global,fpgm,slimsearch", "study_seeds": "uniform,tp"}  # fmt: skip
    assert paper_note(s) == ""
    assert "ABSHPC eps 0.005 resolution one filter" in paper_note({**s, "candidates": "tp_l1,abshpc"})
    assert "GA pop 6 gens 3" in paper_note({**s, "study_seeds": "uniform,methods"})


def test_export_reload_auto_gives_both_layouts(tmp_path: Path) -> None:
    import argparse

    import benchmarks.bench_compare as bc

    model = build_model("resnet20").eval()
    args = argparse.Namespace(latency_format="torchscript", latency_memory_format="auto")
    programs = bc.export_reload(model, Policy(), tmp_path / "e", args)
    assert sorted(programs) == ["channels_last", "contiguous"]
    assert programs["channels_last"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert programs["contiguous"].conv1.weight.is_contiguous()


def test_retime_rebuilds_each_rows_network() -> None:
    """--retime rebuilds what every row measured: its policy, Torch-Pruning at its ratio, or the unpruned
    network; a row it cannot rebuild is a clear error."""
    from slimsearch.core.cost import count_cost

    import benchmarks.bench_compare as bc

    base = build_model("resnet20").eval()
    settings = {"seed": 0, "tp_max_ratio": 0.9}
    policy = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5)})
    model, got = bc.rebuild(base, {"method": "fpgm", "policy": policy.to_dict()}, settings)
    assert got == policy and model.layer1[0].conv1.out_channels == 8
    model, got = bc.rebuild(base, {"method": "tp_global", "ratio": 0.5}, settings)
    tp = bc.tp_prune(base, "tp_global", 0.5, SHAPE, max_ratio=0.9)
    assert got is None and count_cost(model, SHAPE).macs == count_cost(tp, SHAPE).macs < count_cost(base, SHAPE).macs
    model, got = bc.rebuild(base, {"method": "baseline+ft"}, settings)
    assert count_cost(model, SHAPE).macs == count_cost(base, SHAPE).macs
    with pytest.raises(SlimError, match="cannot rebuild row 'mystery'"):
        bc.rebuild(base, {"method": "mystery"}, settings)
