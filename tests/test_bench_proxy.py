"""Pure logic of benchmarks/bench_proxy.py and bench_throughput.py: statistics, the default's choice, time split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tomllib

from benchmarks.bench_proxy import bootstrap_ci, choose_default, regret_at_1, spearman, summarise
from benchmarks.bench_throughput import study_toml, time_split
from benchmarks.common import parse_evaluator


def test_spearman_monotone_reversed_and_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4) -> Pearson of the ranks
    expected = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_ci_brackets_rho_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    b = a + 0.5 * rng.normal(size=40)
    lo, hi = bootstrap_ci(a, b, n=500, seed=3)
    assert lo < spearman(a, b) < hi <= 1.0
    assert (lo, hi) == bootstrap_ci(a, b, n=500, seed=3)
    assert bootstrap_ci([1, 2, 3, 4], [1, 2, 3, 4], n=200) == (1.0, 1.0)


def test_regret_at_1() -> None:
    assert regret_at_1([0.1, 0.9, 0.5], [0.7, 0.6, 0.8]) == pytest.approx(0.2)
    assert regret_at_1([0.1, 0.2, 0.9], [0.7, 0.6, 0.8]) == 0.0


def test_choose_default_cheapest_above_threshold_never_reference() -> None:
    rows = [
        {"evaluator": "proxy", "rho": 0.7, "mean_s": 5.0},
        {"evaluator": "finetune-30", "rho": 0.9, "mean_s": 40.0},
        {"evaluator": "finetune-10", "rho": 0.85, "mean_s": 15.0},
        {"evaluator": "macs", "rho": 0.95, "mean_s": 0.1, "reference": True},
    ]
    assert choose_default(rows, 0.8)["evaluator"] == "finetune-10"
    assert choose_default(rows, 0.6)["evaluator"] == "proxy"
    assert choose_default(rows, 0.99) is None
    assert choose_default([{"evaluator": "proxy", "rho": float("nan"), "mean_s": 1.0}]) is None


def test_summarise_rows_and_choice() -> None:
    final = [0.5, 0.6, 0.7, 0.8]
    records = [
        {"final": {"acc": f}, "macs_ratio": 0.5 - 0.01 * i, "sample_s": 0.1,
         "scores": {"proxy": {"val_acc": [0.4, 0.3, 0.5, 0.6][i], "seconds": 2.0},
                    "finetune-5": {"val_acc": f - 0.05, "seconds": 6.0}}}
        for i, f in enumerate(final)
    ]  # fmt: skip
    rows = {r["evaluator"]: r for r in summarise(records, ["proxy", "finetune-5"], threshold=0.9, boot=0)}
    assert rows["finetune-5"]["rho"] == pytest.approx(1.0)
    assert rows["proxy"]["rho"] == pytest.approx(0.8)
    assert rows["macs"]["reference"] and rows["macs"]["rho"] == pytest.approx(1.0)  # fewer MACs here = better
    assert [n for n, r in rows.items() if r["chosen"]] == ["finetune-5"]
    assert rows["proxy"]["mean_s"] == 2.0 and rows["finetune-5"]["regret_at_1"] == 0.0


def test_parse_evaluator_and_study_toml_round_trip() -> None:
    assert parse_evaluator("proxy") == ("proxy", {"kind": "proxy"})
    assert parse_evaluator("finetune:30") == ("finetune-30", {"kind": "finetune", "steps": 30})
    for bad in ("finetune", "finetune:0", "proxy:3", "kd"):
        with pytest.raises(SystemExit):
            parse_evaluator(bad)
    tables = {"study": {"name": "x", "objectives": ["val_acc:max"], "n_trials": 3},
              "space": {"prune_rate": [0.0, 0.8], "rate_step": 0.05, "monotone": False, "root": 'a "b"'}}  # fmt: skip
    assert tomllib.loads(study_toml(tables)) == tables


def test_time_split_storage_loop_and_overhead() -> None:
    def rec(worker: int, start: float, end: float, status: str = "ok", wall: float = 9.0) -> dict:
        m = {"apply_s": 0.5, "cost_s": 0.5, "train_s": 5.0, "eval_s": 3.0, "wall_s": wall}
        if status != "ok":
            m = {"apply_s": 0.5, "cost_s": 0.5, "train_s": 0.0, "eval_s": 0.0, "wall_s": 1.0}
        return {"worker": worker, "start": start, "end": end, "status": status, "metrics": m}

    trials = [rec(1, 100.0, 110.0), rec(1, 111.0, 121.0), rec(2, 100.5, 102.0, "infeasible"), rec(2, 102.5, 112.5)]
    s = time_split(trials, t_launch=90.0, t_end=125.0)
    assert s["trials"] == 4 and s["ok"] == 3 and s["workers_seen"] == 2
    assert s["span_s"] == pytest.approx(21.0) and s["startup_s"] == pytest.approx(10.0)
    assert s["trials_per_hour"] == pytest.approx(3600 * 4 / 21.0)
    assert s["trials_per_hour_e2e"] == pytest.approx(3600 * 4 / 35.0)
    f = s["feasible"]
    assert f["n"] == 3
    assert f["mean_s"]["storage"] == pytest.approx(1.0)  # 10 s in Optuna, 9 s in the evaluator
    assert f["mean_s"]["loop"] == pytest.approx((0 + 1.0 + 0.5) / 3)  # gaps to the same worker's previous trial
    # overhead = apply + cost + storage + loop over everything
    total = 3 * (0.5 + 0.5 + 5 + 3 + 1) + 1.5
    assert f["overhead_pct"] == pytest.approx(100 * (3 * (0.5 + 0.5 + 1) + 1.5) / total)
    a = s["all"]
    assert a["n"] == 4 and a["overhead_pct"] > f["overhead_pct"]  # the infeasible trial is all overhead
    # evaluator time outside its four phases (a fresh process's first imports) is "other", not storage
    slow = rec(1, 100.0, 110.0, wall=9.5)
    g = time_split([slow], t_launch=100.0, t_end=110.0)["feasible"]["mean_s"]
    assert g["other"] == pytest.approx(0.5) and g["storage"] == pytest.approx(0.5)
    # fitting a sample onto the MACs bound happens before the evaluator: its own phase, not storage
    fitted = rec(1, 100.0, 110.0)
    fitted["metrics"]["fit_s"] = 0.25
    h = time_split([fitted], t_launch=100.0, t_end=110.0)["feasible"]
    assert h["mean_s"]["fit"] == pytest.approx(0.25) and h["mean_s"]["storage"] == pytest.approx(0.75)
    assert h["overhead_pct"] == pytest.approx(100 * (0.25 + 0.5 + 0.5 + 0.75) / 10)


def test_sample_policies_fit_scales_samples_onto_a_deep_bound() -> None:
    """At a 30 % bound rejection sampling keeps < 1 % of the samples (27 of 6000 on ResNet-20); with ``fit`` every
    sample is scaled onto the bound, as a search trial's is."""
    from slimsearch.core.budget import policy_macs
    from slimsearch.core.cost import count_cost
    from slimsearch.core.models import build_model
    from slimsearch.spaces.space import SearchSpace, SpaceConfig

    from benchmarks.bench_proxy import sample_policies

    model = build_model("resnet20").eval()
    shape = (1, 3, 32, 32)
    base = count_cost(model, shape).macs
    space = SearchSpace.build(
        # block-inner convs only: the residual streams' few kept filters (2 of 16 at rate 0.9) make the fit coarse
        model,
        SpaceConfig.from_dict({"prune_rate": [0.0, 0.9], "decomposition": ["none"], "coupled": False}),
        shape,
    )
    out = sample_policies(model, space, 5, 0.3, base, seed=0, log=lambda _: None, fit=True)
    assert len(out) == 5 and len({r["policy"].hash for r in out}) == 5
    for r in out:
        assert r["macs_ratio"] <= 0.3 and r["macs_ratio"] == pytest.approx(0.3, abs=0.02)
        assert r["macs_ratio"] == policy_macs(model, r["policy"], shape) / base
