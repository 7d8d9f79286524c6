"""Proxy fidelity (issue 22, item 6): do the search's scores rank networks as the final fine-tune does?

Every finished pruned row of bench_budget (all protocol versions and pilots, one network per distinct structure)
has the final fine-tune's val accuracy. This rebuilds each network from its row (its policy, or Torch-Pruning's
recipe for tp_global / tp_l1) and scores it as the search does (BN recalibrated, ``evaluator_steps`` steps, top-1
on the search's val images) and as the rerank does (``rerank_fraction`` of the final fine-tune, the other val
images), then sets both beside the final val accuracy: Spearman and Kendall rank correlation per cell. Val images
only: no test image is read (the test split is dropped before anything runs).

  nice -n 19 python benchmarks/probe_proxy_fidelity.py --models resnet20 --threads 1
  python benchmarks/probe_proxy_fidelity.py --tiny --results /tmp/tiny --out /tmp/fid.json     # toy scale
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from scipy.stats import kendalltau, spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimsearch.core.apply import apply_policy, model_digest  # noqa: E402
from slimsearch.core.data import DataSplits  # noqa: E402
from slimsearch.core.policy import Policy  # noqa: E402
from slimsearch.core.tp_prune import tp_prune  # noqa: E402
from slimsearch.core.train import FinetuneConfig, finetune, recalibrate_bn  # noqa: E402
from slimsearch.core.train import evaluate as accuracy  # noqa: E402

from benchmarks import bench_budget as B  # noqa: E402
from benchmarks import budget_lib as L  # noqa: E402
from benchmarks.common import SHAPE, log, run_script, shared_root  # noqa: E402

SKIP = ("baseline", "baseline+ft", L.EQUAL_COMPUTE)  # unpruned, or the same network as tp_global


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default=str(B.REPO / B.PROTOCOL), help="its [search] and [finetune] set the scores")
    p.add_argument("--models", default=None, help="only these models (comma-separated)")
    p.add_argument("--budgets", default=None, help="only these budgets (comma-separated)")
    p.add_argument("--results", default=str(B.REPO / "benchmarks" / "results" / "budget"))
    p.add_argument("--out", default=str(B.REPO / "benchmarks" / "results" / "budget" / "proxy_fidelity.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shared", default=shared_root())
    p.add_argument("--tiny", action="store_true", help="toy scale (synthetic data, random weights, few steps)")
    return p.parse_args(argv)


def finished_rows(results: Path, cell: str) -> list[tuple[str, dict[str, Any]]]:
    """(source, row) of every finished pruned row of ``cell`` with a final val accuracy, under every version and
    pilot folder; rows copied from another cell or version are left out (they are the same network)."""
    out = []
    for d in [*sorted(results.glob(f"v*/{cell}")), *sorted(results.glob(f"pilot/*/{cell}"))]:
        for p in sorted(d.glob("*.json")):
            row = json.loads(p.read_text())
            if p.stem == "cell" or p.stem in SKIP or "reused_from" in row or B.row_val(row) is None:
                continue
            out.append((f"{d.parent.relative_to(results)}/{p.stem}", row))
    return out


def rebuild(c: B.Cell, name: str, row: dict[str, Any]) -> nn.Module:
    """The pruned network of a row, before its final fine-tune."""
    if "policy" in row:
        return apply_policy(c.base, Policy.from_dict(row["policy"]), input_shape=SHAPE)
    if name == "tp_global":
        return B.tp_global_model(c)[0]
    if name == "tp_l1":
        return tp_prune(c.base, "tp_l1", float(row["ratio"]), SHAPE, max_ratio=c.proto["baselines"]["tp_max_ratio"])
    raise SystemExit(f"{name}: no policy or recipe in its row to rebuild it from")


def search_score(c: B.Cell, m: nn.Module) -> float:
    """The search's evaluator (kind finetune, as ``bench_budget.study_config`` sets it; KD off in every protocol):
    BN recalibrated on ``bn_batches`` plain batches, ``evaluator_steps`` steps, top-1 on the search's val images."""
    s = c.proto["search"]
    if s["evaluator_kd"]:
        raise SystemExit("probe_proxy_fidelity: an evaluator with KD is not reproduced here")
    m = m.to(c.device)
    recalibrate_bn(m, c.splits.train, num_batches=int(s["bn_batches"]), batch_size=c.batch_size, seed=0)
    steps = 2 if c.tiny else int(s["evaluator_steps"])
    finetune(m, c.splits.train, FinetuneConfig(steps=steps, batch_size=c.batch_size, lr=c.recipe.eval_lr,
                                               seed=0))  # fmt: skip
    return accuracy(m, c.search_val)


def correlations(nets: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Rank correlation of ``key`` with the final val accuracy over the cell's networks (None below 3)."""
    if len(nets) < 3:
        return {"spearman": None, "kendall": None}
    x, y = [n[key] for n in nets], [n["final_val_acc"] for n in nets]
    return {"spearman": float(spearmanr(x, y).statistic), "kendall": float(kendalltau(x, y).statistic)}


def probe_cell(c: B.Cell, results: Path) -> dict[str, Any]:
    name = L.cell_name(c.model, c.budget, c.epochs)
    nets: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for source, row in finished_rows(results, name):
        m = rebuild(c, source.rsplit("/", 1)[1], row)
        digest = model_digest(m)
        if digest in seen:  # the same network in another version (e.g. a baseline rerun): one point, mean final val
            seen[digest]["sources"].append(source)
            seen[digest]["final_val_accs"].append(B.row_val(row))
            continue
        net = {"sources": [source], "final_val_accs": [B.row_val(row)],
               "macs_ratio": c.macs(m) / c.base_macs}  # fmt: skip
        net["search_score"] = search_score(c, copy.deepcopy(m))
        net["rerank_score"] = B.rerank_acc(c, m)
        log(f"  {source}: search {100 * net['search_score']:.2f} %, rerank {100 * net['rerank_score']:.2f} %, "
            f"final val {100 * net['final_val_accs'][0]:.2f} %")  # fmt: skip
        seen[digest] = net
        nets.append(net)
    for n in nets:
        n["final_val_acc"] = sum(n["final_val_accs"]) / len(n["final_val_accs"])
    return {"cell": name, "networks": nets, "search_score_vs_final": correlations(nets, "search_score"),
            "rerank_score_vs_final": correlations(nets, "rerank_score")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    proto = L.load_protocol(Path(args.protocol))
    splits = B.load_data(proto, args)
    splits = DataSplits(splits.train, splits.val, None)  # val only: no test image is read
    out = []
    for model, budget, epochs in L.cells(proto):
        if (args.models is not None and model not in args.models.split(",")) or (
            args.budgets is not None and all(abs(budget - float(b)) > 1e-9 for b in args.budgets.split(","))
        ):
            continue
        cell = B.make_cell(model, budget, epochs, proto, args, splits, B.recipe(proto, False))
        log(f"{L.cell_name(model, budget, epochs)}")
        res = probe_cell(cell, Path(args.results))
        if res["networks"]:
            out.append(res)
            log(f"  search score vs final val: {res['search_score_vs_final']}; rerank: {res['rerank_score_vs_final']}")
            B.write_json(Path(args.out), {"protocol": proto["version"], "cells": out})  # after every cell
    return 0


if __name__ == "__main__":
    run_script(main)
