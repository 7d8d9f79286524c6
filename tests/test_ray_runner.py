"""Ray Tune backend: local Ray run + resume, a real two-node Ray cluster on loopback, and the fast checks.

Ray takes seconds to start and the machine has two cores: the runs are few, tiny (SmallCNN on digits,
proxy evaluator, 4-6 trials) and marked slow. The cluster test starts its own head and worker node in a
private temp dir and kills exactly those processes afterwards (``ray stop`` would stop every Ray on
the machine, including other tests').
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import write_ray_study as _write_study
from slimsearch.core.errors import SlimError
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.evaluators.evaluate import EvalResult
from slimsearch.search.study import load_study

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fast checks (no Ray runtime)


def test_unreachable_address_is_a_slim_error_and_creates_nothing(tmp_path: Path) -> None:
    from slimsearch.search.ray_runner import run_ray

    cfg = load_study(_write_study(tmp_path, "unreach"))
    port = _free_port()  # closed right away: nothing listens there
    with pytest.raises(SlimError, match=rf"cannot connect to Ray at 127\.0\.0\.1:{port}: .*unreachable"):
        run_ray(cfg, address=f"127.0.0.1:{port}")
    assert not cfg.study.workdir.exists()
    with pytest.raises(SlimError, match="expected host:port"):
        run_ray(cfg, address="no-port-here")


def test_final_result_marks_infeasible_and_failed_as_worst(tmp_path: Path) -> None:
    from slimsearch.search.ray_runner import fidelity, final_result

    cfg = load_study(_write_study(tmp_path, "unit"))
    assert fidelity(cfg) == (1, 1, False)  # proxy: one report at step 1
    pol = Policy({"features.0": LayerPolicy(prune_rate=0.0)})
    inf = EvalResult("infeasible", {"macs": 2e6, "params": 1e4, "macs_violation": 5e5}, "MACs exceed the bound")
    r = final_result(cfg, inf, pol, {"number": 3})
    assert (r["status"], r["feasible"], r["val_acc"], r["macs"], r["step"]) == ("infeasible", False, 0.0, 2e6, 1)
    assert r["macs_violation"] == 5e5 and r["number"] == 3 and Policy.from_json(r["policy"]).hash == pol.hash
    fail = final_result(cfg, EvalResult("fail", {}, "NaN loss"), None, {})
    assert (fail["status"], fail["feasible"], fail["val_acc"], fail["reason"], fail["policy"]) == (
        "fail",
        False,
        0.0,
        "NaN loss",
        "",
    )
    ok = final_result(cfg, EvalResult("ok", {"val_acc": 0.9, "macs": 1e5}, model_digest="abc"), pol, {})
    assert ok["feasible"] and ok["val_acc"] == 0.9 and ok["model_digest"] == "abc"
    json.dumps(r)  # plain values only: Tune stores results as JSON


def test_ray_records_rank_one_per_network() -> None:
    import pandas as pd
    from slimsearch.search.ray_results import records_from_table
    from slimsearch.search.records import ranked

    def ranked_rows(df: pd.DataFrame) -> list[int]:
        return [r.number for r in ranked(records_from_table(df))]

    df = pd.DataFrame({
        "number": [0, 1, 2, 3, 4], "status": ["ok"] * 5, "val_acc": [0.9, 0.9, 0.8, 0.7, 0.7],
        "macs": [5.0] * 5, "policy": ["a", "b", "c", "d", "d"], "model_digest": ["n1", "n1", "n2", None, None],
    })  # fmt: skip
    assert ranked_rows(df) == [0, 2, 3]  # 1 builds 0's network; 4 repeats 3's policy
    assert ranked_rows(df.drop(columns="model_digest")) == [0, 1, 2, 3]  # older tables


def _ray_records(cfg) -> list:  # noqa: ANN001
    from slimsearch.search.backend import RayBackend

    return RayBackend(cfg).records()


def _pick(cfg, spec: str | int = "best") -> tuple[Policy, dict]:  # noqa: ANN001
    """The trial ``slimsearch export`` would take from a Ray study: (policy, its record's values)."""
    from slimsearch.search.export import select_trial

    r = select_trial(_ray_records(cfg), spec)
    return Policy.from_json(r.policy), {"number": r.number, **r.metrics}


def test_results_csv_fallback_and_best_policy(tmp_path: Path) -> None:
    import pandas as pd
    from slimsearch.search.ray_runner import ray_results_csv, ray_trials
    from slimsearch.search.report import study_status, trials_frame

    cfg = load_study(_write_study(tmp_path, "csvonly"))
    with pytest.raises(SlimError, match="no Ray results"):
        ray_trials(cfg)
    pols = [Policy({"features.0": LayerPolicy(prune_rate=r)}) for r in (0.0, 0.5, 0.25)]
    rows = [
        {
            "number": 0,
            "trial_id": "a",
            "status": "infeasible",
            "val_acc": 0.0,
            "macs": 9.0,
            "policy": pols[0].to_json(),
        },
        {"number": 1, "trial_id": "b", "status": "ok", "val_acc": 0.8, "macs": 4.0, "policy": pols[1].to_json()},
        {"number": 2, "trial_id": "c", "status": "ok", "val_acc": 0.8, "macs": 3.0, "policy": pols[2].to_json()},
        {"number": 3, "trial_id": "d", "status": "fail", "val_acc": 0.0, "macs": None, "policy": "", "reason": "boom"},
    ]
    csv = ray_results_csv(cfg)
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert list(ray_trials(cfg)["number"]) == [0, 1, 2, 3]
    pol, m = _pick(cfg)  # tie on val_acc -> fewer MACs
    assert pol.hash == pols[2].hash and m["number"] == 2 and m["macs"] == 3.0
    assert _pick(cfg, 0)[0].hash == pols[0].hash  # an infeasible trial may be exported on request
    assert [r.trial_id for r in _ray_records(cfg)] == ["a", "b", "c", "d"]  # Ray's trial ids are kept
    with pytest.raises(SlimError, match="trial is FAIL.*boom"):
        _pick(cfg, 3)
    with pytest.raises(SlimError, match="no such trial"):
        _pick(cfg, 9)
    rep = trials_frame(_ray_records(cfg))  # search.report's columns
    assert rep["state"].tolist() == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert rep["val_acc"].isna().tolist() == [True, False, False, True]  # 0.0 given to Tune is not an accuracy
    st = study_status(cfg)
    assert (st.counted, st.by_state, st.best["trial"]) == (4, {"ok": 2, "infeasible": 1, "fail": 1}, 2)


def test_searcher_seeds_numbers_constraint_and_states(tmp_path: Path) -> None:
    """The search algorithm alone (no Ray runtime): seeds come first as complete points with their labels,
    the MACs violation becomes an Optuna constraint, fail -> FAIL and ASHA-stopped ("partial") -> PRUNED."""
    from optuna.trial import TrialState
    from slimsearch.search.ray_runner import make_search_alg
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    cfg = load_study(_write_study(tmp_path, "searcher"))
    space = SearchSpace.build(build_model("smallcnn", 10, 1), SpaceConfig(), (1, 1, 8, 8))
    seeds = [("uniform#0", space.uniform_policy(0.0)), ("uniform#1", space.uniform_policy(0.6))]
    gen = make_search_alg(cfg, space, seeds, workers=2)
    searcher = gen.searcher.searcher  # SlotGenerator -> ConcurrencyLimiter -> SlimOptunaSearch
    assert gen.searcher.max_concurrent == 2
    searcher.set_search_properties(None, None, space.ray_param_space())  # what Tuner(param_space=...) does

    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["_number"] for c in configs] == [0, 1, 2, 3]
    assert [c.get("_seed") for c in configs] == ["uniform#0", "uniform#1", None, None]
    for c, (_, pol) in zip(configs, seeds, strict=False):
        assert space.policy_from_params(c).hash == pol.hash
    searcher.on_trial_complete("t0", {"status": "infeasible", "val_acc": 0.0, "macs_violation": 123.0})
    searcher.on_trial_complete("t1", {"status": "ok", "val_acc": 0.5, "macs_violation": -10.0})
    searcher.on_trial_complete("t2", {"status": "fail", "val_acc": 0.0, "reason": "boom"})
    searcher.on_trial_complete("t3", {"status": "partial", "val_acc": 0.1, "step": 10})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    # stored as Optuna's constraints_func stores them: what its samplers and optuna-dashboard read
    assert trials[0].system_attrs.get("constraints") == [123.0] and trials[0].values == [0.0]
    assert trials[1].system_attrs.get("constraints") == [-10.0] and trials[1].values == [0.5]
    assert list(trials[0].constraints.values()) == [123.0]  # Optuna reads them back


