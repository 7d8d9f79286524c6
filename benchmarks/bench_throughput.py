"""Search throughput (issue #6 item 4): trials per hour per evaluator with 1 and 2 local workers, and where
a trial's time goes.

For each evaluator of ``--evaluators`` and each worker count of ``--workers`` this script writes a study file
to a temporary folder (``--model`` from its JPEG-adapted checkpoint, the CIFAR-10 JPEG archive with
``--val-size`` val images, ``max_macs_ratio = --bound``, the ``[space]`` of studies/<model>_cifar10.toml,
``--sampler`` sampler, a fresh SQLite storage) and runs the real runner end to end as a user would:
``python -m slimsearch run <study> --workers N --threads --threads`` (N worker processes of --threads
torch threads each when N > 1). Then it reads the trials back from the storage:

- apply / cost / train / eval: the evaluator's own time split (``metrics`` user attr: apply_s, cost_s,
  train_s (BN recalibration, plus the fine-tune for "finetune"), eval_s);
- other: the evaluator's wall_s minus those four (first use of lazily imported modules in a fresh
  process, RNG forking);
- fit: scaling an over-budget sample onto the MACs bound (``[constraint] fit = "scale"``; ``fit_s`` metric);
- storage: the trial's wall time in Optuna (datetime_start, set when the runner claims the WAITING trial,
  to datetime_complete, set by ``study.tell``) minus the evaluator's wall_s and fit: claim bookkeeping, the
  sampler's suggestion (one storage write per parameter), the result-cache lookup (its key hashes the
  training data once per process), recording the result (user attrs) and ``tell``;
- loop: per worker, the gaps between one trial's completion and its next trial's start (the claim loop:
  storage lock, stale-trial reaping, tally, top-up, progress display);
- startup: from launching the command to the first trial's start (data, baseline, workers' start-up).

Trials per hour: steady (counted trials / (last completion - first start)) and end to end (counted
trials / the command's wall time). Overhead % = (fit + apply + cost + other + storage + loop) / (all of those +
train + eval), over the feasible trials and over all trials (infeasible ones stop after the MACs gate, so they
are all "overhead" but cheap). Run from the repo root:

  python benchmarks/bench_throughput.py                          # CPU default, ~10 min
  python benchmarks/bench_throughput.py --evaluators proxy,finetune:50 --batch-size 128 --val-size 5000 \\
      --trials 24 --threads 4            # a bigger machine: the runner has no device setting, trials run on
                                         # CPU threads (4 per worker here)

Writes benchmarks/results/throughput_<model>.json and .md (``--tag`` appends a suffix) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parse_evaluator, run_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("fit", "apply", "cost", "train", "eval", "other", "storage", "loop")
OVERHEAD = ("fit", "apply", "cost", "other", "storage", "loop")


# ----------------------------------------------------------------------------- pure logic


def toml_value(v: Any) -> str:
    """A Python value as a TOML literal (strings, numbers, booleans, flat lists)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML literal for {type(v).__name__}")


