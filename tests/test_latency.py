"""core/latency.py: predicted latency of a policy from a table of layer times, and the latency bound of a search.

Timing is replaced by a deterministic stand-in (MACs plus a cost per module) wherever a test checks numbers, so
nothing here asserts on the wall clock: the stand-in applied to the real compressed model must equal the
table's prediction, which checks that the table puts every layer at the shape the policy leaves it.
"""

from __future__ import annotations

import json
import random
import weakref
from pathlib import Path

import pytest
from slimsearch.core.apply import apply_policy
from slimsearch.core.cost import count_cost
from slimsearch.core.errors import SlimError
from slimsearch.core.graph import model_graph
from slimsearch.core.latency import LatencyTable, latency_table, policy_latency
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn

R20 = (1, 3, 32, 32)


def fake_ms(module: nn.Module, shape: tuple[int, ...], batch: int) -> float:
    """A deterministic 'latency': MACs at ``batch``, 0.01 ms per conv/linear and 0.1 ms per other leaf module."""
    leaves = [m for m in module.modules() if not list(m.children())]
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in leaves)
    return 1e-6 * batch * count_cost(module, shape).macs + 0.01 * layers + 0.1 * (len(leaves) - layers)


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def _time(self: LatencyTable, module: nn.Module, shape: tuple[int, ...], rounds: int = 1) -> float:
        return fake_ms(module, shape, self.batch_size)

    monkeypatch.setattr(LatencyTable, "_time", _time)
    monkeypatch.setattr("slimsearch.core.latency._TABLES", weakref.WeakKeyDictionary())  # no table of real timings


def _random_policy(model: nn.Module, rng: random.Random) -> Policy:
    from slimsearch.core.budget import prunable_leaders
    from slimsearch.core.graph import compressible_layers

    layers: dict[str, LayerPolicy] = {}
    for name in prunable_leaders(model, R20):
        if rng.random() < 0.8:
            layers[name] = LayerPolicy(prune_rate=round(rng.uniform(0.0, 0.8), 2), criterion="l1")
    for li in compressible_layers(model, R20):
        if li.decomposable and li.in_channels > 3 and li.name not in layers and rng.random() < 0.3:
            dec = "cp" if li.in_channels == 16 else "tucker"  # CP-ALS on the wider layers takes seconds
            layers[li.name] = LayerPolicy(decomposition=dec, rank_ratio=round(rng.uniform(0.2, 0.9), 2))
    return Policy(layers)


@pytest.mark.parametrize("batch", [1, 4])
def test_prediction_is_the_timing_of_the_built_model(fake_timing: None, batch: int) -> None:
    model = build_model("resnet20").eval()
    table = LatencyTable(model, R20, batch_size=batch, mode="eager")
    base = fake_ms(model, R20, batch)
    assert table.base_ms == pytest.approx(base)
    leaves = [m for m in model.modules() if not list(m.children())]
    others = sum(not isinstance(m, (nn.Conv2d, nn.Linear)) for m in leaves)  # BN, option-A shortcuts
    assert table.other_ms == pytest.approx(0.1 * others)
    assert table.predict(model, Policy()) == pytest.approx(base)
    rng = random.Random(batch)
    for _ in range(3):
        policy = _random_policy(model, rng)
        built = apply_policy(model, policy, input_shape=R20)
        assert table.predict(model, policy) == pytest.approx(fake_ms(built, R20, batch), rel=1e-9), policy.summary()
    size = table.size
    table.predict(model, policy)
    assert table.size == size  # memoised per shape: a repeated policy times nothing new


def test_evbmf_ranks_are_not_predicted(fake_timing: None) -> None:
    model = build_model("resnet20").eval()
    table = LatencyTable(model, R20)
    assert table.predict(model, Policy({"layer2.0.conv2": LayerPolicy(decomposition="tucker")})) is None