def test_searcher_passes_macs_and_latency_constraints(tmp_path: Path) -> None:
    """With a latency bound both violations reach Optuna, in order; one not measured (the MACs gate rejected
    the policy first) counts as 0."""
    from slimsearch.search.ray_runner import make_search_alg
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    cfg = load_study(_write_study(tmp_path, "lat", constraint="max_latency_ratio = 0.7"))
    space = SearchSpace.build(build_model("smallcnn", 10, 1), SpaceConfig(), (1, 1, 8, 8))
    searcher = make_search_alg(cfg, space, [], workers=1).searcher.searcher
    searcher.set_search_properties(None, None, space.ray_param_space())
    for i in range(2):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"status": "infeasible", "val_acc": 0.0, "macs_violation": 5.0})
    searcher.on_trial_complete("t1", {"status": "ok", "val_acc": 0.4, "macs_violation": -1.0,
                                      "latency_violation": -0.25, "latency_pred_ms": 1.0})  # fmt: skip
    t0, t1 = searcher._ot_study.get_trials(deepcopy=False)
    assert t0.user_attrs["constraint"] == [5.0, 0.0] and t1.user_attrs["constraint"] == [-1.0, -0.25]
    assert t1.system_attrs.get("constraints") == [-1.0, -0.25]


def test_searcher_with_the_local_sampler_mutates_a_finished_seed(tmp_path: Path) -> None:
    """[study] sampler = "local" through Ray's OptunaSearch: after the seeds, a suggestion is the best
    seed's parameters with a few of them changed."""
    from slimsearch.search.local_sampler import LocalSearchSampler
    from slimsearch.search.ray_runner import make_search_alg
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    path = _write_study(tmp_path, "local")
    path.write_text(
        path.read_text().replace('backend = "ray"', 'backend = "ray"\nsampler = "local"\nn_startup_trials = 0')
    )
    cfg = load_study(path)
    space = SearchSpace.build(build_model("smallcnn", 10, 1), SpaceConfig(criteria=("l1", "fpgm")), (1, 1, 8, 8))
    seeds = [("uniform#0", space.uniform_policy(0.2)), ("uniform#1", space.uniform_policy(0.6, "fpgm"))]
    searcher = make_search_alg(cfg, space, seeds, workers=1).searcher.searcher
    searcher.set_search_properties(None, None, space.ray_param_space())
    assert isinstance(searcher._ot_study.sampler, LocalSearchSampler)
    s0, s1 = (searcher.suggest(f"t{i}") for i in range(2))
    searcher.on_trial_complete("t0", {"status": "ok", "val_acc": 0.3, "macs_violation": -1.0})
    searcher.on_trial_complete("t1", {"status": "ok", "val_acc": 0.5, "macs_violation": -1.0})
    names = [p.name for p in space.params]
    for i in range(2, 6):
        child = searcher.suggest(f"t{i}")
        changed = [min(sum(child[n] != s[n] for n in names) for s in (s0, s1))]
        assert 1 <= changed[0] < len(names), (child, s0, s1)  # a mutation of a seed, not a fresh draw
        space.policy_from_params(child).validate(build_model("smallcnn", 10, 1))
        searcher.on_trial_complete(f"t{i}", {"status": "ok", "val_acc": 0.1, "macs_violation": -1.0})


