"""ONNX Runtime as the latency runtime (``[export] runtime = "onnxruntime"``): the programs it times, the latency
table, the evaluator's latency_ms, the export's speed-up and bound check, and ``slimsearch cost --runtime``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nets import randomize_bn
from slimsearch.core.errors import SlimError
from slimsearch.core.latency import RUNTIMES, LatencyTable, timed_program
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy
from torch import nn

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'slimsearch[onnx]') is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), (1, 8, 9, 9)),
        (nn.Conv2d(8, 8, 3, padding=(1, 0), groups=8, dilation=2), (1, 8, 12, 12)),
        (nn.Sequential(nn.Conv2d(16, 5, 1, bias=False), nn.Conv2d(5, 6, 3, padding=1, bias=False),
                       nn.Conv2d(6, 32, 1)), (1, 16, 8, 8)),  # a Tucker-2 stack
        (nn.Linear(20, 10), (1, 20)),
        (nn.Linear(20, 10), (1, 7, 20)),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 8, 8)),  # not a plain stack: the exporter's graph
    ],
)  # fmt: skip
def test_ort_programs_compute_what_the_module_does(module: nn.Module, shape: tuple[int, ...]) -> None:
    from slimsearch.core.onnx_export import layer_onnx_bytes

    module.eval()
    prog = timed_program(module, "onnxruntime", threads=2, input_shape=shape)
    assert prog.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    is_plain = not isinstance(module, nn.Sequential) or all(isinstance(m, nn.Conv2d) for m in module)
    assert (layer_onnx_bytes(module, shape) is not None) == is_plain
    for batch in (1, 3):
        x = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            y = module(x)
        torch.testing.assert_close(prog(x), y, atol=1e-5, rtol=1e-4)


def test_ort_latency_table_predicts_from_ort_timings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model("smallcnn")).eval()
    shape = (1, 1, 8, 8)
    table = LatencyTable(model, shape, repeats=3, mode="onnxruntime", path=tmp_path / "t.json",
                         memory_format="channels_last")  # fmt: skip
    assert table.memory_format == "contiguous"  # ORT picks its own layout
    assert table.base_ms > 0
    half = Policy({"features.0": LayerPolicy(prune_rate=0.5), "features.3": LayerPolicy(prune_rate=0.5)})
    pred = table.predict(model, half)
    assert pred is not None and pred > 0
    stored = json.loads((tmp_path / "t.json").read_text())
    assert stored["settings"]["mode"] == "onnxruntime" and len(stored["ops"]) == table.size > 0
    assert set(RUNTIMES) <= {"torchscript", "onnxruntime"}


def test_study_runtime_key(tmp_path: Path) -> None:
    from slimsearch.search.study import RUNTIMES as STUDY_RUNTIMES
    from slimsearch.search.study import load_study

    assert STUDY_RUNTIMES == RUNTIMES
    p = tmp_path / "s.toml"
    base = '[study]\nname = "s"\n[model]\nfactory = "smallcnn"\npretrain_epochs = 1\n[data]\ndataset = "digits"\n'
    p.write_text(base + '[export]\nruntime = "onnxruntime"\nthreads = 2\n')
    cfg = load_study(p)
    assert (cfg.export.runtime, cfg.export.threads) == ("onnxruntime", 2)
    (tmp_path / "d.toml").write_text(base)
    assert load_study(tmp_path / "d.toml").export.runtime == "torchscript"
    for bad, needle in (('runtime = "tflite"', "[export] runtime: unknown value 'tflite'; allowed: torchscript, onnxruntime"),
                        ("threads = 0", "[export] threads")):  # fmt: skip
        p.write_text(base + f"[export]\n{bad}\n")
        with pytest.raises(SlimError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_study(p)


def test_program_speedup_and_bound_check_in_ort() -> None:
    from slimsearch.core.apply import apply_policy
    from slimsearch.search.export import bound_check, program_speedup

    torch.manual_seed(0)
    base = randomize_bn(build_model("smallcnn")).eval()
    shape = (1, 1, 8, 8)
    pruned = apply_policy(base, Policy({"features.0": LayerPolicy(prune_rate=0.5)}), input_shape=shape)
    out = program_speedup(pruned, base, shape, ("pt2",), "auto", rounds=2, runtime="onnxruntime")
    assert out["latency_program"] == "onnxruntime" and out["memory_format"] == "contiguous"
    assert out["speedup_batch1"] == pytest.approx(out["base_latency_ms_batch1"] / out["latency_ms_batch1"])
    b = bound_check(pruned, base, shape, ("pt2",), ("contiguous", "contiguous"), 4, 0.9, rounds=2,
                    runtime="onnxruntime")  # fmt: skip
    assert b["bound_latency_batch"] == 4 and b["bound_latency_ratio"] == pytest.approx(
        b["bound_latency_ms"] / b["bound_base_latency_ms"]
    )
    assert b["bound_latency_met"] == (b["bound_latency_ratio"] <= 0.9)


def test_ort_study_end_to_end(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A study with an ORT latency bound: its table is ORT-timed, the evaluator's latency_ms is ORT's, and the
    export measures its speed-up and the bound in ORT."""
    from helpers import make_baseline, write_study
    from slimsearch.search.cli import main

    monkeypatch.chdir(tmp_path)
    p = write_study(tmp_path, make_baseline(tmp_path_factory), n_trials=3,
                    constraint="max_macs_ratio = 0.6\nmax_latency_ratio = 1.0", evaluator="measure_latency = true")  # fmt: skip
    p.write_text(p.read_text() + '\n[export]\nruntime = "onnxruntime"\nformats = ["onnx"]\n')
    assert main(["run", str(p), "--no-progress"]) == 0, capsys.readouterr().err
    tables = list((tmp_path / "runs" / "tiny" / "latency").glob("*.json"))
    assert [t.name for t in tables] == ["latency_b1_t1_onnxruntime.json"]
    assert main(["export", str(p), "--trial", "best"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    exp = next((tmp_path / "runs" / "tiny" / "export").iterdir())
    m = json.loads((exp / "metrics.json").read_text())
    assert m["latency_program"] == "onnxruntime" and m["latency_threads"] == 1 and "bound_latency_met" in m
    assert "onnxruntime, batch 1, 1 CPU thread" in out


def test_cost_cli_times_the_onnx_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    from slimsearch.search.cli import main

    assert main(["cost", "smallcnn", "--runtime", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime, CPU, 1 thread" in out


def test_ort_table_times_the_baseline_in_alternating_rounds_past_a_slow_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow spell during the first rounds (every program 40 % slower) must not set the baseline's time: the
    baseline and the half-width model alternate over ORT_ROUNDS rounds and each keeps its best median."""
    import slimsearch.core.latency as lat
    from slimsearch.core.cost import LatencyResult

    calls: list[str] = []

    def fake(program: object, shape: tuple[int, ...], batch_size: int = 1, threads: int = 1, repeats: int = 10,
             warmup: int = 2) -> LatencyResult:  # fmt: skip
        calls.append(type(program).__name__)
        ms = 1.0 if len(calls) % 2 == 1 else 0.6  # the baseline, then the half-width model (then the layers)
        ms *= 1.4 if len(calls) <= 6 else 1.0  # a slow spell over the first three rounds
        return LatencyResult(median_ms=ms, p90_ms=ms, batch_size=batch_size, threads=threads)

    monkeypatch.setattr(lat, "measure_latency", fake)
    model = randomize_bn(build_model("smallcnn")).eval()
    table = LatencyTable(model, (1, 1, 8, 8), repeats=3, mode="onnxruntime")
    assert len(calls) >= 2 * lat.ORT_ROUNDS  # both whole programs, every round (then the layers)
    assert table.base_ms == pytest.approx(1.0)