def test_real_timing_table_is_consistent() -> None:
    """Real timings (no numbers asserted on them): the baseline's prediction is its measurement, the
    calibration stays in its sane range, and the table is shared per model, batch and mode."""
    model = build_model("smallcnn", 10, 1).eval()
    shape = (1, 1, 8, 8)
    table = latency_table(model, shape, batch_size=2)
    assert table.mode == "torchscript" and table.base_ms > 0 and table.other_ms > -0.5 * table.base_ms
    assert 0.5 <= table.scale <= 2.0
    pred = table.predict(model, Policy())
    assert pred >= table.base_ms - 1e-9
    if table.other_ms != 0:  # a calibrated table (or the uncalibrated rest above 0)
        assert pred == pytest.approx(table.base_ms)
    assert latency_table(model, shape, batch_size=2) is table
    assert latency_table(model, shape, batch_size=2, mode="eager") is not table
    assert policy_latency(model, Policy(), shape, batch_size=2) == pred


def test_bad_table_settings() -> None:
    model = build_model("smallcnn", 10, 1)
    with pytest.raises(SlimError, match="mode must be one of torchscript, onnxruntime, eager"):
        LatencyTable(model, (1, 1, 8, 8), mode="onnx")
    with pytest.raises(SlimError, match="batch_size, threads, repeats >= 1"):
        LatencyTable(model, (1, 1, 8, 8), batch_size=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_table_times_programs_in_the_exports_memory_format(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every program the table times (layers, baseline, calibration model) has its conv weights in the table's
    memory format, as ``core.export`` ships them; a non-contiguous table is stored under its own name and
    settings, so it never serves (or is served by) a contiguous one."""
    import torch
    from slimsearch.core.cost import LatencyResult

    seen: list[tuple[bool, bool]] = []  # (NHWC, NCHW) strides of every timed conv weight

    def fake(program: nn.Module, shape: tuple[int, ...], batch: int, threads: int, **kw: object) -> LatencyResult:
        weights = [p for p in program.parameters() if p.dim() == 4]
        seen.extend((w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous()) for w in weights)
        return LatencyResult(median_ms=1.0 + len(weights), p90_ms=1.0, batch_size=batch, threads=threads)

    monkeypatch.setattr("slimsearch.core.latency.measure_latency", fake)
    monkeypatch.setattr("slimsearch.core.latency._TABLES", weakref.WeakKeyDictionary())
    model = build_model("smallcnn", 10, 1).eval()
    table = latency_table(model, (1, 1, 8, 8), folder=tmp_path, memory_format=layout)
    table.predict(model, Policy({"features.0": LayerPolicy(prune_rate=0.5)}))
    nhwc = layout == "channels_last"  # 1-channel or 1x1 weights are both; every weight is the layout's, some only
    assert table.memory_format == layout and len(seen) > 3 and all(s[1 - nhwc] for s in seen)
    assert any(not s[nhwc] for s in seen)
    name = "latency_b1_t1_torchscript" + ("_channels_last" if layout == "channels_last" else "") + ".json"
    stored = json.loads((tmp_path / name).read_text())["settings"]
    assert stored.get("memory_format") == (None if layout == "contiguous" else layout)
    assert next(model.parameters()).is_contiguous()  # the caller's model is untouched
    with pytest.raises(SlimError, match="memory_format must be one of contiguous, channels_last, got 'nhwc'"):
        LatencyTable(model, (1, 1, 8, 8), memory_format="nhwc")


def test_a_study_predicts_latency_in_its_export_memory_format(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, tmp_cwd: None
) -> None:
    from helpers import write_study
    from slimsearch.evaluators.context import build_context
    from slimsearch.search.context import build_study_context
    from slimsearch.search.study import load_study

    p = write_study(tmp_path, baseline_ckpt, constraint="max_latency_ratio = 0.9")
    p.write_text(p.read_text() + '\n[export]\nmemory_format = "channels_last"\n')
    ctx = build_study_context(load_study(p))
    assert ctx.eval_ctx.latency_memory_format == "channels_last"
    assert ctx.eval_ctx.latency_table().memory_format == "channels_last"
    # a result cached for a contiguous prediction is never served to a channels_last one
    plain = build_context(ctx.model, ctx.splits, ctx.input_shape, max_latency_ratio=0.9, score_baseline=False)
    assert plain.latency_memory_format == "contiguous" and plain.fingerprint != ctx.eval_ctx.fingerprint
    with pytest.raises(SlimError, match=r"\[export\] memory_format: expected one of contiguous, channels_last"):
        build_context(ctx.model, ctx.splits, ctx.input_shape, latency_memory_format="NHWC", score_baseline=False)
    # auto exports keep channels_last only where it is faster: the bound predicts the contiguous program
    p.write_text(p.read_text().replace('memory_format = "channels_last"', 'memory_format = "auto"'))
    assert build_study_context(load_study(p)).eval_ctx.latency_memory_format == "contiguous"


def test_evaluate_rejects_a_policy_over_the_latency_bound_before_training(fake_timing: None) -> None:
    from slimsearch.core.data import load_splits
    from slimsearch.evaluators.config import EvaluatorConfig
    from slimsearch.evaluators.context import build_context
    from slimsearch.evaluators.evaluate import evaluate, violations

    model = build_model("smallcnn", 10, 1).eval()
    splits = load_splits("digits", val_size=100)
    shape = (1, 1, 8, 8)
    light = Policy({"features.0": LayerPolicy(prune_rate=0.1)})
    heavy = Policy({"features.0": LayerPolicy(prune_rate=0.7), "features.3": LayerPolicy(prune_rate=0.7)})
    table = LatencyTable(model, shape, mode="torchscript")
    r_light = table.predict(model, light) / table.base_ms
    r_heavy = table.predict(model, heavy) / table.base_ms
    assert r_heavy < r_light < 1.0
    bound = (r_light + r_heavy) / 2
    ctx = build_context(model, splits, shape, max_latency_ratio=bound, score_baseline=False)
    cfg = EvaluatorConfig(kind="finetune", steps=2, batch_size=32, bn_batches=1)
    bad = evaluate(ctx, cfg, light)
    assert bad.status == "infeasible" and bad.reason.startswith("predicted latency")
    assert "% of the baseline's" in bad.reason and "at batch 1" in bad.reason
    assert bad.metrics["train_s"] == 0.0 and bad.metrics["latency_ratio"] == pytest.approx(r_light)
    assert bad.metrics["macs"] == count_cost(apply_policy(model, light, input_shape=shape), shape).macs
    assert violations(bad.metrics, ("latency",))["latency"] > 0
    good = evaluate(ctx, cfg, heavy)
    assert good.status == "ok" and good.metrics["latency_ratio"] == pytest.approx(r_heavy)
    assert violations(good.metrics, ("latency",))["latency"] <= 0
    # the bound is part of the result cache's fingerprint
    other = build_context(model, splits, shape, max_latency_ratio=0.99, score_baseline=False)
    assert other.fingerprint != ctx.fingerprint


def test_bad_latency_bounds_in_build_context() -> None:
    from slimsearch.core.data import load_splits
    from slimsearch.evaluators.context import build_context

    model = build_model("smallcnn", 10, 1)
    splits = load_splits("digits", val_size=100)
    with pytest.raises(SlimError, match=r"max_latency_ratio: must be in \(0, 1\], got 1.5"):
        build_context(model, splits, (1, 1, 8, 8), max_latency_ratio=1.5, score_baseline=False)
    with pytest.raises(SlimError, match=r"latency_batch: must be in \[1, 4096\], got 0"):
        build_context(model, splits, (1, 1, 8, 8), max_latency_ratio=0.5, latency_batch=0, score_baseline=False)


def test_study_with_a_latency_bound_fits_every_trial_onto_it(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MACs and latency bounds together: every sample is scaled onto both (fit = "scale"), both violations
    reach Optuna's constraint-aware sampler, and the predicted latency is recorded per trial."""
    import torch
    from helpers import write_study
    from slimsearch.search.runner import load_optuna_study, open_storage, run_study
    from slimsearch.search.study import load_study

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    constraint = "max_macs_ratio = 0.8\nmax_latency_ratio = 0.5\nlatency_batch = 2"
    cfg = load_study(write_study(tmp_path, baseline_ckpt, n_trials=4, constraint=constraint,
                                 seeds='strategies = ["uniform"]\nuniform_rates = [0.0]'))  # fmt: skip
    assert cfg.constraint.max_latency_ratio == 0.5 and cfg.constraint.latency_batch == 2
    run_study(cfg, progress=False, log=lambda s: None)
    trials = load_optuna_study(cfg, open_storage(cfg, create=False)).get_trials()
    shape = (1, 1, 8, 8)
    arch = build_model("smallcnn", 10, 1).eval()
    base = fake_ms(arch, shape, 2)
    assert len(trials) == 4
    for t in trials:
        ua = t.user_attrs
        assert ua["status"] == "ok", ua.get("reason")
        assert ua["latency_ratio"] <= 0.5 + 1e-9 and ua["macs_ratio"] <= 0.8
        assert len(ua["constraint"]) == 2 and max(ua["constraint"]) <= 0
        built = apply_policy(arch, Policy.from_json(ua["policy"]), input_shape=shape)
        assert ua["latency_pred_ms"] == pytest.approx(fake_ms(built, shape, 2))
        assert ua["latency_ratio"] == pytest.approx(ua["latency_pred_ms"] / base)
    # the unpruned seed was scaled onto the latency bound, below the MACs bound it already met
    assert trials[0].user_attrs["seed"] == "uniform#0" and trials[0].user_attrs["macs_ratio"] < 0.8
    # the table was measured once, before the trials, and stored in the workdir for workers and resumes
    info = load_optuna_study(cfg, open_storage(cfg, create=False)).user_attrs["slimsearch"]["latency"]
    stored = json.loads((cfg.study.workdir / "latency" / "latency_b2_t1_torchscript.json").read_text())
    assert info["base_ms"] == pytest.approx(base) == pytest.approx(stored["base_ms"])
    assert info["bound_ms"] == pytest.approx(0.5 * base) and info["batch"] == 2
    from slimsearch.search.report import study_status

    best = max(trials, key=lambda t: (t.user_attrs["val_acc"], -t.user_attrs["macs"]))
    line = study_status(cfg).text().splitlines()[-1]
    assert line.startswith(f"best trial {best.number}:")
    assert (
        f"latency {best.user_attrs['latency_pred_ms']:.2f} ms predicted ({best.user_attrs['latency_ratio']:.1%})"
        in line
    )


def test_predicted_latency_as_an_objective_reaches_the_report(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``latency_pred_ms:min`` beside val_acc (a latency bound of 1.0 only predicts): the trials' second value
    is the prediction, and the report's Pareto front is non-dominated in accuracy, MACs and predicted latency."""
    import torch
    from helpers import write_study
    from slimsearch.search.report import write_report
    from slimsearch.search.runner import load_optuna_study, open_storage, run_study
    from slimsearch.search.study import load_study

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    p = write_study(tmp_path, baseline_ckpt, n_trials=5, constraint="max_latency_ratio = 1.0",
                    study='objectives = ["val_acc:max", "latency_pred_ms:min"]')  # fmt: skip
    cfg = load_study(p)
    run_study(cfg, progress=False, log=lambda s: None)
    trials = load_optuna_study(cfg, open_storage(cfg, create=False)).get_trials()
    assert len(trials) == 5
    for t in trials:
        assert t.user_attrs["status"] == "ok"
        assert t.values[1] == pytest.approx(t.user_attrs["latency_pred_ms"]) and t.user_attrs["latency_ratio"] <= 1.0
    rep = write_report(cfg)
    assert "latency_pred_ms" in rep.table and not rep.front.empty
    ok = [(t.user_attrs["val_acc"], t.user_attrs["macs"], t.user_attrs["latency_pred_ms"]) for t in trials]
    for _, row in rep.front.iterrows():
        me = (row["val_acc"], row["macs"], row["latency_pred_ms"])
        assert not any(o[0] >= me[0] and o[1] <= me[1] and o[2] <= me[2] and o != me for o in ok)


def test_a_stored_table_is_shared_and_checked(
    fake_timing: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a path the table is stored; another process (here: another table object whose clock runs twice as
    slow) loads it and predicts the same, adds only the shapes it measured itself, and never overwrites a
    stored entry. A corrupt file or one of another architecture is a clear SlimError."""
    model = build_model("resnet20").eval()
    path = tmp_path / "lat.json"
    first = LatencyTable(model, R20, path=path)
    a = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5)})
    b = Policy({"layer3.0.conv1": LayerPolicy(prune_rate=0.25)})
    pa = first.predict(model, a)
    stored = json.loads(path.read_text())
    assert stored["base_ms"] == pytest.approx(first.base_ms) and len(stored["ops"]) == first.size

    def slow(self: LatencyTable, module: nn.Module, shape: tuple[int, ...], rounds: int = 1) -> float:
        return 2 * fake_ms(module, shape, self.batch_size)

    monkeypatch.setattr(LatencyTable, "_time", slow)
    second = LatencyTable(model, R20, path=path)
    assert second.base_ms == first.base_ms and second.predict(model, a) == pytest.approx(pa)
    pb_second = second.predict(model, b)  # new shapes, timed by the slow clock, stored
    pb_first = first.predict(model, b)  # the first table times b itself, then adopts the stored entries
    assert pb_first == pytest.approx(pb_second)
    assert len(json.loads(path.read_text())["ops"]) == second.size == first.size

    path.write_text("{not json")
    with pytest.raises(SlimError, match="corrupt latency table; delete it"):
        LatencyTable(model, R20, path=path)
    other = tmp_path / "other.json"
    LatencyTable(build_model("resnet32").eval(), R20, path=other)
    with pytest.raises(SlimError, match="latency table of another model or timing settings"):
        LatencyTable(model, R20, path=other)
    with pytest.raises(SlimError, match="another model or timing settings"):
        LatencyTable(build_model("resnet32").eval(), R20, batch_size=2, path=other)


def test_export_measures_the_study_latency_bound_on_its_program(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The search only predicts the latency bound; ``slimsearch export`` times the exported program against the
    baseline's at the bound's batch size, records the ratio and says when it breaks the bound (the export is
    still written: the bound was the search's, the measurement is what the user gets)."""
    import torch
    from helpers import write_study
    from slimsearch.core.cost import LatencyResult
    from slimsearch.search.cli import main

    timed: list[tuple[int, int]] = []  # (batch size, conv weights) of every program the export times

    def fake(program: nn.Module, shape: tuple[int, ...], batch_size: int = 1, **kw: object) -> LatencyResult:
        weights = sum(p.numel() for p in program.parameters() if p.dim() == 4)
        timed.append((batch_size, weights))
        return LatencyResult(median_ms=1.0 + batch_size * weights / 1e4, p90_ms=0.0, batch_size=batch_size, threads=1)

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    p = write_study(tmp_path, baseline_ckpt, n_trials=2, constraint="max_macs_ratio = 0.7\nmax_latency_ratio = 0.97\n"
                    "latency_batch = 4", seeds='strategies = ["uniform"]\nuniform_rates = [0.5]')  # fmt: skip
    assert main(["run", str(p), "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("slimsearch.core.cost.measure_latency", fake)
    assert main(["export", str(p), "--trial", "best", "--format", "torchscript", "--out", "e"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    base_w = max(w for _, w in timed)
    mine_w = min(w for b, w in timed if b == 4)
    assert mine_w < base_w and {b for b, _ in timed} == {1, 4}  # batch 1 (speed-up) and the bound's batch
    want = (1.0 + 4 * mine_w / 1e4) / (1.0 + 4 * base_w / 1e4)
    assert m["bound_latency_batch"] == 4 and m["bound_latency_ratio"] == pytest.approx(want)
    assert m["max_latency_ratio"] == 0.97 and m["bound_latency_met"] == (want <= 0.97)
    verdict = "within it" if want <= 0.97 else "EXCEEDS it"
    assert f"latency bound: measured {want:.1%} of the baseline's at batch 4" in out and verdict in out

    monkeypatch.setattr(
        "slimsearch.core.cost.measure_latency", lambda *a, batch_size=1, **k: LatencyResult(2.0, 0.0, 1, 1)
    )
    assert main(["export", str(p), "--trial", "best", "--format", "torchscript", "--out", "f"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert m["bound_latency_ratio"] == 1.0 and m["bound_latency_met"] is False
    assert "measured 100.0% of the baseline's at batch 4" in out and "bound 97.0%: EXCEEDS it" in out
    assert (tmp_path / "f" / "model.torchscript.pt").is_file()


def test_a_corrupt_stored_table_stops_the_run_before_the_storage_is_written(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from helpers import write_study
    from slimsearch.search.cli import main
    from slimsearch.search.study import load_study, sqlite_path

    monkeypatch.chdir(tmp_path)
    p = write_study(tmp_path, baseline_ckpt, constraint="max_latency_ratio = 0.9")
    cfg = load_study(p)
    table = cfg.study.workdir / "latency" / "latency_b1_t1_torchscript.json"
    table.parent.mkdir(parents=True)
    table.write_text('{"ops": 3}')
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and "max_latency_ratio" in err
    assert f"{table}: corrupt latency table; delete it to measure again" in err
    assert not sqlite_path(cfg.study.storage).exists()


def test_warm_times_every_one_group_shape_ahead(fake_timing: None) -> None:
    """After ``warm`` over the prunable groups, prune-only policies need no new measurement when no conv's shape
    depends on two groups (the block-inner convs; a residual stream's convs read one group and write another,
    so such combinations are timed when first met)."""
    from slimsearch.core.budget import prunable_leaders

    model = build_model("resnet20").eval()
    table = LatencyTable(model, R20)
    graph = model_graph(model, R20)
    leaders = [n for n in prunable_leaders(model, R20) if graph.layers[n].group is None]
    assert table.warm(model, [[n] for n in leaders], budget_s=0.0) == 0  # out of time before the first shape
    assert table.warm(model, [[n] for n in leaders], max_rate=0.8) > 0
    size = table.size
    rng = random.Random(3)
    for _ in range(5):
        table.predict(model, Policy({n: LayerPolicy(prune_rate=round(rng.uniform(0.0, 0.8), 2)) for n in leaders}))
    assert table.size == size
    assert table.warm(model, [[n] for n in leaders], max_rate=0.8) == 0


def test_latency_margin_fits_below_the_bound_and_leaves_the_bound_alone(
    fake_timing: None, tmp_path: Path, baseline_ckpt: Path, tmp_cwd: None
) -> None:
    """``[constraint] latency_margin = m``: the latency fit aims at bound x (1 - m), the bound itself stays."""
    from helpers import write_study
    from slimsearch.core.budget import prunable_leaders
    from slimsearch.search.context import build_study_context
    from slimsearch.search.study import load_study

    fitted = {}
    for margin in (0.0, 0.2):
        (tmp_path / str(margin)).mkdir()
        p = write_study(tmp_path / str(margin), baseline_ckpt,
                        constraint=f"max_latency_ratio = 0.6\nlatency_margin = {margin}")  # fmt: skip
        ctx = build_study_context(load_study(p))
        table = ctx.eval_ctx.latency_table()
        full = Policy({n: LayerPolicy(prune_rate=0.0) for n in prunable_leaders(ctx.model, ctx.input_shape)})
        fitted[margin] = table.predict(ctx.model, ctx.fit(full)) / table.base_ms
        assert ctx.latency_info()["bound_ms"] == pytest.approx(0.6 * table.base_ms)  # the bound is unchanged
    assert fitted[0.0] <= 0.6 + 1e-9 and fitted[0.2] <= 0.6 * 0.8 + 1e-9
    assert fitted[0.2] < fitted[0.0] - 0.05  # the margin is what moved it
    (tmp_path / "alone").mkdir()
    alone = write_study(tmp_path / "alone", baseline_ckpt, constraint="max_macs_ratio = 0.6\nlatency_margin = 0.1")
    with pytest.raises(SlimError, match=r"\[constraint\] latency_margin: needs max_latency_ratio"):
        load_study(alone)