# ----------------------------------------------------------------------------- local Ray


def _check_run(cfg, s, n: int) -> None:
    """Shared assertions on a finished run summary of the tiny study."""
    import pandas as pd
    from slimsearch.search.context import build_study_context

    df = s.table
    assert s.counted == n == len(df) and s.done and sorted(df["number"]) == list(range(n))
    assert set(df["status"]) <= {"ok", "infeasible"} and (df["ray_status"] == "TERMINATED").all()
    sctx = build_study_context(cfg, allow_pretrain=False)
    bound, base = sctx.eval_ctx.max_macs, sctx.eval_ctx.base.macs
    # uniform rate 0.0 = the baseline (100 % MACs > 50 % bound): fitted onto the bound by pruning every layer
    seed0 = df[df["number"] == 0].iloc[0]
    assert seed0["seed"] == "uniform#0" and seed0["status"] == "ok" and seed0["feasible"]
    assert 0.4 * base < seed0["macs"] <= bound < base and seed0["val_acc"] > 0
    assert min(lp.prune_rate for lp in Policy.from_json(seed0["policy"]).layers.values()) > 0
    seed1 = df[df["number"] == 1].iloc[0]
    assert seed1["seed"] == "uniform#1" and seed1["status"] == "ok" and seed1["macs"] <= bound
    for _, row in df.iterrows():
        pol = Policy.from_json(row["policy"])
        pol.validate(sctx.model)
        params = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("config/")}
        assert sctx.fit(sctx.space.policy_from_params(params)).hash == pol.hash == row["policy_hash"]
        assert (row["status"] == "ok") == bool(row["feasible"]) == (row["macs"] <= bound)
    ok = df[df["status"] == "ok"]
    assert s.best is not None and s.best["val_acc"] == ok["val_acc"].max() and s.best["macs"] <= bound
    assert s.best_policy.hash == s.best["policy_hash"]
    csv = pd.read_csv(s.results_csv)
    assert sorted(csv["number"]) == list(range(n)) and list(csv.columns[:6]) == list(df.columns[:6])


