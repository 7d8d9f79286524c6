"""benchmarks/bench_runtime.py at toy scale: smallcnn networks timed in three runtimes, round_to variants at equal
MACs, and a digits search under an ORT latency bound exported and checked in ORT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slimsearch.core.models import build_model
from slimsearch.core.policy import Policy

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")


def test_bench_runtime_toy(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import bench_runtime  # noqa: I001

    from helpers import make_baseline, write_study

    monkeypatch.chdir(tmp_path)
    study = write_study(tmp_path, make_baseline(tmp_path_factory), n_trials=3,
                        constraint="max_macs_ratio = 0.6\nmax_latency_ratio = 1.0")  # fmt: skip
    study.write_text(study.read_text() + '\n[export]\nruntime = "onnxruntime"\nformats = ["onnx"]\n')
    code = bench_runtime.main(["--models", "smallcnn", "--rounds", "1", "--repeats-b1", "2", "--repeats-big", "1",
                               "--batches", "1,4", "--round-to", "8", "--search-study", str(study),
                               "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "out" / "runtime.json").read_text())
    assert (tmp_path / "out" / "runtime.md").read_text().startswith("# Runtime benchmark")
    nets = res["models"][0]["networks"]
    assert [n["label"] for n in nets] == ["baseline", "uniform 50 %", "uniform 50 % round_to 8"]
    for n in nets:
        for key, ms in n["latency_ms"].items():
            rt, b = key.split("@")
            assert rt in bench_runtime.RUNTIMES and b in ("1", "4") and ms > 0
            base = nets[0]["latency_ms"][key]
            assert n["speedup"][key] == pytest.approx(base / ms)
            assert n["export_speedup"][key] == pytest.approx(base / ms * n["macs_ratio"])
    assert nets[0]["macs_ratio"] == 1.0
    model = build_model("smallcnn", in_channels=1)
    convs = {k: m.out_channels for k, m in model.named_modules() if hasattr(m, "out_channels")}
    rounded = Policy.from_dict(nets[2]["policy"])
    assert all(lp.keep_count(convs[k]) % 8 == 0 for k, lp in rounded.layers.items())
    assert nets[2]["macs_ratio"] <= nets[1]["macs_ratio"] + 1e-12  # at (most) equal MACs
    [s] = res["search"]
    assert s["runtime"] == "onnxruntime" and s["latency_program"] == "onnxruntime"
    assert s["bound_latency_met"] == (s["bound_latency_ratio"] <= s["max_latency_ratio"])
    assert s["export_speedup_batch1"] == pytest.approx(s["speedup_batch1"] * s["macs_ratio"])


def test_round_to_bench_fine_tunes_the_first_search_policy_and_its_rounded_variants() -> None:
    """bench_round_to.py's networks: the first committed slimsearch policy at 50 % MACs, then round_to 8 and 16
    of it, each keeping multiples of N filters (layers of N or fewer whole) at no more MACs than the original."""
    import argparse

    from slimsearch.core.macs import policy_macs

    from benchmarks.bench_round_to import trio

    model = build_model("resnet20").eval()
    nets = trio("resnet20", argparse.Namespace(budget=0.5, round_to="8,16"), model)
    assert [n["label"] for n in nets] == ["slimsearch #0", "slimsearch #0 round_to 8", "slimsearch #0 round_to 16"]
    shape = (1, 3, 32, 32)
    convs = {k: m.out_channels for k, m in model.named_modules() if hasattr(m, "out_channels")}
    first = policy_macs(model, nets[0]["policy"], shape)
    for n, net in zip((8, 16), nets[1:], strict=True):
        for name, lp in net["policy"].layers.items():
            kept = lp.keep_count(convs[name])
            assert kept % n == 0 or kept == convs[name] <= n
        assert policy_macs(model, net["policy"], shape) <= first * 1.0001
