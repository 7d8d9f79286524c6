"""Pure pieces of the pre-registered budget benchmark (bench_budget.py): the protocol guard, MACs matching,
per-image results, search cost in fine-tune steps, paired bootstrap and the summary (issue 22's schema)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

# Forward-only passes (BN recalibration, scoring) counted as this fraction of a training step (fwd + bwd).
FORWARD_STEP = 1.0 / 3.0


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def protocol_problem(repo: Path, rel: str) -> str | None:
    """Why the protocol file at ``repo/rel`` may not govern a run (not committed, or changed since HEAD); None when
    it is exactly the committed version."""
    if _git(repo, "ls-files", "--error-unmatch", rel).returncode != 0:
        return f"{rel} is not committed: commit the protocol before the run it governs"
    if _git(repo, "diff", "--quiet", "HEAD", "--", rel).returncode != 0:
        return f"{rel} differs from HEAD: commit it as a new protocol version (a new version number) first"
    return None


CODE_DIRS = ("core", "spaces", "evaluators", "search", "benchmarks/bench_budget.py", "benchmarks/budget_lib.py")


def code_rev(repo: Path) -> str:
    """The commit a row's code came from, ``+dirty`` when the code it runs differs from it (a protocol fixes the
    settings; this names the algorithm that ran them). On a copy without git (a GPU machine): $SLIMSEARCH_CODE_REV,
    set by whoever sent the copy, else "unknown"."""
    head = _git(repo, "rev-parse", "--short=10", "HEAD").stdout.strip()
    if not head:
        return os.environ.get("SLIMSEARCH_CODE_REV", "unknown")
    dirty = _git(repo, "status", "--porcelain", "--", *CODE_DIRS).stdout.strip()
    return head + ("+dirty" if dirty else "")


def blob_sha(path: Path) -> str:
    """Git's blob id of a file's content (``git hash-object``), computed without git."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def protocol_sha(repo: Path, rel: str) -> str:
    """Git's blob id of the committed protocol file: names its exact content, and survives rebases and merges
    (``git log --find-object=<sha>`` finds the commits that hold it)."""
    return _git(repo, "rev-parse", f"HEAD:{rel}").stdout.strip()


def version_protocol(repo: Path, vdir: Path) -> dict[str, Any]:
    """The protocol an earlier version's rows ran under, read back from git by the blob id its cells record."""
    shas = {json.loads(p.read_text())["protocol_sha"] for p in sorted(vdir.glob("*/cell.json"))}
    if len(shas) != 1:
        raise SystemExit(
            f"error: {vdir}: expected the cells of one protocol version, found protocol ids {sorted(shas)}"
        )
    text = _git(repo, "cat-file", "-p", shas.pop())
    if text.returncode != 0:
        raise SystemExit(f"error: {vdir}: its protocol is not in this repository's history ({text.stderr.strip()})")
    return tomllib.loads(text.stdout)


def load_protocol(path: Path) -> dict[str, Any]:
    """The protocol TOML, with the keys bench_budget.py needs checked (a missing one is a SystemExit line)."""
    p = tomllib.loads(path.read_text())
    for key in ("version", "data", "models", "finetune", "search", "baselines", "stats"):
        if key not in p:
            raise SystemExit(f"{path}: missing [{key}]")
    return p


