"""evaluators/: FLOPs gate before training, proxy / fine-tune scores, failures, cache, reports."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import slimsearch.core.apply
import slimsearch.core.cost
import slimsearch.core.decompose
import slimsearch.core.train
import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.evaluators.cache import ResultCache
from slimsearch.evaluators.config import EvaluatorConfig
from slimsearch.evaluators.context import EvalContext
from slimsearch.evaluators.evaluate import TIMES, EvalResult, evaluate
from slimsearch.spaces.config import SpaceConfig
from slimsearch.spaces.space import SearchSpace
from toy import toy_context

core = slimsearch.core  # the modules above, patched by attribute in the tests

PROXY = EvaluatorConfig(bn_batches=3, batch_size=64)
TUNE = EvaluatorConfig(kind="finetune", steps=30, batch_size=64, lr=0.05, bn_batches=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, and pool workers run single-threaded too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctx(one_thread: None) -> EvalContext:
    return toy_context()  # SmallCNN (width 16) trained 100 steps on digits: ~96 % val accuracy


@pytest.fixture(scope="module")
def space(ctx: EvalContext) -> SearchSpace:
    return SearchSpace.build(ctx.model, SpaceConfig(decomposition=("none", "tucker")), ctx.input_shape)


def fresh(ctx: EvalContext, **kw: object) -> EvalContext:
    """Same model and data, own (empty) cache; keyword overrides e.g. max_macs."""
    return dataclasses.replace(ctx, **{"cache": ResultCache(), **kw})


def uniform(ctx: EvalContext, rate: float, **kw: object) -> Policy:
    names = ["features.0", "features.3", "features.7", "features.10"]
    return Policy({n: LayerPolicy(prune_rate=rate, **kw) for n in names})  # type: ignore[arg-type]


def test_config_from_dict_and_key() -> None:
    cfg = EvaluatorConfig.from_dict({"kind": "finetune", "steps": 50, "lr": 1, "kd": True, "workers": 2})
    assert cfg == EvaluatorConfig(kind="finetune", steps=50, lr=1.0, kd=True, workers=2)
    assert cfg.key == dataclasses.replace(cfg, workers=7, ray_address="auto").key  # where it runs: not in the key
    assert cfg.key != dataclasses.replace(cfg, seed=1).key
    assert PROXY.key == dataclasses.replace(PROXY, steps=999, lr=0.5).key  # the proxy never fine-tunes
    with pytest.raises(SlimError, match=r"\[evaluator\] kind: unknown value 'full'; allowed: proxy, finetune"):
        EvaluatorConfig.from_dict({"kind": "full"})
    with pytest.raises(SlimError, match=r"\[evaluator\]: unknown key 'epochs'"):
        EvaluatorConfig.from_dict({"epochs": 3})
    with pytest.raises(SlimError, match=r"steps: must be in \[1, 1000000\], got 0"):
        EvaluatorConfig.from_dict({"steps": 0})


def test_infeasible_is_rejected_before_any_training(ctx: EvalContext, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("training/decomposition must not run for an infeasible candidate")

    for name in ("finetune", "recalibrate_bn", "evaluate"):
        monkeypatch.setattr(core.train, name, boom)
    monkeypatch.setattr(core.apply, "decompose_conv", boom)
    bounded = fresh(ctx, max_macs=0.5 * ctx.base.macs)
    res = evaluate(bounded, TUNE, uniform(ctx, 0.1))
    assert res.status == "infeasible" and "exceed the bound" in res.reason
    assert res.metrics["macs"] > bounded.max_macs and res.metrics["macs_violation"] == pytest.approx(
        res.metrics["macs"] - bounded.max_macs
    )
    assert res.metrics["train_s"] == 0.0 and "val_acc" not in res.metrics
    # With a decomposition the gate runs on the structure alone: nothing is factorised.
    tucker = Policy({n: LayerPolicy(decomposition="tucker", rank_ratio=0.9) for n in ("features.3", "features.7")})
    res = evaluate(bounded, TUNE, tucker)
    assert res.status == "infeasible" and res.metrics["macs"] > bounded.max_macs


def test_an_import_error_is_raised_not_recorded_as_the_candidates_failure(
    ctx: EvalContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: object, **k: object) -> None:
        raise ImportError("cannot import name 'x' from 'slimsearch.core.apply'")

    monkeypatch.setattr(core.train, "recalibrate_bn", broken)
    c = fresh(ctx)
    with pytest.raises(ImportError, match="cannot import name"):
        evaluate(c, PROXY, uniform(ctx, 0.2))
    monkeypatch.undo()
    res = evaluate(c, PROXY, uniform(ctx, 0.2))  # nothing was cached: evaluated afresh once the install is whole
    assert res.status == "ok" and not res.cached


def test_structure_gate_counts_the_same_macs_as_the_real_model(
    ctx: EvalContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = Policy({"features.3": LayerPolicy(0.25, decomposition="tucker", rank_ratio=0.5),
                  "features.7": LayerPolicy(0.0, decomposition="cp", rank_ratio=0.3)})  # fmt: skip
    roomy = fresh(ctx, max_macs=float(ctx.base.macs))

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a feasible policy is gated by its MACs table, not by building its structure")

    monkeypatch.setattr(core.apply, "structure_only", boom)
    res = evaluate(roomy, PROXY, pol)
    real = core.cost.count_cost(core.apply.apply_policy(ctx.model, pol, input_shape=ctx.input_shape), ctx.input_shape)
    assert res.status == "ok" and res.metrics["macs"] == real.macs < ctx.base.macs


def test_proxy_identity_equals_recalibrated_baseline(ctx: EvalContext) -> None:
    res = evaluate(fresh(ctx), PROXY, Policy())
    base = core.train.recalibrate_bn(copy.deepcopy(ctx.model), ctx.splits.train, 3, 64, seed=0)
    assert res.status == "ok"
    assert res.metrics["val_acc"] == core.train.evaluate(base, ctx.splits.val)
    assert res.metrics["macs_ratio"] == 1.0 and res.metrics["params_ratio"] == 1.0
    assert set(TIMES) <= set(res.metrics) and res.metrics["wall_s"] >= res.metrics["train_s"]
    assert res.metrics["val_acc"] > 0.85  # the toy baseline is a real classifier


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_measured_latency_times_the_exported_program(
    ctx: EvalContext, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """``latency_ms`` is the time of what the export ships (TorchScript, its conv layout), not the eager module."""
    timed: list[tuple[torch.nn.Module, int]] = []
    real = core.cost.measure_latency

    def spy(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int = 1, **kw: object) -> object:
        timed.append((model, batch_size))
        return real(model, shape, batch_size=batch_size, repeats=2, warmup=1)

    monkeypatch.setattr(core.cost, "measure_latency", spy)
    cfg = dataclasses.replace(PROXY, measure_latency=True, latency_batch=3)
    res = evaluate(fresh(ctx, latency_memory_format=layout), cfg, uniform(ctx, 0.5))
    assert res.status == "ok" and res.metrics["latency_ms"] > 0
    [(program, batch)] = timed
    assert isinstance(program, torch.jit.ScriptModule) and batch == 3
    weights = [p for n, p in program.named_parameters() if p.dim() == 4]
    assert [w.shape[0] for w in weights] == [8, 8, 16, 16]  # the pruned network, half of 16/16/32/32 filters
    want = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert all(w.is_contiguous(memory_format=want) for w in weights)


def test_finetune_is_deterministic_and_beats_proxy_on_damaged_model(ctx: EvalContext) -> None:
    damaged = uniform(ctx, 0.6)
    proxy = evaluate(fresh(ctx), PROXY, damaged)
    a = evaluate(fresh(ctx), TUNE, damaged)
    b = evaluate(fresh(ctx), TUNE, damaged)
    assert proxy.status == a.status == "ok"
    assert a.metrics["val_acc"] == b.metrics["val_acc"]  # same policy, same seed
    assert a.metrics["val_acc"] >= proxy.metrics["val_acc"] + 0.1
    assert a.metrics["macs_ratio"] < 0.25


def test_nan_loss_and_errors_are_failures(ctx: EvalContext, monkeypatch: pytest.MonkeyPatch) -> None:
    res = evaluate(fresh(ctx), dataclasses.replace(TUNE, lr=1e30), uniform(ctx, 0.3))
    assert res.status == "fail" and "loss is nan" in res.reason and "\n" not in res.reason
    assert res.metrics["macs"] > 0  # the cost is known even for a failed candidate
    res = evaluate(fresh(ctx), PROXY, Policy({"features.99": LayerPolicy(0.5)}))
    assert res.status == "fail" and "features.99" in res.reason and "is not a Conv2d" in res.reason

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("boom\n  second line")

    monkeypatch.setattr(core.cost, "count_cost", broken)
    res = evaluate(fresh(ctx), PROXY, uniform(ctx, 0.2))
    assert (res.status, res.reason) == ("fail", "RuntimeError: boom second line")


def test_cache_hit_skips_apply_policy(ctx: EvalContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    real = core.apply.apply_policy

    def counting(*a: object, **k: object) -> object:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(core.apply, "apply_policy", counting)
    pol = uniform(ctx, 0.25)
    for where in (None, tmp_path / "results.jsonl", tmp_path / "results"):
        calls.clear()
        c = fresh(ctx, cache=ResultCache(where))
        first, second = evaluate(c, PROXY, pol), evaluate(c, PROXY, pol)
        assert (len(calls), first.cached, second.cached) == (1, False, True)
        assert second.metrics == first.metrics and second.policy_hash == pol.hash
        assert evaluate(c, dataclasses.replace(PROXY, seed=1), pol).cached is False  # another config: a miss
        assert len(calls) == 2
        if where is not None:  # a new process reading the same file/folder is served from disk
            again = evaluate(fresh(ctx, cache=ResultCache(where)), PROXY, pol)
            assert again.cached and again.metrics == first.metrics and len(calls) == 2
    other = fresh(ctx, max_macs=float(ctx.base.macs))  # another bound: another fingerprint
    assert other.fingerprint != fresh(ctx).fingerprint


def test_policies_that_build_the_same_network_share_one_evaluation(
    ctx: EvalContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rates 0.25 and 0.26 (and a mix of them) remove the same filters of every layer (floor of 0.25 / 0.26 x
    its width): distinct policies, one network, scored once per evaluator config."""
    calls = []
    real = core.train.recalibrate_bn
    monkeypatch.setattr(core.train, "recalibrate_bn", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = uniform(ctx, 0.25), uniform(ctx, 0.26)
    c = b.with_layer("features.0", LayerPolicy(prune_rate=0.25, criterion="l1", clusters=None))
    assert len({a.hash, b.hash}) == 2
    cx = fresh(ctx)
    first, second, third = (evaluate(cx, PROXY, p) for p in (a, b, c))
    assert len(calls) == 1 and not first.cached and second.cached and third.cached
    assert first.model_digest and first.model_digest == second.model_digest == third.model_digest
    assert second.policy_hash == b.hash and second.metrics["val_acc"] == first.metrics["val_acc"]
    assert second.metrics["eval_s"] == 0.0 < first.metrics["eval_s"]  # this call's time split: nothing scored
    other = evaluate(cx, PROXY, uniform(ctx, 0.5))  # another network: evaluated
    assert not other.cached and other.model_digest != first.model_digest and len(calls) == 2
    assert not evaluate(cx, dataclasses.replace(PROXY, seed=1), b).cached  # another config: evaluated
    assert len(calls) == 3
    alone = evaluate(cx, PROXY, a, cache=None)  # no cache: the digest is still recorded, nothing reused
    assert alone.model_digest == first.model_digest and not alone.cached and len(calls) == 4
    assert EvalResult.from_dict(first.to_dict()).model_digest == first.model_digest
    infeasible = evaluate(fresh(ctx, max_macs=1.0), PROXY, a)
    assert infeasible.status == "infeasible" and infeasible.model_digest == first.model_digest


def test_report_pruning(ctx: EvalContext) -> None:
    seen = []

    def report(step: int, acc: float) -> bool:
        seen.append((step, acc))
        return step >= 20

    cfg = dataclasses.replace(TUNE, steps=40, eval_every=10)
    res = evaluate(fresh(ctx), cfg, uniform(ctx, 0.5), report=report)
    assert res.status == "pruned" and "step 20" in res.reason
    assert [s for s, _ in res.intermediate] == [10, 20] and res.intermediate == seen
    assert res.metrics["val_acc"] == seen[-1][1]
    full = evaluate(fresh(ctx), cfg, uniform(ctx, 0.5))  # no pruner: all four evaluations, status ok
    assert full.status == "ok" and [s for s, _ in full.intermediate] == [10, 20, 30, 40]
    assert full.intermediate[:2] == seen  # the same run up to the stop
    assert EvalResult.from_dict(full.to_dict()).intermediate == full.intermediate


def test_space_suggestions_evaluate(ctx: EvalContext, space: SearchSpace) -> None:
    """A policy sampled from the space applies and scores (tucker included)."""
    params = {p.name: (p.low + p.high) / 2 if p.kind == "float" else p.choices[-1] for p in space.params}
    res = evaluate(fresh(ctx), PROXY, space.policy_from_params(params))
    assert res.status == "ok" and 0.0 <= res.metrics["val_acc"] <= 1.0 and res.metrics["macs_ratio"] < 0.7