def study_toml(tables: dict[str, dict[str, Any]]) -> str:
    """A study file from {section: {key: value}}."""
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def time_split(trials: Sequence[dict[str, Any]], t_launch: float, t_end: float) -> dict[str, Any]:
    """Per-phase seconds and overhead from trial records (``start``/``end`` epoch seconds, ``worker``,
    ``status``, evaluator ``metrics``); every trial's gap to the same worker's previous trial is its loop time."""
    by_worker: dict[Any, list[dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: t["start"]):
        by_worker.setdefault(t["worker"], []).append(t)
    rows = []
    for ts in by_worker.values():
        prev_end = None
        for t in ts:
            m = t["metrics"]
            rows.append({
                "status": t["status"],
                "apply": m.get("apply_s", 0.0), "cost": m.get("cost_s", 0.0),
                "train": m.get("train_s", 0.0), "eval": m.get("eval_s", 0.0),
                "other": max(0.0, m.get("wall_s", 0.0) - sum(m.get(f"{p}_s", 0.0) for p in ("apply", "cost", "train", "eval"))),
                "fit": m.get("fit_s", 0.0),
                "storage": max(0.0, (t["end"] - t["start"]) - m.get("wall_s", 0.0) - m.get("fit_s", 0.0)),
                "loop": 0.0 if prev_end is None else max(0.0, t["start"] - prev_end),
            })  # fmt: skip
            prev_end = t["end"]
    n = len(trials)
    span = (max(t["end"] for t in trials) - min(t["start"] for t in trials)) if trials else 0.0

    def split(rs: list[dict[str, float]]) -> dict[str, Any]:
        if not rs:
            return {"n": 0}
        sums = {p: sum(r[p] for r in rs) for p in PHASES}
        total = sum(sums.values())
        med = {p: float(sorted(r[p] for r in rs)[len(rs) // 2]) for p in PHASES}
        return {"n": len(rs), "mean_s": {p: sums[p] / len(rs) for p in PHASES}, "median_s": med, "total_s": total,
                "overhead_pct": 100.0 * sum(sums[p] for p in OVERHEAD) / total if total else float("nan")}  # fmt: skip

    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "trials": n,
        "ok": len(ok),
        "workers_seen": len(by_worker),
        "span_s": span,
        "startup_s": (min(t["start"] for t in trials) - t_launch) if trials else float("nan"),
        "wall_s": t_end - t_launch,
        "trials_per_hour": 3600.0 * n / span if span else float("nan"),
        "ok_trials_per_hour": 3600.0 * len(ok) / span if span else float("nan"),
        "trials_per_hour_e2e": 3600.0 * n / (t_end - t_launch),
        "all": split(rows),
        "feasible": split(ok),
    }


# ----------------------------------------------------------------------------- runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.common import adapted_dir, shared_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument("--evaluators", default="proxy,finetune:15", help="comma-separated: proxy, finetune:<steps>")
    p.add_argument("--workers", default="1,2", help="comma-separated local worker counts")
    p.add_argument("--trials", type=int, default=10, help="trials per run")
    p.add_argument("--sampler", default="random", choices=("random", "tpe"))
    p.add_argument("--bound", type=float, default=0.5, help="[constraint] max_macs_ratio")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bn-batches", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--val-size", type=int, default=1000, help="[data] val_size (images each trial scores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per evaluating process")
    p.add_argument("--raw", action="store_true", help="public checkpoint instead of the adapted one (development)")
    p.add_argument("--shared", default=shared_root(), help="folder with models/ and data/ ($SLIMSEARCH_SHARED)")
    p.add_argument("--ckpt-dir", default=str(adapted_dir()), help="adapted checkpoints ($SLIMSEARCH_ADAPTED)")
    p.add_argument("--keep", action="store_true", help="keep the temporary study folders (printed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files (throughput_<model><tag>.json)")
    return p.parse_args(argv)


def write_study(folder: Path, name: str, ev: dict[str, Any], args: argparse.Namespace, checkpoint: Path) -> Path:
    """The study file of one run (absolute paths; storage and workdir inside ``folder``)."""
    space = tomllib.loads((REPO / "studies" / f"{args.model}_cifar10.toml").read_text())["space"]
    evaluator = {**ev, "batch_size": args.batch_size, "bn_batches": args.bn_batches, "lr": args.lr}
    if ev["kind"] == "proxy":
        evaluator.pop("lr")
    tables = {
        "study": {"name": name, "sampler": args.sampler, "objectives": ["val_acc:max"], "n_trials": args.trials,
                  "seed": 0, "storage": f"sqlite:///{folder / 'study.db'}", "workdir": str(folder / "work")},
        "model": {"factory": args.model, "checkpoint": str(checkpoint)},
        "data": {"dataset": "cifar10", "root": str(Path(args.shared) / "data" / "cifar10-jpeg.tar.gz"),
                 "val_size": args.val_size},
        "constraint": {"max_macs_ratio": args.bound},
        "space": space,
        "evaluator": evaluator,
    }  # fmt: skip
    path = folder / f"{name}.toml"
    path.write_text(study_toml(tables))
    return path


def read_trials(study_file: Path) -> list[dict[str, Any]]:
    """The finished trials of a run as plain records (epoch-second start/end, worker pid, evaluator metrics)."""
    import optuna
    from slimsearch.search.runner import WORKER_ATTR
    from slimsearch.search.study import load_study

    cfg = load_study(study_file)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study.storage)
    out = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or t.datetime_start is None or t.datetime_complete is None:
            continue
        w = t.system_attrs.get(WORKER_ATTR) or {}
        out.append({"number": t.number, "state": t.state.name, "status": t.user_attrs.get("status", ""),
                    "cached": bool(t.user_attrs.get("cached")), "worker": w.get("pid"),
                    "start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp(),
                    "metrics": t.user_attrs.get("metrics", {}), "macs_ratio": t.user_attrs.get("macs_ratio")})  # fmt: skip
    return out


def one_run(label: str, ev: dict[str, Any], workers: int, args: argparse.Namespace, checkpoint: Path,
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Run one study through the CLI and return its measurements."""
    folder = Path(tempfile.mkdtemp(prefix=f"slim-throughput-{label}-w{workers}-"))
    try:
        study_file = write_study(folder, f"tp_{label.replace('-', '_')}_w{workers}", ev, args, checkpoint)
        cmd = [sys.executable, "-m", "slimsearch", "run", str(study_file), "--workers", str(workers),
               "--threads", str(args.threads), "--no-progress"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        load0 = os.getloadavg()
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        t1 = time.time()
        if proc.returncode != 0:
            raise SystemExit(
                f"{label} x{workers}: slimsearch run exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        trials = [t for t in read_trials(study_file) if not t["cached"]]
        res = {"evaluator": label, "workers": workers, **time_split(trials, t0, t1),
               "loadavg_before": load0, "loadavg_after": os.getloadavg(), "trial_records": trials}  # fmt: skip
        log(f"{label} x{workers}: {res['trials']} trials ({res['ok']} feasible) in {res['wall_s']:.0f}s; "
            f"{res['trials_per_hour']:.0f}/h steady, {res['trials_per_hour_e2e']:.0f}/h end to end; "
            f"overhead {res['feasible'].get('overhead_pct', float('nan')):.1f} % (feasible), "
            f"{res['all']['overhead_pct']:.1f} % (all); loadavg {res['loadavg_after'][0]:.1f}")  # fmt: skip
        return res
    finally:
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    """Markdown table (generated from the JSON)."""
    s = result["settings"]
    lines = [
        f"Search throughput, {s['model']} ({result['checkpoint']} checkpoint), `slimsearch run` with {s['sampler']} "
        f"sampler, {s['trials']} trials per run, {s['val_size']} val images, MACs bound {s['bound']:.0%}, "
        f"{s['threads']} torch thread(s) per worker, {result['machine']['cpus']} cores.",
        "",
        "| evaluator | workers | trials (feasible) | trials/h steady | trials/h end-to-end | fit s | apply s | cost s | "
        "train s | eval s | other s | storage s | loop s | overhead % feasible | overhead % all | < 10 % | loadavg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in result["runs"]:
        f = r["feasible"]
        m = f.get("mean_s", dict.fromkeys(PHASES, float("nan")))
        lines.append(
            f"| {r['evaluator']} | {r['workers']} | {r['trials']} ({r['ok']}) | {r['trials_per_hour']:.0f} | "
            f"{r['trials_per_hour_e2e']:.0f} | "
            + " | ".join(f"{m[p]:.2f}" for p in PHASES)
            + f" | {f.get('overhead_pct', float('nan')):.1f} | {r['all']['overhead_pct']:.1f} | "
            f"{'yes' if f.get('overhead_pct', 100) < 10 else 'no'} | {r['loadavg_after'][0]:.1f} |"
        )
    lines += ["", "Phase columns: mean seconds per feasible trial (train includes the BN recalibration). fit = scaling "
              "an over-budget sample onto the MACs bound ([constraint] fit). other = "
              "evaluator wall time outside its four phases; storage = Optuna trial wall (claim to tell) minus the "
              "evaluator's wall time; loop = gap between a worker's consecutive trials. "
              f"Run took {result['wall_s'] / 60:.1f} min."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import CHECKPOINTS, log, machine, write_results

    args = parse_args(argv)

    checkpoint = (Path(args.shared) / "models" / CHECKPOINTS[args.model]) if args.raw else (
        Path(args.ckpt_dir) / f"{args.model}-jpeg.th")  # fmt: skip
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: missing; run benchmarks/adapt_baselines.py --models {args.model} first")
    t0 = time.perf_counter()
    evs = [parse_evaluator(s, "--evaluators") for s in args.evaluators.split(",") if s.strip()]
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    runs = []
    for k, (label, ev) in enumerate(evs):
        for j, w in enumerate(counts):
            log(f"run {k * len(counts) + j + 1}/{len(evs) * len(counts)}: {label} with {w} worker(s), "
                f"{args.trials} trials")  # fmt: skip
            runs.append(one_run(label, ev, w, args, checkpoint, log))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "shared", "ckpt_dir", "keep")}  # fmt: skip
    result = {"settings": settings, "checkpoint": "raw" if args.raw else "adapted", "runs": runs,
              "wall_s": time.perf_counter() - t0, "machine": machine()}  # fmt: skip
    write_results(args.out, f"throughput_{args.model}{args.tag}", result, table(result))
    return 0


if __name__ == "__main__":
    run_script(main)
