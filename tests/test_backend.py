"""search.backend: which backend a study uses (``backend_for``, the one place that decides), and that both
backends answer status/report/export through the same ``TrialRecord`` / ``StudyInfo`` values."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from helpers import write_ray_study
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.search.backend import OptunaBackend, RayBackend, backend_for
from slimsearch.search.ray_results import _write_meta, ray_results_csv
from slimsearch.search.records import best, trial_line
from slimsearch.search.study import load_study


def test_backend_for_follows_the_study_file_and_where_results_are(tmp_path: Path) -> None:
    ray_cfg = load_study(write_ray_study(tmp_path, "r"))
    assert isinstance(backend_for(ray_cfg), RayBackend) and isinstance(backend_for(ray_cfg, to_run=True), RayBackend)
    p = tmp_path / "o.toml"
    p.write_text(write_ray_study(tmp_path, "o").read_text().replace('backend = "ray"', 'backend = "optuna"'))
    cfg = load_study(p)
    assert isinstance(backend_for(cfg), OptunaBackend) and backend_for(cfg).dashboard.startswith("optuna-dashboard ")
    run_on = backend_for(cfg, ray_address="127.0.0.1:1", to_run=True)  # run --ray-address
    assert isinstance(run_on, RayBackend) and run_on.address == "127.0.0.1:1" and run_on.dashboard is None
    _write_meta(cfg, 3, {"baseline_sha": "abc"})  # an Optuna-backend study only ever run on Ray
    assert isinstance(backend_for(cfg), RayBackend)  # status/report/export read its Ray results
    assert isinstance(backend_for(cfg, to_run=True), OptunaBackend)  # a plain `run` still uses [study] backend


def test_ray_results_read_as_records_and_info(tmp_path: Path) -> None:
    cfg = load_study(write_ray_study(tmp_path, "recs", n_trials=5))
    pol = Policy({"features.0": LayerPolicy(prune_rate=0.5)})
    rows = [
        {"number": 0, "trial_id": "a", "status": "ok", "val_acc": 0.7, "macs": 4.0, "macs_ratio": 0.4,
         "policy": pol.to_json(), "policy_hash": pol.hash, "seed": "uniform#0", "wall_s": 1.5},
        {"number": 1, "trial_id": "b", "status": "infeasible", "val_acc": 0.0, "macs": 9.0, "policy": pol.to_json()},
        {"number": 2, "trial_id": "c", "status": "error", "reason": "trial error: boom"},
    ]  # fmt: skip
    csv = ray_results_csv(cfg)
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    _write_meta(cfg, 5, {"baseline_sha": "abc"})
    b = RayBackend(cfg)
    recs = b.records()
    assert [(r.number, r.state, r.status, r.counted) for r in recs] == [
        (0, "COMPLETE", "ok", True), (1, "COMPLETE", "infeasible", True), (2, "FAIL", "error", False)
    ]  # fmt: skip
    assert recs[1].metric("val_acc") is None and recs[1].metric("macs") == 9.0  # Tune's 0.0 is not an accuracy
    assert recs[0].policy_summary == pol.summary() and recs[0].trial_id == "a" and best(recs) is recs[0]
    line = trial_line(recs[0])
    assert line.startswith("trial    0  ok") and "val_acc 0.7000" in line and "seed uniform#0" in line
    info = b.info()
    assert (info.n_trials, info.seeds, info.by_state) == (5, ["uniform#0"], {"ok": 1, "infeasible": 1, "error": 1})
    assert info.baseline["baseline_sha"] == "abc" and info.storage.startswith("ray: ")
