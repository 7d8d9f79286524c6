"""benchmarks/budget_lib.py (protocol guard, MACs matching, bootstrap, summary) and bench_budget.py at toy scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import budget_lib as L

REPO = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_protocol_guard_untracked_modified_and_clean(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "protocol.toml").write_text("version = 1\n")
    assert "not committed" in (L.protocol_problem(tmp_path, "protocol.toml") or "")
    _git(tmp_path, "add", "protocol.toml")
    _git(tmp_path, "commit", "-qm", "v1")
    assert L.protocol_problem(tmp_path, "protocol.toml") is None
    assert len(L.protocol_sha(tmp_path, "protocol.toml")) == 40
    (tmp_path / "protocol.toml").write_text("version = 1\nn_trials = 99\n")
    assert "differs from HEAD" in (L.protocol_problem(tmp_path, "protocol.toml") or "")


def test_closest_setting_matches_both_sides_of_a_step_function() -> None:
    # MACs fall in steps of 7 from 100: "largest <= 50" is 44 (12 % under), the closest is 51 (2 % over)
    def macs(x: float) -> float:
        return 100 - 7 * int(x * 10)

    x, m = L.closest_setting(macs, 50.0, 0.0, 1.0, iters=12)
    assert m == 51 and macs(x) == 51
    assert L.within(50.4, 50, 0.01) and L.within(49.6, 50, 0.01) and not L.within(51, 50, 0.01)


def test_pack_roundtrip_and_cost_steps() -> None:
    bits = np.random.default_rng(0).random(37) < 0.5
    assert np.array_equal(L.unpack(L.pack(bits), 37), bits)
    assert L.cost_steps(50, 128 * 12, 128) == pytest.approx(54.0)


def test_paired_bootstrap_sign_width_and_pairing() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(4000) < 0.8
    better = base | (rng.random(4000) < 0.1)  # strictly more correct images: +~2 pt, paired
    r = L.paired_bootstrap([better, better], [base], n_boot=400)
    assert r["mean"] == pytest.approx(better.mean() - base.mean())
    assert 0 < r["ci_low"] <= r["mean"] <= r["ci_high"]
    same = L.paired_bootstrap([base], [base], n_boot=100)
    assert same == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}  # paired: identical rows differ by exactly 0


def _row(method: str, acc_bits: np.ndarray, **kw: object) -> dict:
    return {"method": method, "test_acc": float(acc_bits.mean()), "n_test": len(acc_bits),
            "test_correct": L.pack(acc_bits), "macs_ratio": 0.5, "cost_steps": 0.0, "final_steps": 100} | kw  # fmt: skip


def test_summarize_cell_schema_and_numbers() -> None:
    rng = np.random.default_rng(2)
    n = 2000
    ft, tpg, l1 = rng.random(n) < 0.9, rng.random(n) < 0.8, rng.random(n) < 0.7
    s0, s1 = rng.random(n) < 0.82, rng.random(n) < 0.84
    rows = {"baseline+ft": _row("baseline+ft", ft), "tp_global": _row("tp_global", tpg), "tp_l1": _row("tp_l1", l1),
            "slimsearch-s0": _row("slimsearch", s0, seed=0, cost_steps=60.0, search_cpu_s=10.0, rerank_cpu_s=2.0),
            "slimsearch-s1": _row("slimsearch", s1, seed=1, cost_steps=40.0, search_cpu_s=8.0, rerank_cpu_s=4.0),
            "tp_global_eqc": _row("tp_global_eqc", tpg, cost_steps=50.0)}  # fmt: skip
    c = L.summarize_cell("resnet20", 0.5, 5.0, "abc", rows, n_boot=200)
    keys = {"model", "budget", "epochs", "protocol_sha", "rows", "lead_vs_best_baseline", "lead_vs_equal_compute",
            "search_cost_ratio", "gap_to_baseline_ft"}  # fmt: skip
    assert keys <= set(c)
    assert c["best_baseline"] == "tp_global"
    lead = {r["method"]: r for r in c["rows"]}["slimsearch"]
    assert lead["seeds"] == [0, 1] and lead["test_acc"] == pytest.approx((s0.mean() + s1.mean()) / 2)
    assert set(lead) == {"method", "test_acc", "macs_ratio", "cost_steps", "seeds"}
    assert c["lead_vs_best_baseline"]["mean"] == pytest.approx(lead["test_acc"] - tpg.mean())
    assert c["search_cost_ratio"] == pytest.approx(0.5)  # mean 50 steps / 100 final steps
    assert c["gap_to_baseline_ft"] == pytest.approx(lead["test_acc"] - ft.mean())
    assert tuple(L.schema_only(c)) == L.CELL_KEYS
    assert c["test_accs"]["slimsearch"] == pytest.approx([s0.mean(), s1.mean()])
    md = L.summary_markdown([c | {"version": 1}])
    assert "vs best baseline (tp_global)" in md and "| slimsearch |" in md and "12 CPU s per seed" in md
    assert "(protocol v1)" in md


def test_the_summary_picture_is_written(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"baseline+ft": _row("baseline+ft", rng.random(500) < 0.9), "tp_global": _row("tp_global", rng.random(500) < 0.8),
            "slimsearch-s0": _row("slimsearch", rng.random(500) < 0.8, seed=0, cost_steps=6.0, search_cpu_s=1.0,
                                  rerank_cpu_s=1.0)}  # fmt: skip
    cells = [L.summarize_cell("resnet20", b, 5.0, "abc", rows, n_boot=50) | {"version": 2} for b in (0.5, 0.3)]
    path = L.plot_summary(cells, tmp_path / "summary.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300


def test_bench_budget_refuses_a_modified_protocol(tmp_path: Path) -> None:
    proto = tmp_path / "p.toml"
    proto.write_text((REPO / "benchmarks" / "protocol.toml").read_text())
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_budget.py"), "--protocol", str(proto),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "must be a file of this repository" in r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_budget.py"), "--reuse-from", "9",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "--reuse-from 9: not an earlier version" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_earlier_versions_protocol_is_read_back_from_git(tmp_path: Path) -> None:
    shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    if shallow != "false":
        pytest.skip("needs the repository's full git history (a shallow clone lacks protocol v1's blob)")
    v1 = L.version_protocol(REPO, REPO / "benchmarks" / "results" / "budget" / "v1")
    assert v1["version"] == 1 and "fit_tolerance" not in v1["search"] and v1["models"]["resnet20"]["epochs"] == 5
    for name, sha in (("a", "abf593802d24d50491c69e8c8773b90b6b12d35a"), ("b", "0" * 40)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cell.json").write_text(json.dumps({"protocol_sha": sha}))
    with pytest.raises(SystemExit, match="cells of one protocol version"):
        L.version_protocol(REPO, tmp_path)
    (tmp_path / "a" / "cell.json").unlink()
    with pytest.raises(SystemExit, match="not in this repository's history"):
        L.version_protocol(REPO, tmp_path)


@pytest.mark.slow
def test_bench_budget_tiny_runs_and_resumes(tmp_path: Path) -> None:
    """Toy scale, end to end: every row of a cell, the summary, and a rerun that only resumes."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_budget.py"), "--tiny", "--models", "resnet20",
           "--budgets", "0.5", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    version = L.load_protocol(REPO / "benchmarks" / "protocol.toml")["version"]
    cell = out / f"v{version}" / "resnet20-50pct-5ep"
    names = {p.stem for p in cell.glob("*.json")} - {"cell"}
    assert names == {"baseline", "baseline+ft", "tp_global", "tp_l1", "fpgm", "tp_alloc_fpgm", "slimsearch-s0",
                     "slimsearch-s1", "slimsearch-s2", "tp_global_eqc"}  # fmt: skip
    tp = json.loads((cell / "tp_global.json").read_text())
    assert abs(tp["macs_ratio"] - 0.5) < 0.05 and tp["final_choice"] in ("start", "ft", "ft+bn")
    s0 = json.loads((cell / "slimsearch-s0.json").read_text())
    eqc = json.loads((cell / "tp_global_eqc.json").read_text())
    assert s0["cost_steps"] > 0 and eqc["final_steps"] > tp["final_steps"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 and tuple(summary[0]) == L.CELL_KEYS and summary[0]["lead_vs_equal_compute"] is not None
    before = (cell / "slimsearch-s0.json").read_text()
    r2 = subprocess.run(cmd, capture_output=True, text=True)
    assert r2.returncode == 0 and r2.stdout.count("done (resumed)") == 10
    assert (cell / "slimsearch-s0.json").read_text() == before
    # the proxy-fidelity probe on these rows: every pruned network once, scored on val images only
    fid = tmp_path / "fid.json"
    r3 = subprocess.run([sys.executable, str(REPO / "benchmarks" / "probe_proxy_fidelity.py"), "--tiny", "--models",
                         "resnet20", "--results", str(out), "--out", str(fid)], capture_output=True, text=True)  # fmt: skip
    assert r3.returncode == 0, r3.stderr[-2000:]
    (res,) = json.loads(fid.read_text())["cells"]
    sources = [s for n in res["networks"] for s in n["sources"]]
    assert res["cell"] == cell.name and sorted(sources) == sorted(f"v{version}/{n}" for n in names - {
        "baseline", "baseline+ft", "tp_global_eqc"})  # fmt: skip
    for n in res["networks"]:
        assert 0 <= n["search_score"] <= 1 and 0 <= n["rerank_score"] <= 1 and abs(n["macs_ratio"] - 0.5) < 0.05
    assert len(res["networks"]) >= 3 and -1 <= res["rerank_score_vs_final"]["spearman"] <= 1


@pytest.mark.slow
def test_a_killed_search_row_resumes_its_study_and_adds_the_time_already_spent(tmp_path: Path) -> None:
    import optuna

    from benchmarks import bench_budget as B

    args = B.parse_args(["--tiny"])
    proto = L.load_protocol(REPO / "benchmarks" / "protocol.toml")
    cell = B.make_cell("resnet20", 0.5, 5.0, proto, args, B.load_data(proto, args), B.recipe(proto, False))
    work = tmp_path / ".work-slimsearch-s0"

    def started() -> list[object]:
        db = f"sqlite:///{work}/study/study.db"
        return [t.datetime_start for t in optuna.load_study(study_name="budget_resnet20_0", storage=db).trials]

    first = B.row_slimsearch(cell, 0, work)
    assert first["search_restarts"] == 0 and first["n_trials"] == 3 and first["search_cpu_s"] > 0
    spent = json.loads((work / "spent.json").read_text())
    assert spent["restarts"] == 0 and spent["search_cpu_s"] > 0
    trials = started()
    again = B.row_slimsearch(cell, 0, work)  # as if killed after the search: the study's trials are kept, not rerun
    assert started() == trials and again["search_restarts"] == 1 and again["n_trials"] == 3
    assert again["search_steps"] == first["search_steps"] and again["policy"] == first["policy"]
    assert again["search_cpu_s"] > spent["search_cpu_s"]


@pytest.mark.slow
def test_a_killed_final_fine_tune_resumes_from_its_checkpoint_and_ends_the_same(tmp_path: Path) -> None:
    from benchmarks import bench_budget as B

    args = B.parse_args(["--tiny"])
    proto = L.load_protocol(REPO / "benchmarks" / "protocol.toml")
    lines: list[str] = []
    cell = B.make_cell("resnet20", 0.5, 5.0, proto, args, B.load_data(proto, args), B.recipe(proto, False))
    cell = B.dataclasses.replace(cell, log=lines.append)
    work = tmp_path / ".work-fpgm"
    _, net = B.row_baseline(cell, "fpgm")
    whole = B.finish(cell, B.copy.deepcopy(net), work)  # leaves its step-2 checkpoint behind (as a kill would)
    assert (work / "final.pt").is_file() and not any("resumed" in x for x in lines)
    again = B.finish(cell, B.copy.deepcopy(net), work)
    assert any("final fine-tune resumed at step 2" in x for x in lines)
    same = ("val_acc", "final_val_accs", "final_steps", "final_choice", "test_acc", "test_correct")
    assert {k: again[k] for k in same} == {k: whole[k] for k in same} and again["final_earlier_s"] > 0
    _, other = B.row_baseline(cell, "tp_l1")  # another network: its checkpoint is not this one's
    lines.clear()
    B.finish(cell, other, work)
    assert not any("resumed" in x for x in lines)


def test_a_protocols_own_space_and_seed_params_replace_the_study_files(tmp_path: Path) -> None:
    from benchmarks import bench_budget as B

    args = B.parse_args(["--tiny"])
    proto = L.load_protocol(REPO / "benchmarks" / "protocol.toml")
    cell = B.make_cell("resnet20", 0.5, 5.0, proto, args, B.load_data(proto, args), B.recipe(proto, False))
    plain = B.study_config(cell, tmp_path, 0, tmp_path / "base.th")
    assert plain.space.criteria == ("l1", "fpgm")  # studies/resnet20_cifar10.toml
    own = json.loads(json.dumps(proto))
    own["search"] |= {
        "space": {"coupled": False, "prune_rate": [0.0, 0.7], "criteria": ["group"]},
        "seed_strategies": ["uniform", "tp_global"],
        "seed_params": {"tp_global_criterion": "group"},
    }
    cell = B.dataclasses.replace(cell, proto=own)
    cfg = B.study_config(cell, tmp_path, 0, tmp_path / "base.th")
    assert cfg.space.criteria == ("group",) and cfg.space.prune_rate == (0.0, 0.7)
    assert cfg.space.decomposition == ("none",)  # the whole [space] is replaced, not merged
    assert cfg.seeds.strategies == ("uniform", "tp_global") and cfg.seeds.params["tp_global"]["criterion"] == "group"


def test_tp_progressive_stops_at_the_budget_and_keeps_unprunable_layers() -> None:
    import torch
    from slimsearch.core.cost import count_cost
    from slimsearch.core.errors import SlimError
    from slimsearch.core.models import build_model
    from slimsearch.core.tp_prune import tp_prune_progressive, unprunable_modules

    shape = (1, 3, 32, 32)
    torch.manual_seed(0)
    base = build_model("resnet20").eval()
    full = count_cost(base, shape).macs

    def macs(m: torch.nn.Module) -> float:
        return float(count_cost(m, shape).macs)

    pruned, steps = tp_prune_progressive(base, "tp_global", 0.6 * full, shape, macs, steps=100)
    m = macs(pruned)
    assert m <= 0.6 * full and L.within(m, 0.6 * full, 0.03) and 0 < steps < 100
    # a looser budget stops earlier, with more MACs
    loose, fewer = tp_prune_progressive(base, "tp_global", 0.8 * full, shape, macs, steps=100)
    assert fewer < steps and m < macs(loose) <= 0.8 * full
    kept = {id(x) for x in unprunable_modules(base, shape)}
    names = [n for n, x in base.named_modules() if id(x) in kept and isinstance(x, torch.nn.Conv2d)]
    mods = dict(pruned.named_modules())
    assert all(mods[n].out_channels == dict(base.named_modules())[n].out_channels for n in names)
    with pytest.raises(SlimError, match="not reached in 3 steps"):
        tp_prune_progressive(base, "tp_global", 0.1 * full, shape, macs, steps=3)


def test_budget_free_rows_are_reused_only_from_a_matching_cell(tmp_path: Path) -> None:
    from benchmarks.bench_budget import reusable_row

    meta = {"version": 1, "protocol_sha": "abc", "model": "resnet20", "epochs": 5.0, "device": "cpu", "budget": 0.3}
    done, other = tmp_path / "resnet20-50pct-5ep", tmp_path / "resnet56-50pct-5ep"
    for d, model in ((done, "resnet20"), (other, "resnet56")):
        d.mkdir()
        (d / "cell.json").write_text(json.dumps(meta | {"budget": 0.5, "model": model}))
        (d / "baseline+ft.json").write_text(json.dumps({"method": "baseline+ft", "test_acc": 0.88, "model": model}))
        (d / "tp_global.json").write_text(json.dumps({"method": "tp_global", "test_acc": 0.8}))
    here = tmp_path / "resnet20-30pct-5ep"
    here.mkdir()
    row = reusable_row(here, "baseline+ft", meta)
    assert row == {"method": "baseline+ft", "test_acc": 0.88, "model": "resnet20", "reused_from": done.name}
    assert reusable_row(here, "tp_global", meta) is None  # depends on the budget
    assert reusable_row(here, "baseline+ft", meta | {"protocol_sha": "def"}) is None  # another protocol
    assert reusable_row(here, "baseline+ft", meta | {"epochs": 2.0}) is None


def _old_cell(tmp_path: Path, model: str, budget: float, epochs: float) -> tuple[Path, dict]:
    """An earlier version's (v1) cell folder with its cell.json, and this version's (v2) meta for the same cell."""
    meta = {"version": 2, "protocol_sha": "new", "model": model, "budget": budget, "epochs": epochs, "device": "cpu",
            "data": {"train": 50000, "val": 2000, "test": 8000}}  # fmt: skip
    cdir = tmp_path / "v1" / L.cell_name(model, budget, epochs)
    cdir.mkdir(parents=True)
    (cdir / "cell.json").write_text(json.dumps(meta | {"version": 1, "protocol_sha": "old"}))
    return cdir, meta


def test_search_free_rows_are_reused_from_an_earlier_version_only_when_its_protocol_differs_in_the_search(
    tmp_path: Path,
) -> None:
    from benchmarks.bench_budget import reusable_from_version

    proto = L.load_protocol(REPO / "benchmarks" / "protocol.toml")
    old = json.loads(json.dumps(proto)) | {"version": 1}
    old["search"] = old["search"] | {"n_trials": 3, "fit_tolerance": 0.5}
    old["models"]["resnet20"]["search_seeds"] = [7]
    cdir, meta = _old_cell(tmp_path, "resnet20", 0.5, 5.0)
    data = meta["data"]
    for name in ("tp_global", "baseline+ft", "slimsearch-s0", "tp_global_eqc"):
        (cdir / f"{name}.json").write_text(json.dumps({"method": name, "test_acc": 0.8, "protocol_sha": "old"}))
    row = reusable_from_version(cdir, "tp_global", meta, proto, old)
    assert row == {"method": "tp_global", "test_acc": 0.8, "protocol_sha": "old",
                   "reused_from": "v1/resnet20-50pct-5ep", "reused_protocol_sha": "old"}  # fmt: skip
    assert reusable_from_version(cdir, "baseline+ft", meta, proto, old) is not None
    assert reusable_from_version(cdir, "slimsearch-s0", meta, proto, old) is None  # runs the search
    assert reusable_from_version(cdir, "tp_global_eqc", meta, proto, old) is None  # its steps come from the search
    assert reusable_from_version(cdir, "tp_l1", meta, proto, old) is None  # not run there
    assert reusable_from_version(cdir, "tp_global", meta | {"budget": 0.3}, proto, old) is None
    assert reusable_from_version(cdir, "tp_global", meta | {"data": data | {"val": 1000}}, proto, old) is None
    other_ft = old | {"finetune": old["finetune"] | {"lr": 0.02}}
    assert reusable_from_version(cdir, "tp_global", meta, proto, other_ft) is None
    other_model = json.loads(json.dumps(old))
    other_model["models"]["resnet20"]["epochs"] = 3
    assert reusable_from_version(cdir, "tp_global", meta, proto, other_model) is None


def test_a_search_row_whose_rerank_kept_the_top_trial_serves_a_protocol_without_rerank(tmp_path: Path) -> None:
    from benchmarks.bench_budget import reusable_from_version

    proto = json.loads(json.dumps(L.load_protocol(REPO / "benchmarks" / "protocol.toml")))
    proto["search"] |= {"rerank": 1}
    old = json.loads(json.dumps(proto)) | {"version": 1}
    old["search"] = old["search"] | {"rerank": 3, "rerank_fraction": 0.2}
    cdir, meta = _old_cell(tmp_path, "resnet56", 0.5, 2.0)
    row = {"method": "slimsearch", "setting": "24 trials tpe, finetune:50, rerank 3 x 156 steps", "seed": 0,
           "best_trial": 12, "rerank": [{"trial": 12}, {"trial": 20}, {"trial": 19}], "search_steps": 1500.0,
           "rerank_steps": 600.0, "cost_steps": 2100.0, "rerank_s": 30.0, "rerank_cpu_s": 29.0, "wall_s": 100.0,
           "test_acc": 0.8, "protocol_sha": "old"}  # fmt: skip
    (cdir / "slimsearch-s0.json").write_text(json.dumps(row))
    (cdir / "slimsearch-s1.json").write_text(json.dumps(row | {"best_trial": 20}))  # the rerank moved its pick
    got = reusable_from_version(cdir, "slimsearch-s0", meta, proto, old)
    assert got is not None and got["test_acc"] == 0.8 and got["reused_from"] == "v1/resnet56-50pct-2ep"
    assert (got["cost_steps"], got["rerank_steps"], got["rerank"], got["wall_s"]) == (1500.0, 0.0, [], 70.0)
    assert got["setting"] == "24 trials tpe, finetune:50" and "derived" in got
    assert reusable_from_version(cdir, "slimsearch-s1", meta, proto, old) is None  # another network
    more = json.loads(json.dumps(old))
    more["search"]["n_trials"] = 16
    assert reusable_from_version(cdir, "slimsearch-s0", meta, proto, more) is None  # another search
    assert reusable_from_version(cdir, "slimsearch-s0", meta, old, old) is None  # this protocol reranks too
    assert reusable_from_version(cdir, "tp_global_eqc", meta, proto, old) is None


def test_a_row_is_claimed_by_one_live_process_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    import os

    from benchmarks.bench_budget import claim_row

    lock = claim_row(tmp_path, "slimsearch-s0")
    assert lock == tmp_path / ".slimsearch-s0.lock" and lock.read_text() == str(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(other.pid))  # held by another live process
        assert claim_row(tmp_path, "slimsearch-s0") is None
        assert claim_row(tmp_path, "slimsearch-s1") == tmp_path / ".slimsearch-s1.lock"  # other rows stay free
    finally:
        other.kill()
        other.wait()
    assert claim_row(tmp_path, "slimsearch-s0") == lock  # its holder died: taken over
    assert lock.read_text() == str(os.getpid())


def test_a_pilot_runs_an_uncommitted_candidate_on_val_only(tmp_path: Path) -> None:
    """--pilot: a candidate protocol (here a modified copy outside the repo) runs the chosen rows with the test
    split dropped; rows hold val accuracy and nothing of test; the committed results are untouched."""
    v = L.load_protocol(REPO / "benchmarks" / "protocol.toml")["version"]
    proto = tmp_path / "candidate.toml"
    text = (REPO / "benchmarks" / "protocol.toml").read_text()
    proto.write_text(text.replace(f"\nversion = {v}\n", f"\nversion = {v + 1}\n", 1))
    out = tmp_path / "out"
    (out / f"v{v}" / "resnet20-50pct-5ep").mkdir(parents=True)
    (out / f"v{v}" / "resnet20-50pct-5ep" / "fpgm.json").write_text(json.dumps({"val_acc": 0.5, "test_acc": 0.4}))
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_budget.py"), "--tiny", "--protocol", str(proto),
           "--pilot", "cand", "--models", "resnet20", "--budgets", "0.5", "--rows", "baseline,fpgm", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cell = out / "pilot" / "cand" / "resnet20-50pct-5ep"
    assert {p.stem for p in cell.glob("*.json")} == {"cell", "baseline", "fpgm"}
    for name in ("baseline", "fpgm"):
        row = json.loads((cell / f"{name}.json").read_text())
        assert 0.0 <= row["val_acc"] <= 1.0 and not any(k.startswith(("test", "n_test")) for k in row)
    assert json.loads((cell / "cell.json").read_text())["data"]["test"] == 0
    pilot = json.loads((out / "pilot" / "cand" / "summary.json").read_text())
    assert [(p["row"], p["reference_val_acc"]) for p in pilot] == [("baseline", {"fpgm": 0.5}), ("fpgm", {"fpgm": 0.5})]
    assert not (out / "summary.json").exists() and not (out / f"v{v + 1}").exists()
    code = json.loads((cell / "fpgm.json").read_text())["code"]
    assert code.split("+")[0] == L.code_rev(REPO).split("+")[0] and len(code.split("+")[0]) == 10


def test_the_gpu_recipe_scales_the_learning_rates_with_the_batch_and_picks_its_cells() -> None:
    from benchmarks.bench_budget import Recipe, recipe

    proto = json.loads(json.dumps(L.load_protocol(REPO / "benchmarks" / "protocol.toml")))
    f, s = proto["finetune"], proto["search"]
    assert recipe(proto, False) == Recipe(f["batch_size"], f["lr"], s["evaluator_lr"], "off")
    proto["gpu"] = {"epochs": 30, "batch_size": 8 * f["batch_size"], "amp": "bf16", "models": ["resnet20"],
                    "budgets": [0.5]}  # fmt: skip
    assert recipe(proto, True) == Recipe(8 * f["batch_size"], 8 * f["lr"], 8 * s["evaluator_lr"], "bf16")
    assert recipe(proto | {"gpu": proto["gpu"] | {"lr": 0.05}}, True).lr == 0.05  # set explicitly: kept
    assert L.gpu_cells(proto) == [("resnet20", 0.5, 30.0)]
    del proto["gpu"]["models"], proto["gpu"]["budgets"]
    assert L.gpu_cells(proto) == [(m, b, 30.0) for m, b, _ in L.cells(proto)]


@pytest.mark.slow
def test_the_gpu_protocol_runs_at_toy_scale_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_budget.sh --device cpu --tiny --gpu-protocol: the [gpu] cells only, with its recipe (bf16
    autocast, lrs scaled with the batch), this checkout's code through gpu_env.sh's links."""
    text = (REPO / "benchmarks" / "protocol.toml").read_text()
    gpu = '[gpu]\nepochs = 30\nbatch_size = 1024\namp = "bf16"\nmodels = ["resnet20"]\nbudgets = [0.5]\n'
    proto = tmp_path / "candidate.toml"
    proto.write_text(text[: text.index("\n[gpu]") + 1] + gpu)
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_budget.sh"), "--device", "cpu", "--tiny", "--gpu-protocol",
           "--protocol", str(proto), "--pilot", "gpu", "--rows", "baseline,tp_global,slimsearch-s0"]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=os.environ | {"OUT": str(out), "PYTHON": sys.executable}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (cell,) = [p for p in (out / "budget" / "pilot" / "gpu").iterdir() if p.is_dir()]
    assert cell.name == "resnet20-50pct-30ep-gpu"
    assert {p.stem for p in cell.glob("*.json")} == {"cell", "baseline", "tp_global", "slimsearch-s0"}
    base = L.load_protocol(REPO / "benchmarks" / "protocol.toml")
    rec = json.loads((cell / "cell.json").read_text())["recipe"]
    assert rec == {"batch_size": 1024, "lr": pytest.approx(8 * base["finetune"]["lr"]),
                   "eval_lr": pytest.approx(8 * base["search"]["evaluator_lr"]), "amp": "bf16"}  # fmt: skip
    assert 0.0 <= json.loads((cell / "tp_global.json").read_text())["val_acc"] <= 1.0


def test_the_gpu_budget_estimate_adds_up_every_row_of_the_gpu_cells(tmp_path: Path) -> None:
    from benchmarks.gpu_budget_estimate import main as estimate

    text = (REPO / "benchmarks" / "protocol.toml").read_text()
    proto = tmp_path / "p.toml"
    proto.write_text(text[: text.index("\n[gpu]") + 1] + '[gpu]\nepochs = 30\nbatch_size = 1024\nmodels = ["resnet20"]\n'
                     "budgets = [0.5]\n")  # fmt: skip
    out = tmp_path / "est.json"
    assert estimate(["--protocol", str(proto), "--out", str(out), "--startup-s", "7"]) == 0
    e = json.loads(out.read_text())
    (cell,) = e["cells"]
    assert cell["cell"] == "resnet20-50pct-30ep-gpu" and cell["final_steps"] == 30 * (50_000 // 1024)
    assert set(cell["rows_s"]) == {"baseline", "baseline+ft", "baselines", "slimsearch", "tp_global_eqc"}
    assert e["expected_s"] == pytest.approx(7 + sum(cell["rows_s"].values())) and e["fits"] == (e["expected_s"] <= 540)
    assert cell["rows_s"]["tp_global_eqc"] > cell["rows_s"]["baselines"] / 4 > 0  # its final fine-tune is longer


def test_a_copy_without_git_runs_only_the_protocol_blob_it_is_told(tmp_path: Path) -> None:
    def git_blob(path: Path) -> str:
        return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True).stdout.strip()

    other = tmp_path / "other.toml"
    other.write_text("x = 1\n")
    hashed = git_blob(other)
    assert L.blob_sha(other) == hashed and L.blob_sha(REPO / "benchmarks" / "protocol.toml") == git_blob(
        REPO / "benchmarks" / "protocol.toml"
    )
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_budget.py"), "--expect-protocol", hashed,
                        "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "is not the protocol --expect-protocol names" in r.stderr and not out.exists()