def cells(protocol: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(model, budget, final fine-tune epochs) of every cell, in protocol order."""
    return [(m, float(b), float(spec["epochs"])) for m, spec in protocol["models"].items() for b in spec["budgets"]]


def gpu_cells(protocol: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The cells ``--device cuda`` runs: [gpu] ``models`` and ``budgets`` (default: every cell), at [gpu] epochs."""
    g = protocol["gpu"]
    return [(m, b, float(g["epochs"])) for m, b, _ in cells(protocol)
            if m in g.get("models", [m]) and any(abs(b - float(x)) < 1e-9 for x in g.get("budgets", [b]))]  # fmt: skip


def cell_name(model: str, budget: float, epochs: float) -> str:
    return f"{model}-{round(100 * budget)}pct-{epochs:g}ep"


def closest_setting(
    macs_at: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 14
) -> tuple[float, float]:
    """The setting x in [lo, hi] (MACs non-increasing in x) whose MACs are closest to ``target``, among the
    points a bisection visits: (x, its MACs). Matching both sides keeps a coarse channel grid within ±1 %
    where "largest MACs <= target" can land several percent under it."""
    seen: list[tuple[float, float]] = []
    a, b = lo, hi
    for _ in range(iters):
        mid = (a + b) / 2
        m = macs_at(mid)
        seen.append((mid, m))
        if m <= target:
            b = mid
        else:
            a = mid
    return min(seen, key=lambda s: (abs(s[1] - target), s[1]))


def within(macs: float, target: float, tol: float) -> bool:
    """MACs within ``tol`` (relative) of ``target``."""
    return abs(macs / target - 1.0) <= tol


def pack(correct: Sequence[bool] | np.ndarray) -> str:
    """Per-image correctness as a hex string (8 images a byte), so a row's JSON stays small."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack(hexed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[:n].astype(bool)


def cost_steps(train_steps: float, forward_images: float, batch_size: int) -> float:
    """Compute in fine-tune-step units: optimizer steps plus forward-only images at ``FORWARD_STEP`` a batch."""
    return float(train_steps) + FORWARD_STEP * float(forward_images) / batch_size


def paired_bootstrap(
    lead: Sequence[np.ndarray], other: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> dict[str, float]:
    """Mean and percentile CI of (mean accuracy of ``lead``'s rows) - (mean of ``other``'s), resampling the test
    images (the same draw for both sides: paired) and, independently, each side's rows (search seeds).

    Each entry is one row's per-image correctness on the same test images.
    """
    a, b = np.stack([np.asarray(x, float) for x in lead]), np.stack([np.asarray(x, float) for x in other])
    n = a.shape[1]
    if b.shape[1] != n:
        raise ValueError("rows scored on different test images")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        ra, rb = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        diffs[i] = a[ra][:, idx].mean() - b[rb][:, idx].mean()
    lo, hi = np.quantile(diffs, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {"mean": float(a.mean() - b.mean()), "ci_low": float(lo), "ci_high": float(hi)}


CELL_KEYS = ("model", "budget", "epochs", "protocol_sha", "rows", "lead_vs_best_baseline", "lead_vs_equal_compute",
             "search_cost_ratio", "gap_to_baseline_ft")  # fmt: skip
LEAD = "slimsearch"
EQUAL_COMPUTE = "tp_global_eqc"
REFERENCES = ("baseline", "baseline+ft")


def summarize_cell(
    model: str, budget: float, epochs: float, sha: str, rows: dict[str, dict[str, Any]], n_boot: int, seed: int = 0
) -> dict[str, Any]:
    """One (model, budget, epochs) object of summary.json from the cell's finished row files (by row name; the
    search seeds' rows are ``slimsearch-s<seed>``). Comparisons are None while a side has no finished row."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows.values():
        by_method.setdefault(r["method"], []).append(r)
    out_rows = []
    for method, rs in by_method.items():
        out_rows.append({
            "method": method,
            "test_acc": float(np.mean([r["test_acc"] for r in rs])),
            "macs_ratio": float(np.mean([r["macs_ratio"] for r in rs])),
            "cost_steps": float(np.mean([r.get("cost_steps", 0.0) for r in rs])),
            "seeds": sorted(r.get("seed", 0) for r in rs),
        })  # fmt: skip
    n_test = {r["n_test"] for r in rows.values()}

    def bits(method: str) -> list[np.ndarray]:
        return [unpack(r["test_correct"], r["n_test"]) for r in by_method.get(method, [])]

    baselines = [m for m in by_method if m not in (LEAD, EQUAL_COMPUTE, *REFERENCES)]
    best = max(baselines, key=lambda m: np.mean([r["test_acc"] for r in by_method[m]]), default=None)
    lead = bits(LEAD)
    ok = len(n_test) == 1 and bool(lead)
    lead_rows = by_method.get(LEAD, [])
    final_steps = [r["final_steps"] for r in lead_rows]
    search = [r["cost_steps"] for r in lead_rows]
    ft = by_method.get("baseline+ft")
    return {
        "model": model,
        "budget": budget,
        "epochs": epochs,
        "protocol_sha": sha,
        "rows": out_rows,
        "best_baseline": best,
        "lead_vs_best_baseline": paired_bootstrap(lead, bits(best), n_boot, seed) if ok and best else None,
        "lead_vs_equal_compute": paired_bootstrap(lead, bits(EQUAL_COMPUTE), n_boot, seed)
        if ok and EQUAL_COMPUTE in by_method
        else None,
        "search_cost_ratio": float(np.mean(search) / np.mean(final_steps)) if lead_rows else None,
        "gap_to_baseline_ft": float(np.mean([r["test_acc"] for r in lead_rows]) - ft[0]["test_acc"])
        if lead_rows and ft
        else None,
        # beyond issue 22's schema (summary.md only; summary.json keeps CELL_KEYS)
        "search_cpu_s": float(np.mean([r["search_cpu_s"] + r["rerank_cpu_s"] for r in lead_rows]))
        if lead_rows
        else None,
        "finished_rows": sorted(rows),
        "test_accs": {m: [r["test_acc"] for r in rs] for m, rs in by_method.items()},  # per seed (the picture)
    }


def schema_only(cell: dict[str, Any]) -> dict[str, Any]:
    """A summarize_cell object with exactly issue 22's keys."""
    return {k: cell[k] for k in CELL_KEYS}


def _pt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def cell_title(c: dict[str, Any]) -> str:
    return f"{c['model']}, {100 * c['budget']:.0f} % MACs, {c['epochs']:g}-epoch final fine-tune"


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """The generated summary.md: one table per cell and protocol version, then the comparisons."""
    lines = ["# Budget benchmark (generated by bench_budget.py; do not edit)", "", "![every cell](summary.png)", ""]
    for c in summary:
        lines += [f"## {cell_title(c)} (protocol v{c['version']})", f"protocol {c['protocol_sha'][:10]}", "",
                  "| row | test top-1 | MACs | cost (steps) | seeds |", "|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(c["rows"], key=lambda r: -r["test_acc"]):
            lines.append(f"| {r['method']} | {100 * r['test_acc']:.2f} % | {100 * r['macs_ratio']:.1f} % | "
                         f"{r['cost_steps']:.0f} | {','.join(map(str, r['seeds']))} |")  # fmt: skip
        for key, label in (("lead_vs_best_baseline", f"vs best baseline ({c['best_baseline']})"),
                           ("lead_vs_equal_compute", "vs equal-compute TP global")):  # fmt: skip
            v = c[key]
            txt = "not yet (rows missing)" if v is None else (
                f"{_pt(v['mean'])} pt (95 % CI {_pt(v['ci_low'])} .. {_pt(v['ci_high'])})")  # fmt: skip
            lines.append(f"- slimsearch {label}: {txt}")
        ratio = c["search_cost_ratio"]
        cpu = c.get("search_cpu_s")
        lines.append(f"- search cost / final fine-tune: {'-' if ratio is None else f'{ratio:.2f}'} (search + rerank "
                     f"{'-' if cpu is None else f'{cpu:.0f}'} CPU s per seed); "
                     f"gap to baseline+ft: {_pt(c['gap_to_baseline_ft'])} pt")  # fmt: skip
        lines.append(f"- finished rows: {', '.join(c.get('finished_rows', []))}")
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: list[dict[str, Any]], path: Path) -> Path:
    """summary.png: per cell and version, every row's test top-1 (the search's seeds as dots, their mean as a bar),
    the unpruned baseline+ft as a dashed line, and the lead over the best baseline with its 95 % CI in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(summary))
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.45 * sum(len(c["rows"]) + 2 for c in summary) + 0.5), squeeze=False)
    for ax, c in zip(axes[:, 0], summary, strict=False):
        rows = sorted(c["rows"], key=lambda r: r["test_acc"])
        rows = [r for r in rows if r["method"] != "baseline+ft"]
        names = [r["method"] for r in rows]
        accs = [100 * r["test_acc"] for r in rows]
        colors = ["tab:red" if m == LEAD else "tab:orange" if m == EQUAL_COMPUTE else "tab:gray" for m in names]
        ax.barh(range(len(rows)), accs, color=colors, alpha=0.6)
        ax.set_yticks(range(len(rows)), [f"{r['method']} ({100 * r['macs_ratio']:.1f} % MACs)" for r in rows])
        for i, m in enumerate(names):
            seeds = c.get("test_accs", {}).get(m, [])
            if len(seeds) > 1:
                ax.plot([100 * a for a in seeds], [i] * len(seeds), "k.", ms=5)
            ax.text(accs[i], i, f" {accs[i]:.2f}", va="center", fontsize=8)
        ft = next((r for r in c["rows"] if r["method"] == "baseline+ft"), None)
        if ft is not None:
            ax.axvline(
                100 * ft["test_acc"], ls="--", color="tab:blue", lw=1, label=f"baseline+ft {100 * ft['test_acc']:.2f}"
            )
            ax.legend(loc="lower right", fontsize=7)
        lead = c["lead_vs_best_baseline"]
        sub = ("lead vs best baseline: not yet" if lead is None else
               f"lead vs {c['best_baseline']}: {_pt(lead['mean'])} pt [{_pt(lead['ci_low'])}, {_pt(lead['ci_high'])}]")  # fmt: skip
        ax.set_title(f"{cell_title(c)}, v{c['version']}\n{sub}", fontsize=9)
        lo = min(accs + ([100 * ft["test_acc"]] if ft else []))
        hi = max(accs + ([100 * ft["test_acc"]] if ft else []))
        ax.set_xlim(max(0.0, lo - 3), min(100.0, hi + 2))
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("test top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
