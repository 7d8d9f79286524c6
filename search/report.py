"""Study status and report: trial table, Pareto front (val_acc vs MACs, plus latency when it is an
objective) as text and CSV, and PNG charts (matplotlib, Agg): Pareto scatter and a per-layer policy chart.

Everything is read through the study's backend (``search.backend``: its ``TrialRecord``s and ``StudyInfo``),
so a report never rebuilds the model and works the same for Optuna and Ray Tune studies. Optuna studies are
ordinary RDB studies: ``optuna-dashboard <storage URL>`` opens them too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import Policy
from slimsearch.search.backend import backend_for
from slimsearch.search.records import TrialRecord, best, best_summary, fmt_count
from slimsearch.search.study import StudyConfig

COLUMNS = ["trial", "state", "status", "val_acc", "macs", "macs_ratio", "flops", "params", "params_ratio",
           "latency_ms", "latency_pred_ms", "seed", "policy", "duration_s", "reason"]  # fmt: skip
LATENCY_METRICS = ("latency_ms", "latency_pred_ms")  # measured (evaluator), predicted (core.latency)
METRIC_COLUMNS = COLUMNS[3:12]


def trials_frame(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial with its state, evaluator status, metrics and policy summary."""
    rows = [
        {
            "trial": r.number,
            "state": r.state,
            "status": r.status,
            **{k: r.metric(k) for k in METRIC_COLUMNS},
            "seed": r.seed,
            "policy": r.policy_summary,
            "duration_s": r.duration_s,
            "reason": r.reason,
        }  # fmt: skip
        for r in records
    ]
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("val_acc", "macs", "macs_ratio", "flops", "params", "params_ratio", *LATENCY_METRICS, "duration_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def pareto_front(df: pd.DataFrame, latency: str | None = None) -> pd.DataFrame:
    """Non-dominated feasible COMPLETE trials: max val_acc, min MACs (and min ``latency``, a column of
    ``LATENCY_METRICS``), sorted by MACs."""
    ok = df[(df["state"] == "COMPLETE") & (df["status"] == "ok")].dropna(subset=["val_acc", "macs"])
    cols = ["val_acc", "macs"] + ([latency] if latency and latency in ok and ok[latency].notna().all() else [])
    if ok.empty:
        return ok
    # Minimise everything: negate accuracy.
    v = ok[cols].to_numpy(dtype=float) * np.array([-1.0] + [1.0] * (len(cols) - 1))
    le = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # le[i, j]: i is no worse than j everywhere
    lt = (v[:, None, :] < v[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)
    return ok[~dominated].sort_values(["macs", "val_acc"], ascending=[True, False])


@dataclass
class StudyStatus:
    name: str
    storage: str  # masked
    n_trials: int
    counted: int
    by_state: dict[str, int]
    best: dict[str, Any] | None
    objectives: list[str]
    seeds: list[str] = field(default_factory=list)

    def text(self) -> str:
        states = " · ".join(f"{k} {v}" for k, v in sorted(self.by_state.items())) or "no trials"
        lines = [
            f"study {self.name}  ({self.storage})",
            f"objectives {', '.join(self.objectives)}",
            f"trials {self.counted}/{self.n_trials} done  [{states}]",
        ]
        if self.seeds:
            lines.append(f"seeds {', '.join(self.seeds)}")
        if self.best:
            b = self.best
            ratio = f" ({b['macs_ratio']:.1%})" if b.get("macs_ratio") is not None else ""
            lat = (f"  latency {b['latency_pred_ms']:.2f} ms predicted ({b['latency_ratio']:.1%})"
                   if b.get("latency_ratio") is not None else "")  # fmt: skip
            lines.append(f"best trial {b['trial']}: val_acc {b['val_acc']:.4f}  MACs {fmt_count(b['macs'])}{ratio}  "
                         f"params {fmt_count(b['params'])}{lat}")  # fmt: skip
        else:
            lines.append("best: no feasible completed trial yet")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``slimsearch status --json``."""
        return asdict(self)


def study_status(cfg: StudyConfig) -> StudyStatus:
    """Counts by state, progress toward n_trials and the best feasible trial (read-only)."""
    backend = backend_for(cfg)
    info = backend.info()
    records = backend.records()
    return StudyStatus(info.name, info.storage, info.n_trials, sum(r.counted for r in records), info.by_state,
                       best_summary(records), info.objectives, info.seeds)  # fmt: skip


# ----------------------------------------------------------------------------- charts


def _plt() -> Any:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(df: pd.DataFrame, front: pd.DataFrame, info: dict[str, Any], path: Path, title: str) -> Path:
    """val_acc vs MACs: feasible trials, infeasible ones (rug at the bottom: never trained), seeds, the
    Pareto front, the baseline and the MACs bound."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    scale = 1e6
    ok = df[(df["status"] == "ok") & df["val_acc"].notna()]
    seeds = ok[ok["seed"] != ""]
    plain = ok[ok["seed"] == ""]
    ax.scatter(plain["macs"] / scale, plain["val_acc"], s=18, c="tab:blue", alpha=0.6, label="feasible trial")
    if not seeds.empty:
        ax.scatter(seeds["macs"] / scale, seeds["val_acc"], s=40, marker="D", c="tab:purple", label="seed trial")
    if not front.empty:
        ax.plot(front["macs"] / scale, front["val_acc"], "-o", c="tab:orange", ms=5, lw=1.5, label="Pareto front")
    bad = df[(df["status"] == "infeasible") & df["macs"].notna()]
    base = info.get("base", {})
    ys = list(ok["val_acc"]) + ([base["val_acc"]] if base.get("val_acc") is not None else [])
    lo = min(ys) if ys else 0.0
    hi = max(ys) if ys else 1.0
    pad = max(0.02, 0.05 * (hi - lo))
    y_rug = lo - pad
    if not bad.empty:
        ax.scatter(bad["macs"] / scale, [y_rug] * len(bad), marker="x", c="tab:red", s=22,
                   label="infeasible (MACs over bound, not trained)")  # fmt: skip
    if base.get("macs"):
        if base.get("val_acc") is not None:
            ax.scatter([base["macs"] / scale], [base["val_acc"]], marker="*", s=160, c="black", label="baseline")
        else:
            ax.axvline(base["macs"] / scale, c="black", ls=":", lw=1, label="baseline MACs")
    if info.get("max_macs"):
        ax.axvline(info["max_macs"] / scale, c="tab:red", ls="--", lw=1, label="MACs bound")
    ax.set_ylim(y_rug - pad, min(1.0, hi + pad) if hi <= 1.0 else hi + pad)
    ax.set_xlabel("MACs per image (millions; FLOPs = 2 x MACs)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_policy(record: TrialRecord, info: dict[str, Any], path: Path, title: str) -> Path:
    """Prune rate per conv layer (depth order) with kept/total filters; decomposed layers hatched and labelled."""
    policy = Policy.from_json(record.policy, where=f"trial {record.number} policy")
    return plot_policy_values(policy, dict(record.metrics), info, path, title)


def policy_rows(policy: Any, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per conv layer (depth order) for the policy chart: ``rate`` (fraction of filters removed),
    ``label``, ``kind`` (none, cp, tucker, or ``excluded`` for a layer the search leaves alone, with its
    ``reason``): an excluded layer is not a 0 % choice."""
    rows = []
    for layer in layers:
        name, n = layer["name"], layer.get("out_channels")
        if name not in policy.layers:
            rows.append({"name": name, "rate": 0.0, "kind": "excluded", "label": f"{n}/{n}" if n else "",
                         "reason": layer.get("excluded") or "not searched"})  # fmt: skip
            continue
        lp = policy.get(name)
        keep = lp.keep_count(n) if n else None
        lab = f"{keep}/{n}" if n else ""
        if lp.decomposition != "none":
            lab += f" {lp.decomposition}" + (f" r{lp.rank_ratio:.2f}" if lp.rank_ratio is not None else "")
        rows.append({"name": name, "rate": 1.0 - keep / n if n else lp.prune_rate, "kind": lp.decomposition,
                     "label": lab, "reason": None})  # fmt: skip
    return rows


COLORS = {"none": "tab:blue", "cp": "tab:green", "tucker": "tab:purple", "excluded": "0.85"}


def policy_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The policy chart as a matplotlib figure: one horizontal bar per layer, top to bottom in depth order, so
    that 60 layers stay readable (the height grows with the count); excluded layers are a grey row saying so."""
    plt = _plt()

    n = len(rows)
    fig, ax = plt.subplots(figsize=(9.5, max(3.5, 0.2 * n + 1.6)), dpi=120)
    y = np.arange(n)
    for yi, r in zip(y, rows, strict=True):
        if r["kind"] == "excluded":
            ax.axhspan(yi - 0.45, yi + 0.45, color=COLORS["excluded"], zorder=0)
            ax.text(0.005, yi, f"excluded: {r['reason']}", va="center", fontsize=6, color="0.3", style="italic")
        else:
            ax.barh(yi, r["rate"], color=COLORS[r["kind"]], edgecolor="black", linewidth=0.5,
                    hatch="" if r["kind"] == "none" else "//")  # fmt: skip
            ax.text(r["rate"] + 0.01, yi, r["label"], va="center", fontsize=6)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=7)
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        if r["kind"] == "excluded":
            tick.set_color("0.45")
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("fraction of filters removed (labels: kept / total filters)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=COLORS["none"], label="pruned only"),
                       Patch(facecolor=COLORS["cp"], hatch="//", label="CP"),
                       Patch(facecolor=COLORS["tucker"], hatch="//", label="Tucker-2"),
                       Patch(color=COLORS["excluded"], label="excluded from the search")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_policy_values(policy: Any, ua: dict[str, Any], info: dict[str, Any], path: Path, title: str) -> Path:
    """``plot_policy`` for a Policy and its metrics (val_acc, macs, macs_ratio) from any backend."""
    plt = _plt()
    layers = info.get("layers") or [{"name": n, "out_channels": None} for n in policy.layers]
    rows = policy_rows(policy, layers)
    searched = sum(r["kind"] != "excluded" for r in rows)
    sub = (f"{searched} of {len(rows)} conv layers searched; val_acc {ua.get('val_acc', float('nan')):.4f}, "
           f"MACs {fmt_count(ua.get('macs', 0))} ({ua.get('macs_ratio', float('nan')):.1%})")  # fmt: skip
    fig = policy_figure(rows, f"{title}\n{sub}")
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report


@dataclass
class Report:
    out_dir: Path
    files: dict[str, Path]
    front: pd.DataFrame
    table: str


def latency_objective(cfg: StudyConfig) -> str | None:
    """The latency metric the study optimises, if any."""
    return next((o.metric for o in cfg.study.objectives if o.metric in LATENCY_METRICS), None)


def _front_table(front: pd.DataFrame) -> pd.DataFrame:
    cols = ["trial", "val_acc", "macs", "macs_ratio", "params", *LATENCY_METRICS, "seed", "policy"]
    show = front[[c for c in cols if c in front]].copy()
    show["macs"] = show["macs"].map(fmt_count)
    show["params"] = show["params"].map(fmt_count)
    show["val_acc"] = show["val_acc"].map(lambda v: f"{v:.4f}")
    show["macs_ratio"] = show["macs_ratio"].map(lambda v: f"{v:.1%}")
    return show.drop(columns=[c for c in LATENCY_METRICS if c in show and show[c].isna().all()])


REPORT_FILES = ("trials.csv", "pareto.csv", "pareto.png", "study.json")


def check_report_out(out: Path) -> None:
    """A report folder must be new, empty, or an earlier report (its study.json, and only the files a report
    writes): the report overwrites those files in place, so it must never overwrite a user's own."""
    from slimsearch.search.paths import check_writable_dir

    check_writable_dir(out, "--out")
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if n not in REPORT_FILES and not (n.startswith("policy_trial") and
                                                                       n.endswith(".png")))  # fmt: skip
    if names and ("study.json" not in names or foreign):
        shown = f" (it holds {foreign[0]!r})" if foreign else ""
        raise SlimError(f"--out: {out} is a non-empty folder that is not an earlier report{shown}; its files would "
                        "be overwritten, so give a new or empty folder")  # fmt: skip


def write_report(cfg: StudyConfig, trial: int | None = None, out_dir: str | Path | None = None) -> Report:
    """Write trials.csv, pareto.csv, pareto.png and policy_trial<N>.png (N: ``trial`` or the best) to
    ``out_dir`` (default ``<workdir>/report``); return them with the printed Pareto table."""
    check_report_out(Path(out_dir) if out_dir is not None else cfg.study.workdir / "report")
    backend = backend_for(cfg)
    records = backend.records()  # a study that never ran: SlimError
    st = backend.info()
    info = st.baseline
    chosen: TrialRecord | None
    if trial is not None:
        chosen = next((r for r in records if r.number == trial), None)
        if chosen is None:
            raise SlimError(f"--trial {trial}: no such trial (the study has trials 0..{len(records) - 1})")
        if not chosen.policy:
            raise SlimError(f"--trial {trial}: trial is {chosen.state} and has no policy to chart")
    else:
        chosen = best(records)
    out = Path(out_dir) if out_dir is not None else cfg.study.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = trials_frame(records)
    front = pareto_front(df, latency_objective(cfg))
    files = {"trials_csv": out / "trials.csv", "pareto_csv": out / "pareto.csv", "pareto_png": out / "pareto.png"}
    df.to_csv(files["trials_csv"], index=False)
    front.to_csv(files["pareto_csv"], index=False)
    counted = sum(r.counted for r in records)
    plot_pareto(df, front, info, files["pareto_png"], f"{cfg.name}: {counted} trials, {len(front)} on the Pareto front")
    if chosen is not None:
        files["policy_png"] = out / f"policy_trial{chosen.number}.png"
        title = f"{cfg.name} trial {chosen.number}: {chosen.policy_summary}"
        plot_policy(chosen, info, files["policy_png"], title)
    (out / "study.json").write_text(json.dumps({"name": cfg.name, "storage": st.storage, "info": info,
                                                "n_trials": st.n_trials, "counted": counted},
                                               indent=2, default=str) + "\n")  # fmt: skip
    files["study_json"] = out / "study.json"
    table = "(no feasible completed trial yet)" if front.empty else _front_table(front).to_string(index=False)
    return Report(out, files, front, table)
