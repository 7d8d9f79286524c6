"""`slimsearch method` (each paper method alone on a study) and seeds that keep their exact policy.

Tiny study: smallcnn on digits, proxy evaluator, MACs bound 70 %; method options chosen to keep the
number of evaluator calls small.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import trials_of, write_study
from slimsearch.core.apply import apply_policy
from slimsearch.core.cost import count_cost
from slimsearch.core.models import build_model, load_checkpoint
from slimsearch.core.policy import Policy
from slimsearch.search.cli import main
from slimsearch.search.study import load_study

BASE_MACS = 1_493_632
OPTIONS = {
    "abshpc": ["--epsilon", "0.03", "--set", "rate_resolution=0.2"],
    "mtd": ["--tol", "0.05", "--set", "cp_rank=0.5", "--set", "tucker_ranks=0.5"],
    "ga": ["--rates", "0.5", "--set", "pop=8", "--set", "generations=3", "--set", "samples=64"],
    "distfit": ["--tol", "0.05", "--set", "scan_rates=[0.25, 0.5]"],
}


pytestmark = pytest.mark.usefixtures("tmp_cwd")  # conftest: the test's temp folder, one torch thread


def _study(tmp: Path, ckpt: Path, **kw) -> Path:  # noqa: ANN003
    return write_study(tmp, ckpt, space='decomposition = ["none", "tucker"]', **kw)


def _base(ckpt: Path) -> torch.nn.Module:
    return load_checkpoint(build_model("smallcnn", num_classes=10, in_channels=1), ckpt).eval()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("slimsearch: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("name", ["abshpc", "mtd", "ga", "distfit"])
def test_method_command_writes_a_consistent_result(
    name: str, tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _study(tmp_path, baseline_ckpt)
    auto = name == "mtd"  # one method exports with memory_format = "auto": the faster layout, as measured
    if auto:
        study.write_text(study.read_text() + '\n[export]\nmemory_format = "auto"\n')
    code = main(["method", name, str(study), *OPTIONS[name]])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = tmp_path / "runs" / "tiny" / f"method-{name}"
    for f in ("policy.json", "report.json", "metrics.json", "manifest.json", "model.torchscript.pt", "model.pt"):
        assert (d / f).is_file(), f
    rep = json.loads((d / "report.json").read_text())
    policy = Policy.from_json((d / "policy.json").read_text())
    base = _base(baseline_ckpt)
    policy.validate(base)
    assert policy.hash == rep["policy_hash"] == Policy.from_dict(rep["policy"]).hash
    assert len(policy) >= 1  # each method compresses something on this baseline with these options

    # Numbers: the policy applied to the baseline, and the exported TorchScript, have the reported cost.
    applied = count_cost(apply_policy(base, policy, input_shape=(1, 1, 8, 8)), (1, 1, 8, 8))
    scripted = torch.jit.load(str(d / "model.torchscript.pt"))
    assert applied.macs == rep["macs"] == rep["exported_macs"] == count_cost(scripted, (1, 1, 8, 8)).macs
    assert applied.params == rep["params"] == rep["exported_params"]
    assert rep["base_macs"] == BASE_MACS and rep["macs"] < BASE_MACS
    assert rep["macs_ratio"] == pytest.approx(rep["macs"] / BASE_MACS)
    assert rep["macs_reduction_x"] == pytest.approx(BASE_MACS / rep["macs"])
    assert rep["params_compression_x"] == pytest.approx(rep["base_params"] / rep["params"])
    assert rep["max_macs"] == pytest.approx(0.7 * BASE_MACS) and rep["feasible"] == (rep["macs"] <= 0.7 * BASE_MACS)
    assert 0.0 <= rep["val_acc"] <= 1.0 and 0.5 < rep["base_val_acc"] <= 1.0
    assert rep["rebuilt_val_acc"] == pytest.approx(rep["val_acc"], abs=0.011)  # the exported model is the scored one
    check = torch.load(d / "check.pt")
    assert torch.allclose(scripted(check["input"]), check["output"], atol=1e-5)
    assert rep["evaluator_calls"] >= 1 and not rep["budget_exhausted"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["macs"] == rep["macs"] and metrics["val_acc"] == rep["val_acc"]
    # the method's export is timed like a trial's: its program against the baseline's, same format
    assert metrics["speedup_batch1"] == pytest.approx(metrics["base_latency_ms_batch1"] / metrics["latency_ms_batch1"])
    assert metrics["export_speedup_batch1"] == pytest.approx(metrics["speedup_batch1"] * rep["macs_ratio"])
    layout = json.loads((d / "manifest.json").read_text())["memory_format"]
    assert rep["latency_program"] == metrics["latency_program"] == f"torchscript ({layout})"
    if auto:
        times = metrics["layout_latency_ms_batch1"]
        assert layout == min(times, key=times.get) and metrics["latency_ms_batch1"] == times[layout]
    else:
        assert layout == "contiguous" and "layout_latency_ms_batch1" not in metrics

    # Per-layer decisions agree with the policy.
    rows = {r["layer"]: r for r in rep["layers"]}
    for layer, lp in policy.layers.items():
        n = rows[layer]["filters"]
        assert rows[layer]["kept"] == lp.keep_count(n) and rows[layer]["decomposition"] == lp.decomposition
    pruned = [r for r in rep["layers"] if r["kept"] < r["filters"]]
    if name == "abshpc":
        rates = [r["rate"] for r in rep["layers"]]
        assert pruned and all(r["criterion"] == "hpc" for r in pruned)
        assert rates == sorted(rates)  # each layer's rate <= the rate of the (later) layer processed before it
    elif name == "mtd":
        used = [r["decomposition"] for r in rep["layers"] if r["decomposition"] != "none"]
        assert used and set(used) <= {"cp", "tucker"}
        if "tucker" in used:  # MTD's rule: once switched to Tucker-2, never back to CP
            assert "cp" not in used[used.index("tucker") :]
        assert not pruned and rep["params_compression_x"] > 1
    elif name == "ga":
        masked = [r for r in pruned if r["criterion"] == "mask"]
        assert masked and all(len(r["keep"]) == r["kept"] == r["filters"] // 2 for r in masked)
        assert all(r["keep"] == sorted(set(r["keep"])) for r in masked)
    else:
        assert pruned and all(r["criterion"] == "distfit" for r in pruned)
        assert rep["method_report"]["wasserstein"]
    for layer in rows:
        assert layer in out
    assert "evaluator calls" in out and str(d / "report.json") in out
    assert f"latency {metrics['latency_ms_batch1']:.2f} ms vs {metrics['base_latency_ms_batch1']:.2f} ms" in out
    assert "latency bound:" not in out  # the study has no latency bound


def test_method_budget_caps_evaluator_calls(
    tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _study(tmp_path, baseline_ckpt)
    code = main(["method", "abshpc", str(study), "--epsilon", "0.03", "--budget", "3", "--out", "b3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads((tmp_path / "b3" / "report.json").read_text())
    assert rep["budget"] == 3 and rep["evaluator_calls"] == 3
    assert rep["budget_exhausted"] and rep["rejected_unevaluated"] > 0 and "budget spent" in out
    Policy.from_json((tmp_path / "b3" / "policy.json").read_text()).validate(_base(baseline_ckpt))


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["method", "prune", "{study}"], ("invalid choice",)),
        (["method", "mtd", "{study}", "--epsilon", "0.1"], ("--epsilon applies to abshpc",)),
        (["method", "abshpc", "{study}", "--set", "nonsense=1"], ("nonsense", "unknown option")),
        (["method", "abshpc", "{study}", "--set", "epsilon"], ("expected KEY=VALUE",)),
        (["method", "ga", "{study}", "--set", "pop=many"], ("pop", "expected int")),
        (["method", "distfit", "{study}", "--rates", "1.5"], ("--rates", "[0, 1)")),
        (["method", "ga", "{study}", "--rates", "features.99=0.3"], ("features.99", "not a layer")),
        (["method", "abshpc", "{study}", "--budget", "0"], ("--budget",)),
        (["method", "abshpc", "{study}", "--out", "{foreign}"], ("not a method output",)),
        (["method", "abshpc", "missing.toml"], ("study file not found",)),
    ],
)
def test_method_bad_input_is_one_line_and_writes_nothing(
    argv: list[str], needles: tuple[str, ...], tmp_path: Path, baseline_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _study(tmp_path, baseline_ckpt)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = main([a.format(study=study, foreign=foreign) for a in argv])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, *needles)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_seed_parameter_type_is_reported_at_load_time(tmp_path: Path, baseline_ckpt: Path) -> None:
    from slimsearch.core.errors import SlimError

    p = _study(tmp_path, baseline_ckpt, seeds='strategies = ["ga"]\nga_pop = "many"')
    with pytest.raises(SlimError, match=r"\[seeds\] ga_pop: expected int"):
        load_study(p)
    p = _study(tmp_path, baseline_ckpt, seeds='strategies = ["abshpc"]\nbudget = 0')
    with pytest.raises(SlimError, match=r"\[seeds\] budget"):
        load_study(p)


# ----------------------------------------------------------------------------- seeds keep their exact policy


def test_ga_seed_trial_evaluates_the_exact_method_policy(tmp_path: Path, baseline_ckpt: Path) -> None:
    from slimsearch.evaluators.evaluate import evaluate
    from slimsearch.search.context import build_study_context
    from slimsearch.search.runner import run_study
    from slimsearch.search.seeding import MethodAcc, method_seed_policies

    seeds = 'strategies = ["ga"]\nga_rates = 0.5\nga_pop = 8\nga_generations = 3\nga_samples = 64'
    cfg = load_study(_study(tmp_path, baseline_ckpt, n_trials=2, seeds=seeds))
    run_study(cfg, progress=False, log=lambda s: None)
    t0 = trials_of(cfg)[0]
    assert t0.user_attrs["seed"] == "ga#0" and t0.user_attrs["status"] == "ok"

    sctx = build_study_context(cfg, allow_pretrain=False)
    [expected] = method_seed_policies(sctx, "ga", cfg.seeds.params["ga"], MethodAcc(sctx.eval_ctx, cfg.evaluator))
    assert t0.user_attrs["policy"] == expected.to_json() == t0.user_attrs["seed_policy"]
    stored = Policy.from_json(t0.user_attrs["policy"])
    masked = [lp for lp in stored.layers.values() if lp.criterion == "mask"]
    assert masked and all(lp.keep is not None and len(lp.keep) in (16, 32) for lp in masked)
    # Through the space's parameters alone the keep indices would be lost (criterion "mask" is not searched) ...
    assert sctx.space.policy_from_params(t0.params).hash != expected.hash
    # ... but the trial scored exactly the method's policy.
    res = evaluate(sctx.eval_ctx, cfg.evaluator, expected, cache=None)
    assert res.status == "ok"
    for k in ("val_acc", "macs", "params", "macs_ratio"):
        assert t0.user_attrs[k] == pytest.approx(res.metrics[k], abs=1e-12), k
    assert t0.value == pytest.approx(res.metrics["val_acc"], abs=1e-12)


def test_seed_budget_caps_method_evaluations(
    tmp_path: Path, baseline_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimsearch.evaluators.evaluate as ev
    from slimsearch.search.context import build_study_context
    from slimsearch.search.seeding import generate_seeds

    seeds = 'strategies = ["abshpc", "distfit"]\nbudget = 4\nabshpc_epsilon = 0.03\ndistfit_scan_rates = [0.25, 0.5]'
    cfg = load_study(_study(tmp_path, baseline_ckpt, seeds=seeds))
    assert cfg.seeds.budget == 4
    sctx = build_study_context(cfg, allow_pretrain=False)
    calls: list[str] = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda ctx, c, p, **kw: calls.append(p.hash) or real(ctx, c, p, **kw))
    lines: list[str] = []
    seeds_out = generate_seeds(sctx, log=lines.append)
    assert [label for label, _ in seeds_out] == ["abshpc#0", "distfit#0"]
    assert len(calls) == len(set(calls)) == 4  # the baseline evaluation is shared by both methods
    for _, pol in seeds_out:
        pol.validate(sctx.model)
    assert "budget spent" in lines[0] and "0 of the budget of 4 left" in lines[-1]
    # distfit got no evaluation left: every scanned step was rejected, so it prunes nothing
    assert len(seeds_out[1][1]) == 0