@pytest.mark.slow
def test_local_run_then_resume_with_more_trials(tmp_path: Path) -> None:
    import ray
    from slimsearch.search.ray_runner import ray_experiment_dir, ray_trials, run_ray
    from slimsearch.search.report import study_status, trials_frame

    cfg = load_study(_write_study(tmp_path, "local"))
    lines: list[str] = []
    s = run_ray(cfg, log=lines.append)
    assert not ray.is_initialized()  # the local Ray it started is shut down
    assert not s.resumed and s.experiment_dir == ray_experiment_dir(cfg) and s.experiment_dir.is_dir()
    _check_run(cfg, s, 4)
    assert sum(ln.startswith("trial ") for ln in lines) == 4
    first = s.table.set_index("trial_id")[["number", "val_acc", "macs"]]

    s2 = run_ray(cfg, n_trials=6, progress=False, log=lines.append)
    assert s2.resumed
    _check_run(cfg, s2, 6)
    kept = s2.table.set_index("trial_id").loc[first.index, ["number", "val_acc", "macs"]]
    assert kept.equals(first)  # the first 4 trials are kept, not re-run
    assert ray_trials(cfg)["trial_id"].tolist() == s2.table["trial_id"].tolist()  # read back without Ray
    pol, m = _pick(cfg)
    assert pol.hash == s2.best_policy.hash and m["val_acc"] == s2.best["val_acc"]
    st = study_status(cfg)
    assert (st.counted, st.n_trials, st.best["trial"]) == (6, 6, s2.best["trial"])
    assert st.seeds == ["uniform#0", "uniform#1"] and st.by_state == s2.by_state
    assert (trials_frame(_ray_records(cfg))["state"] == "COMPLETE").all()


def _legacy_pickle(obj: object) -> bytes:
    """``obj`` pickled as a version before the package rename pickled it: classes by their old module names
    (``search.ray_runner.SlotGenerator``, not ``slimsearch.search.ray_runner.SlotGenerator``)."""
    import pickletools

    import cloudpickle

    data = cloudpickle.dumps(obj, protocol=2)  # protocol 2 names a class with GLOBAL "<module> <name>", no frames
    ops = list(pickletools.genops(data))
    out = bytearray()
    for (op, arg, pos), nxt in zip(ops, [*[p for _, _, p in ops[1:]], len(data)], strict=True):
        if op.name == "GLOBAL" and arg.startswith("slimsearch."):
            module, name = arg.split(" ", 1)
            out += b"c" + module.removeprefix("slimsearch.").encode() + b"\n" + name.encode() + b"\n"
        else:
            out += data[pos:nxt]
    old = bytes(out)
    assert b"csearch.ray_runner\nSlotGenerator\n" in old and b"cslimsearch." not in old
    return old


def test_searcher_pickled_under_old_module_names_loads_as_todays_classes(tmp_path: Path) -> None:
    """What restoring a pre-rename experiment needs: its pickled search algorithm comes back as today's
    classes inside ``legacy_module_names``, and the old names are gone again afterwards."""
    import pickle

    from slimsearch.search.legacy_names import legacy_module_names
    from slimsearch.search.ray_runner import SlimOptunaSearch, SlotGenerator, make_search_alg
    from slimsearch.spaces.config import SpaceConfig
    from slimsearch.spaces.space import SearchSpace

    cfg = load_study(_write_study(tmp_path, "legacy"))
    space = SearchSpace.build(build_model("smallcnn", 10, 1), SpaceConfig(), (1, 1, 8, 8))
    gen = make_search_alg(cfg, space, [("uniform#0", space.uniform_policy(0.3))], workers=1)
    old = _legacy_pickle(gen)
    before = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "search"}
    with legacy_module_names():
        back = pickle.loads(old)
    assert type(back) is SlotGenerator and type(back.searcher.searcher) is SlimOptunaSearch
    assert back.searcher.searcher.seed_labels == ("uniform#0",) and back.meta_path == gen.meta_path
    assert {n: m for n, m in sys.modules.items() if n.split(".")[0] == "search"} == before
    import slimsearch.search.ray_runner as rr

    assert rr.__spec__.name == "slimsearch.search.ray_runner"  # the alias did not rename the module


