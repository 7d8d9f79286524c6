"""``slimsearch`` command line: run / worker / status / report / export / method / train / cost / space.

Studies with ``[study] backend = "ray"`` (or run with ``--ray-address``) run on Ray Tune; status, report
and export read whichever backend holds the results (``search.backend.backend_for``).

Exit codes: 0 ok; 2 bad input (one line ``slimsearch: error: ...`` on stderr, nothing created);
1 internal error (traceback); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from slimsearch.core.errors import SlimError
from slimsearch.search.model_cmds import cmd_cost, cmd_train
from slimsearch.search.records import fmt_count
from slimsearch.search.study import StudyConfig, load_study, mask_url

# The commands import their modules when they run: ``--help`` and a bad study file answer without importing
# torch, Optuna and matplotlib.

PROG = "slimsearch"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line SlimError (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise SlimError(f"{self.prog}: {message} (see --help)")


def _int_upto(hi: int, lo: int = 1) -> Any:
    """An argparse type: an integer in [lo, hi] (one option must never start unbounded work)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {s!r}")
        return v

    return parse


MAX_PROCS = 1024  # --workers, --threads


def _workers(s: str) -> int | str:
    """--workers: an integer in [1, MAX_PROCS] or per-gpu (one worker per visible GPU)."""
    return s if s == "per-gpu" else _int_upto(MAX_PROCS)(s)


_DEVICE_HELP = ("auto | cpu | cuda | cuda:N: where trials, fine-tunes, seeds and methods run (default: [study] device, "
                "auto = CUDA when available); latency is always measured on the CPU")  # fmt: skip


def _nonneg_float(s: str, hi: float = float("inf")) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    if v > hi:
        raise argparse.ArgumentTypeError(f"expected a number in [0, {hi:g}], got {s!r}")
    return v


def _epochs(s: str) -> float:
    """Epochs: a finite number in [0, 10000]."""
    return _nonneg_float(s, 10_000.0)


def _macs(s: str) -> float:
    """MACs as a number with an optional k/M/G suffix: 60e6, 60M, 1.2G."""
    mult = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
    t = s.strip()
    f = mult.get(t[-1:], 1.0)
    try:
        v = float(t[:-1] if f != 1.0 else t) * f
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MACs such as 60e6 or 60M, got {s!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of MACs, got {s!r}")
    return v


def _version() -> str:
    from slimsearch import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="AutoML search for per-layer CNN compression policies.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    r = sub.add_parser("run", help="create or resume a study and run it to n_trials (same command after a crash)")
    r.add_argument("study", type=Path, help="study file (TOML)")
    r.add_argument("--workers", type=_workers,
                   help="worker processes, or per-gpu: one per visible GPU; on GPUs they are assigned round-robin, "
                        "each seeing only its own (default: [evaluator] workers)")  # fmt: skip
    r.add_argument("--device", help=_DEVICE_HELP)
    r.add_argument("--n-trials", type=_int_upto(1_000_000), help="override [study] n_trials (grow a finished study)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (one line per trial only)")
    r.add_argument(
        "--threads", type=_int_upto(MAX_PROCS), help="torch threads per evaluating process (default: cores / workers)"
    )
    r.add_argument("--ray-address", help="Ray cluster address (backend ray)")

    w = sub.add_parser("worker", help="join a running study (another process or machine on the same storage)")
    w.add_argument("study", type=Path)
    w.add_argument("--ray-address", help=argparse.SUPPRESS)
    w.add_argument("--config-pickle", type=Path, help=argparse.SUPPRESS)
    w.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    w.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    w.add_argument("--threads", type=_int_upto(MAX_PROCS), help="torch threads (default: torch's choice)")
    w.add_argument("--device", help=_DEVICE_HELP + "; e.g. cuda:1 to join on the second GPU")

    s = sub.add_parser("status", help="trial counts by state, best so far")
    s.add_argument("study", type=Path)
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")

    rep = sub.add_parser("report", help="Pareto table + CSV + PNG charts")
    rep.add_argument("study", type=Path)
    rep.add_argument("--trial", type=int, help="trial for the per-layer policy chart (default: best)")
    rep.add_argument("--out", type=Path, help="output folder (default: <workdir>/report)")

    e = sub.add_parser("export", help="export a trial's compressed model")
    e.add_argument("study", type=Path)
    e.add_argument("--trial", default="best", help="'best' (default) or a trial number")
    e.add_argument("--format", action="append", dest="formats", metavar="FMT",
                   help="torchscript | torchscript-frozen | pt2 | state; repeat or comma-separate (default: [export] formats)")  # fmt: skip
    e.add_argument("--finetune-epochs", type=_epochs, help="final fine-tune before export")
    e.add_argument("--max-macs", type=_macs, help="'best' among trials with at most these MACs (e.g. 60M)")
    e.add_argument("--top-k", type=_int_upto(100), default=None, metavar="K",
                   help="fine-tune the K best trials (needs --finetune-epochs) and export the best on val after it "
                        "(default: [export] top_k, 1)")  # fmt: skip
    e.add_argument("--out", type=Path, help="output folder (default: <export out>/trial-<N>)")
    e.add_argument("--device", help=_DEVICE_HELP)

    m = sub.add_parser("method", help="run one paper method alone on the study's baseline; export its policy")
    m.add_argument("name", choices=("abshpc", "mtd", "ga", "distfit"), metavar="METHOD",
                   help="abshpc | mtd | ga | distfit")  # fmt: skip
    m.add_argument("study", type=Path)
    m.add_argument("--out", type=Path, help="output folder (default: <workdir>/method-<METHOD>)")
    m.add_argument("--epsilon", type=_nonneg_float, help="abshpc: tolerated accuracy loss, a fraction (0.005 = 0.5 pt)")
    m.add_argument("--tol", type=_nonneg_float, help="mtd, ga, distfit: tolerated accuracy loss, a fraction")
    m.add_argument("--rates", help="ga, distfit: prune rate(s) instead of the sensitivity scan: R or LAYER=R,LAYER=R")
    m.add_argument(
        "--budget", type=_int_upto(1_000_000), help="at most this many evaluator calls (then steps are rejected)"
    )
    m.add_argument("--set", action="append", dest="options", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (TOML value), e.g. --set generations=20; repeatable")  # fmt: skip
    m.add_argument("--format", action="append", dest="formats", metavar="FMT",
                   help="torchscript | torchscript-frozen | pt2 | state; repeat or comma-separate (default: torchscript,state)")  # fmt: skip
    m.add_argument("--device", help=_DEVICE_HELP)

    t = sub.add_parser("train", help="train a baseline checkpoint (for models without public weights)")
    t.add_argument("model", help="zoo name (resnet20, vgg16, smallcnn...) or pkg.module:fn")
    t.add_argument("--data", default="digits", help="dataset: digits | cifar10 | cifar100 | imagefolder | synthetic")
    t.add_argument("--root", type=Path, help="data folder or archive")
    t.add_argument("--epochs", type=_epochs, required=True)
    t.add_argument("--out", type=Path, required=True, help="checkpoint file to write (state dict)")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=_int_upto(65_536), default=128)
    t.add_argument("--val-size", type=float, default=0.1, help="count or fraction held out of train (default 0.1)")
    t.add_argument("--seed", type=_int_upto(2**32 - 1, lo=0), default=0)
    t.add_argument("--num-classes", type=_int_upto(100_000, lo=2))
    t.add_argument("--device", default="cpu", help="cpu | cuda")

    sp = sub.add_parser("space", help="the whole search space: layers, coupled groups, choices, exclusions and why")
    sp.add_argument("study", type=Path)

    c = sub.add_parser("cost", help="MACs, FLOPs, params and CPU latency of a model")
    c.add_argument("model", help="zoo name, pkg.module:fn, or an exported .pt2 / TorchScript / .onnx file")
    c.add_argument("--input-shape", help="C,H,W or N,C,H,W (default: 3x32x32; 1x8x8 for smallcnn)")
    c.add_argument("--checkpoint", type=Path)
    c.add_argument("--num-classes", type=_int_upto(100_000, lo=2), default=10)
    c.add_argument("--threads", type=_int_upto(MAX_PROCS), default=1, help="threads for the latency measurement")
    c.add_argument("--runtime", choices=("eager", "torchscript", "onnxruntime"), default="eager",
                   help="what the latency times: the eager module (default), its TorchScript program, or its ONNX "
                        "export in ONNX Runtime (the slimsearch[onnx] extra)")  # fmt: skip
    return p


# ----------------------------------------------------------------------------- commands


def _load(path: Path, device: str | None = None) -> StudyConfig:
    return load_study(path).with_device(device)


def _check_device(cfg: StudyConfig) -> None:
    """cuda / cuda:N on a machine without it: one line, exit 2, before anything is read or written."""
    from slimsearch.core.device import resolve_device

    resolve_device(cfg.study.device, f"{cfg.path}: [study] device")


def cmd_run(a: argparse.Namespace) -> int:
    from slimsearch.search.backend import backend_for

    cfg = _load(a.study, a.device)
    if a.n_trials:
        cfg = cfg.with_n_trials(a.n_trials)
    backend = backend_for(cfg, ray_address=a.ray_address, to_run=True)
    if backend.driver_needs_device:  # a Ray driver needs no GPU: its trials ask Ray for theirs
        _check_device(cfg)
    backend.run(workers=a.workers, progress=not a.no_progress, threads=a.threads)
    steps = [
        f"slimsearch status {a.study}",
        f"slimsearch report {a.study}",
        f"slimsearch export {a.study} --trial best",
    ]
    print("next: " + "   |   ".join(steps + ([backend.dashboard] if backend.dashboard else [])))
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from slimsearch.search.backend import OptunaBackend, backend_for
    from slimsearch.search.runner import run_worker

    if a.config_pickle is not None:  # started by `slimsearch run --workers N`: exactly the driver's config
        if str(a.config_pickle) == "-":  # on stdin: the storage URL's password never touches the disk
            cfg = pickle.load(sys.stdin.buffer).with_device(a.device)
        else:
            with open(a.config_pickle, "rb") as fh:
                cfg = pickle.load(fh).with_device(a.device)
    else:
        cfg = _load(a.study, a.device)
        if not isinstance(backend_for(cfg, to_run=True), OptunaBackend):
            raise SlimError(f"{a.study}: backend {cfg.study.backend} has no `slimsearch worker`; add machines to "
                            "its cluster (`ray start --address HEAD:PORT`) and run with --ray-address")  # fmt: skip
    _check_device(cfg)
    ran = run_worker(cfg, parent_pid=a.parent_pid, worker_index=a.worker_index, threads=a.threads)
    if a.parent_pid is None:
        print(f"worker done: {ran} trials evaluated")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from slimsearch.search.report import study_status

    st = study_status(_load(a.study))
    print(json.dumps(st.to_dict(), default=str) if a.json else st.text())
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from slimsearch.search.backend import backend_for
    from slimsearch.search.report import write_report

    cfg = _load(a.study)
    rep = write_report(cfg, trial=a.trial, out_dir=a.out)
    print(f"Pareto front of {cfg.name} (val_acc max, MACs min; feasible trials only):")
    print(rep.table)
    for key, path in rep.files.items():
        print(f"{key:<12} {path}")
    dashboard = backend_for(cfg).dashboard
    if dashboard:
        print(f"dashboard:   {dashboard}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from slimsearch.search.export import export_trial, parse_formats, parse_trial

    cfg = _load(a.study, a.device)
    _check_device(cfg)
    formats = parse_formats(a.formats) if a.formats else None
    trial = parse_trial(a.trial)
    res = export_trial(cfg, trial, formats, a.out, a.finetune_epochs, a.max_macs, top_k=a.top_k, log=print)
    m = res.metrics
    test = f"  test_acc {m['test_acc']:.4f} (baseline {m['base_test_acc']:.4f})" if "test_acc" in m else ""
    print(f"trial {res.trial}: val_acc {m['val_acc']:.4f}{test}  MACs {m['macs']:,} ({m['macs_ratio']:.1%})  "
          f"params {m['params']:,}")  # fmt: skip
    _print_latency(m)
    for fmt, path in res.files.items():
        print(f"{fmt:<12} {path}")
    print(f"{'metrics':<12} {res.out_dir / 'metrics.json'}")
    return 0


def _print_latency(m: dict[str, Any]) -> None:
    """The exported program's measured speed-up and, with a latency bound, whether the export keeps it."""
    print(f"latency {m['latency_ms_batch1']:.2f} ms vs {m['base_latency_ms_batch1']:.2f} ms for the baseline: "
          f"{m['speedup_batch1']:.2f}x faster ({1 / m['macs_ratio']:.2f}x fewer MACs; {m['latency_program']}, "
          f"batch 1, {m.get('latency_threads', 1)} CPU thread{'s' if m.get('latency_threads', 1) > 1 else ''})")  # fmt: skip
    if "bound_latency_ratio" in m:
        verdict = "within it" if m["bound_latency_met"] else "EXCEEDS it (the search predicted it from core.latency)"
        print(f"latency bound: measured {m['bound_latency_ratio']:.1%} of the baseline's at batch "
              f"{m['bound_latency_batch']} ({m['bound_latency_ms']:.2f} vs {m['bound_base_latency_ms']:.2f} ms), "
              f"bound {m['max_latency_ratio']:.1%}: {verdict}")  # fmt: skip


def _method_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """--epsilon/--tol/--rates/--set KEY=VALUE as method options (values of --set are TOML)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in a.options:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SlimError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generations=20")
        try:
            out[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()  # a bare word: a string (e.g. --set fallback=l2)
    for flag, key, only in (("epsilon", "epsilon", ("abshpc",)), ("tol", "tol", ("mtd", "ga", "distfit"))):
        v = getattr(a, flag)
        if v is None:
            continue
        if a.name not in only:
            raise SlimError(f"--{flag} applies to {' and '.join(only)}, not to {a.name}")
        out[key] = v
    if a.rates is not None:
        if a.name not in ("ga", "distfit"):
            raise SlimError(f"--rates applies to ga and distfit, not to {a.name}")
        out["rates"] = _parse_rates(a.rates)
    return out


def _parse_rates(text: str) -> float | dict[str, float]:
    """ "0.3" -> 0.3; "features.0=0.2,features.3=0.5" -> per-layer rates in [0, 1)."""

    def rate(v: str, where: str) -> float:
        try:
            r = float(v)
        except ValueError:
            raise SlimError(f"--rates: {where} expected a rate in [0, 1), got {v!r}") from None
        if not 0 <= r < 1:
            raise SlimError(f"--rates: {where} expected a rate in [0, 1), got {v!r}")
        return r

    if "=" not in text:
        return rate(text.strip(), "")
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, sep, v = part.partition("=")
        if not sep or not layer.strip():
            raise SlimError(f"--rates: expected LAYER=RATE pairs separated by commas, got {part!r}")
        out[layer.strip()] = rate(v.strip(), f"{layer.strip()}:")
    return out


def cmd_method(a: argparse.Namespace) -> int:
    from slimsearch.search.export import parse_formats
    from slimsearch.search.method_cmd import run_method_on_study

    overrides = _method_overrides(a)
    formats = parse_formats(a.formats) if a.formats else ("torchscript", "state")
    cfg = _load(a.study, a.device)
    _check_device(cfg)
    run = run_method_on_study(cfg, a.name, overrides, budget=a.budget, out_dir=a.out, formats=formats, log=print)
    r = run.report
    base_acc = r.get("base_val_acc")
    base = f"baseline {base_acc:.4f}, loss {100 * (base_acc - r['val_acc']):.2f} pt" if base_acc is not None else ""
    print(run.table)
    print(f"{a.name} on {cfg.name}: val_acc {r['val_acc']:.4f} ({base})  "
          f"MACs {fmt_count(r['macs'])} ({r['macs_ratio']:.1%}, {r['macs_reduction_x']:.2f}x fewer)  "
          f"params {fmt_count(r['params'])} ({r['params_compression_x']:.2f}x smaller)")  # fmt: skip
    budget = f" of a budget of {r['budget']}" if r["budget"] else ""
    spent = f"; budget spent, {r['rejected_unevaluated']} steps rejected unevaluated" if r["budget_exhausted"] else ""
    print(f"evaluator calls {r['evaluator_calls']}{budget} ({r['evaluator']}){spent}; method {r['method_s']:.1f}s, "
          f"total {r['wall_s']:.1f}s")  # fmt: skip
    if r["max_macs"] is not None:
        verdict = "within" if r["feasible"] else "EXCEEDS"
        print(f"study MACs bound {fmt_count(r['max_macs'])}: the method's policy {verdict} it")
    _print_latency(r)
    for key, path in run.files.items():
        print(f"{key:<12} {path}")
    return 0


def cmd_space(a: argparse.Namespace) -> int:
    """Build the study's space on its (untrained) model: needs the data and the factory, no checkpoint or training."""
    from slimsearch.search.context import build_baseline, check_forward, input_shape_for, load_data
    from slimsearch.spaces.describe import describe_space
    from slimsearch.spaces.space import SearchSpace

    cfg = _load(a.study)
    splits = load_data(cfg)
    model, shape = build_baseline(cfg, splits), input_shape_for(cfg, splits)
    check_forward(model, shape, cfg, cfg.model.num_classes or splits.train.num_classes)
    try:
        space = SearchSpace.build(model, cfg.space, shape)
    except SlimError as e:
        raise SlimError(f"{a.study}: {e}") from None
    print(f"model {cfg.model.factory}, input {'x'.join(map(str, shape[1:]))}")
    print(describe_space(space))
    return 0


COMMANDS = {"run": cmd_run, "worker": cmd_worker, "status": cmd_status, "report": cmd_report, "export": cmd_export,
            "method": cmd_method, "train": cmd_train, "cost": cmd_cost, "space": cmd_space}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimsearch`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.cmd](args)
    except SlimError as e:
        msg = " ".join(mask_url(str(e)).split())  # exactly one line, passwords masked
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        print(f"{PROG}: internal error: {mask_url(' '.join(str(e).split()))[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