@pytest.mark.slow
def test_experiment_from_before_the_rename_resumes(tmp_path: Path) -> None:
    """A Ray experiment whose pickles name ``search.ray_runner`` (written before the package rename) resumes:
    its finished trials are kept and the larger target is reached."""
    import pickle

    from slimsearch.search.legacy_names import legacy_module_names
    from slimsearch.search.ray_runner import ray_experiment_dir, run_ray

    cfg = load_study(_write_study(tmp_path, "old", n_trials=2, workers=1))
    s = run_ray(cfg, progress=False, log=lambda _: None)
    assert s.counted == 2
    rewritten = 0
    for pkl in ray_experiment_dir(cfg).rglob("*.pkl"):
        with legacy_module_names():
            obj = pickle.loads(pkl.read_bytes())
        try:
            pkl.write_bytes(_legacy_pickle(obj))
            rewritten += 1
        except AssertionError:  # a pickle without our classes: nothing to rename
            continue
    assert rewritten >= 1
    s2 = run_ray(cfg, n_trials=3, progress=False, log=lambda _: None)
    assert s2.resumed and s2.counted == 3 and s2.done
    kept = s2.table.set_index("trial_id").loc[s.table["trial_id"], "val_acc"]
    assert kept.tolist() == s.table["val_acc"].tolist()  # the old trials are kept, not re-run


# ----------------------------------------------------------------------------- a real two-node cluster


def _tree(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (our temp dir), and all their descendants."""
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in cmd:
            roots.add(int(d.name))
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _kill_tree(marker: str, seen: set[int]) -> set[int]:
    """SIGTERM, then SIGKILL, every process of our cluster; returns what is still alive."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _tree(marker) | {p for p in seen if Path(f"/proc/{p}").exists()}
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.time() + wait
        while time.time() < end and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        for p in pids:  # reap our own zombies (the `ray start` children, if any)
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
    return {p for p in _tree(marker) | seen if Path(f"/proc/{p}").exists() and _state(p) != "Z"}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


_DRIVER = """
import json, sys
from slimsearch.search.study import load_study
from slimsearch.search.ray_runner import run_ray
s = run_ray(load_study(sys.argv[1]), address=sys.argv[2], progress=False)
print("SUMMARY " + json.dumps({"counted": s.counted, "done": s.done, "best": s.best, "csv": str(s.results_csv)}))
"""


@pytest.mark.slow
def test_real_local_cluster_head_plus_worker_node(tmp_path: Path) -> None:
    """`ray start --head` + a second `ray start` node on loopback, then `run_ray(address=...)` as a user runs it:
    a separate driver process with RAY_AUTH_MODE=token (Ray reads it when first imported)."""
    from slimsearch.search.ray_runner import ray_trials

    temp = tempfile.mkdtemp(prefix="slimray", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env["RAY_AUTH_MODE"] = "token"  # Ray >= 2.5x clusters use token auth; a client with an address must opt in
    ray_bin = str(Path(sys.executable).with_name("ray"))
    seen: set[int] = set()
    try:
        for args in (
            ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false"],
            [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
        ):
            subprocess.run([ray_bin, "start", *args, f"--temp-dir={temp}", "--disable-usage-stats"], env=env,
                           check=True, capture_output=True, timeout=180)  # fmt: skip
            seen |= _tree(temp)
        study = _write_study(tmp_path, "cluster", n_trials=4, workers=2)
        p = subprocess.run([sys.executable, "-c", _DRIVER, str(study), f"127.0.0.1:{port}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        seen |= _tree(temp)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        summary = json.loads(p.stdout.split("SUMMARY ", 1)[1])
        assert summary["counted"] == 4 and summary["done"] and summary["best"]["trial"] in range(4)  # best feasible
        assert Path(summary["csv"]).is_file()
        df = ray_trials(load_study(study))  # read back from the experiment dir, Ray not running here
        assert len(df) == 4 and set(df["status"]) <= {"ok", "infeasible"} and (df["number"] >= 0).all()
        nodes = set(df["node_id"])
        assert 1 <= len(nodes) <= 2 and all(isinstance(n, str) and len(n) == 56 for n in nodes)
        print(f"trials ran on {len(nodes)} node(s)")
    finally:
        left = _kill_tree(temp, seen)
        subprocess.run(["rm", "-rf", temp], check=False)
    assert not left, f"Ray processes left behind: {sorted(left)}"
