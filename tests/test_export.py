"""slimsearch.core.export: self-contained TorchScript / pt2 files reload in a fresh interpreter without slimsearch,
state dicts rebuild through the policy, and exports are atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slimsearch.core.export as export
import torch
from nets import randomize_bn
from slimsearch.core.apply import apply_policy
from slimsearch.core.errors import SlimError
from slimsearch.core.export import export_model, load_exported, load_state
from slimsearch.core.models import build_model
from slimsearch.core.policy import LayerPolicy, Policy

SHAPE = (1, 1, 8, 8)
HALF = Policy(
    {
        "features.0": LayerPolicy(prune_rate=0.5),
        "features.3": LayerPolicy(prune_rate=0.5, decomposition="tucker", rank_ratio=0.5),
        "features.7": LayerPolicy(prune_rate=0.5, criterion="fpgm"),
        "features.10": LayerPolicy(prune_rate=0.5, decomposition="cp", rank=4),
    }
)

FRESH = """
import sys, torch
x, y = torch.load("io.pt")
if sys.argv[1].endswith(".pt2"):
    m = torch.export.load(sys.argv[1]).module()
else:
    m = torch.jit.load(sys.argv[1])
with torch.no_grad():
    ok = torch.allclose(m(x), y, atol=1e-5 + 1e-6 * float(y.abs().max()))  # frozen: BN folded, rounding
    ok5 = m(torch.cat([x] * 5)).shape == (5 * x.shape[0], 10)
bad = [k for k in sys.modules if k.split(".")[0] in ("core", "spaces", "evaluators", "search", "slimsearch")]
print("OK" if ok and ok5 and not bad else f"FAIL ok={ok} ok5={ok5} imported={bad}")
"""


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return randomize_bn(build_model("smallcnn"))


@pytest.fixture(scope="module")
def compressed(base: torch.nn.Module) -> torch.nn.Module:
    return apply_policy(base, HALF, input_shape=SHAPE)


@pytest.fixture(scope="module")
def exported(compressed: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exp") / "best"
    return export_model(compressed, HALF, out, example_input=SHAPE, metrics={"val_acc": 0.5, "macs": torch.tensor(7)})


def run_fresh(tmp_path: Path, model_file: Path, x: torch.Tensor, y: torch.Tensor) -> str:
    torch.save((x, y), tmp_path / "io.pt")
    (tmp_path / "check.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "check.py", str(model_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert repo not in env.get("PYTHONPATH", "") and proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_self_contained_formats_reload_in_a_fresh_interpreter(
    fmt: str, compressed: torch.nn.Module, exported: dict[str, Path], tmp_path: Path
) -> None:
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = compressed(x)
    assert run_fresh(tmp_path, exported[fmt], x, y) == "OK"
    with torch.no_grad():
        torch.testing.assert_close(load_exported(exported[fmt])(x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_resnet_with_pruned_residual_streams_reloads_alone(fmt: str, tmp_path: Path) -> None:
    """The option-A shortcuts of a ResNet whose residual streams are pruned gather/scatter channels; the
    exported program still runs without slimsearch and matches, at other batch sizes too."""
    model = randomize_bn(build_model("resnet20"))
    policy = Policy(
        {n: LayerPolicy(prune_rate=0.4, criterion="fpgm") for n in ("conv1", "layer2.0.conv2", "layer3.0.conv2")}
    )
    pruned = apply_policy(model, policy)
    assert pruned.layer2[0].shortcut.scatter and pruned.layer3[0].shortcut.select
    files = export_model(pruned, policy, tmp_path / "e", formats=(fmt,), example_input=(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = pruned(x)
    assert run_fresh(tmp_path, files[fmt], x, y) == "OK"


def test_frozen_torchscript_folds_batchnorm_and_reloads_alone(
    base: torch.nn.Module, compressed: torch.nn.Module, tmp_path: Path
) -> None:
    files = export_model(compressed, HALF, tmp_path / "e", formats=("torchscript-frozen",), example_input=SHAPE)
    assert sorted(files) == ["torchscript-frozen"]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = compressed(x)
    assert run_fresh(tmp_path, files["torchscript-frozen"], x, y) == "OK"
    frozen = load_exported(tmp_path / "e")  # the directory's only program
    assert "batch_norm" not in str(frozen.inlined_graph) and not list(frozen.parameters())
    assert "batch_norm" in str(torch.jit.script(compressed).inlined_graph)
    plain = export_model(compressed, HALF, tmp_path / "p", formats=("torchscript",), example_input=SHAPE)
    assert files["torchscript-frozen"].stat().st_size < plain["torchscript"].stat().st_size  # no BN tensors


def test_export_directory_contents(exported: dict[str, Path]) -> None:
    d = exported["state"].parent
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["model.torchscript.pt", "model.pt2", "model.pt", "policy.json", "metrics.json", "manifest.json", "check.pt"]
    )
    assert Policy.from_json((d / "policy.json").read_text()) == HALF
    assert json.loads((d / "metrics.json").read_text()) == {"val_acc": 0.5, "macs": 7}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["input_shape"] == list(SHAPE) and manifest["policy_hash"] == HALF.hash
    assert manifest["self_contained"] == ["pt2", "torchscript"]  # pt2 first: the main artefact
    assert {r: v["file"] for r, v in manifest["deploy"].items()} == {
        "pytorch": "model.pt2", "libtorch": "model.torchscript.pt", "finetune": "model.pt"}  # fmt: skip
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    check = torch.load(d / "check.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(d)(check["input"]), check["output"], atol=1e-5, rtol=0)


def test_pruned_torchscript_is_smaller(base: torch.nn.Module, exported: dict[str, Path], tmp_path: Path) -> None:
    original = export_model(base, None, tmp_path / "orig", formats=("torchscript",), example_input=SHAPE)
    small, big = exported["torchscript"].stat().st_size, original["torchscript"].stat().st_size
    assert small < 0.5 * big, (small, big)  # half the filters of every layer: about a quarter of the weights


def test_state_dict_rebuilds_through_the_policy(base: torch.nn.Module, tmp_path: Path) -> None:
    model = apply_policy(base, HALF, input_shape=SHAPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # "fine-tuned": weights that re-applying the policy alone would not give
    paths = export_model(model, HALF, tmp_path / "e", formats=("state",), example_input=SHAPE)
    assert list(paths) == ["state"]
    rebuilt = load_state(base, tmp_path / "e", example_input=SHAPE)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(SlimError, match="not a TorchScript model"):
        load_exported(paths["state"])
    with pytest.raises(SlimError, match="does not fit the rebuilt model"):
        load_state(build_model("smallcnn", num_classes=3), tmp_path / "e", example_input=SHAPE)


def test_failed_export_leaves_previous_export_intact(
    compressed: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "best"
    export_model(compressed, HALF, out, formats=("state",), example_input=SHAPE, metrics={"v": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export, "torchscript_program", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(compressed, HALF, out, formats=("state", "torchscript"), example_input=SHAPE, metrics={"v": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    with pytest.raises(RuntimeError):
        export_model(compressed, HALF, tmp_path / "new", formats=("torchscript",), example_input=SHAPE)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    export_model(compressed, HALF, out, formats=("state",), example_input=SHAPE, metrics={"v": 3})  # replaces
    assert json.loads((out / "metrics.json").read_text()) == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


@pytest.mark.parametrize("fmt", ["torchscript", "torchscript-frozen", "pt2"])
def test_channels_last_export_keeps_nhwc_weights_and_takes_nchw_inputs(fmt: str, tmp_path: Path) -> None:
    model = randomize_bn(build_model("resnet20"))
    policy = Policy({"layer1.0.conv1": LayerPolicy(prune_rate=0.5), "layer3.1.conv1": LayerPolicy(prune_rate=0.3)})
    pruned = apply_policy(model, policy)
    files = export_model(pruned, policy, tmp_path / "e", formats=(fmt, "state"), example_input=(1, 3, 32, 32),
                         memory_format="channels_last")  # fmt: skip
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["memory_format"] == "channels_last"
    assert next(pruned.parameters()).is_contiguous()  # the caller's model is untouched
    x = torch.randn(2, 3, 32, 32)  # plain NCHW
    with torch.no_grad():
        y = pruned(x)
    assert run_fresh(tmp_path, files[fmt], x, y) == "OK"
    if fmt == "torchscript":  # NHWC weights (pt2 stays contiguous: see core.export)
        weights = [p for p in load_exported(files[fmt]).parameters() if p.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        assert not all(w.is_contiguous() for w in weights)
    rebuilt = load_state(model, tmp_path / "e")  # the state dict loads into an ordinary model
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), y, atol=1e-5, rtol=0)


def test_channels_last_export_allows_reordered_rounding_of_large_outputs(tmp_path: Path) -> None:
    # NHWC kernels sum in another order: logits of ~1e4 differ by ~1e-2, past a fixed 1e-5 (a trained
    # ResNet-20's ~10 differed by 1.1e-5); the check is relative to the output's scale, as for frozen programs.
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet20"))
    with torch.no_grad():
        model.linear.weight.mul_(1000)
    files = export_model(model, None, tmp_path / "e", formats=("torchscript",), example_input=(1, 3, 32, 32),
                         memory_format="channels_last")  # fmt: skip
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        got = load_exported(files["torchscript"])(x)
    assert float(y.abs().max()) > 1e3
    torch.testing.assert_close(got, y, atol=1e-5 + 1e-6 * float(y.abs().max()), rtol=0)


def test_bad_requests(compressed: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(SlimError, match="unknown format 'tflite'"):
        export_model(compressed, HALF, tmp_path / "x", formats=("tflite",), example_input=SHAPE)
    with pytest.raises(SlimError, match="unknown memory_format 'nhwc'; allowed: contiguous, channels_last"):
        export_model(compressed, HALF, tmp_path / "x", example_input=SHAPE, memory_format="nhwc")
    with pytest.raises(SlimError, match="not found"):
        load_exported(tmp_path / "missing.pt")
    assert not (tmp_path / "x").exists()


def test_program_speedup_times_both_programs_as_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    """``slimsearch export``'s speed-up: the compressed and the baseline program, made alike (frozen when
    exported frozen, the export's memory format), each the best of its alternating measurements."""
    from slimsearch.core.cost import LatencyResult
    from slimsearch.search.export import program_speedup

    nhwc: list[bool] = []
    clock = iter([5.0, 9.0, 4.0, 8.0, 6.0, 10.0, 3.0, 6.0])  # model, baseline, model, baseline, ...

    def fake(program: torch.nn.Module, shape: tuple[int, ...], batch_size: int, threads: int) -> LatencyResult:
        weights = [p for p in program.parameters() if p.dim() == 4 and p.shape[1] > 3]
        nhwc.append(bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights))
        return LatencyResult(median_ms=next(clock), p90_ms=0.0, batch_size=batch_size, threads=threads)

    monkeypatch.setattr("slimsearch.core.cost.measure_latency", fake)
    base = randomize_bn(build_model("resnet20")).eval()
    pruned = apply_policy(base, Policy({"layer2.0.conv1": LayerPolicy(prune_rate=0.5)}))
    got = program_speedup(pruned, base, (1, 3, 32, 32), ("torchscript", "state"), "channels_last")
    assert got == {"latency_ms_batch1": 4.0, "base_latency_ms_batch1": 8.0, "speedup_batch1": 2.0,
                   "latency_program": "torchscript (channels_last)", "memory_format": "channels_last"}  # fmt: skip
    assert nhwc == [True] * 6 and next(base.parameters()).is_contiguous()
    frozen = program_speedup(pruned, base, (1, 3, 32, 32), ("torchscript-frozen",), "contiguous", rounds=1)
    assert frozen["latency_program"] == "torchscript-frozen (contiguous)" and frozen["speedup_batch1"] == 2.0
    assert nhwc[6:] == [False, False]  # frozen: no parameters left to be NHWC


def test_bound_check_times_each_program_in_its_layout_at_the_bounds_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's latency-bound check: the compressed program in the exported layout, the baseline's in the
    layout the bound's table timed, both at the bound's batch size, best of the rounds."""
    from slimsearch.core.cost import LatencyResult
    from slimsearch.search.export import bound_check

    base = randomize_bn(build_model("resnet20")).eval()
    pruned = apply_policy(base, Policy({"layer2.0.conv1": LayerPolicy(prune_rate=0.5)}))
    n_base = sum(p.numel() for p in base.parameters())
    seen: list[tuple[bool, bool, int]] = []
    clock = iter([7.0, 10.0, 6.0, 11.0])  # model, baseline, model, baseline

    def fake(program: torch.nn.Module, shape: tuple[int, ...], batch_size: int, threads: int) -> LatencyResult:
        is_base = sum(p.numel() for p in program.parameters()) == n_base
        seen.append((is_base, program.layer2[0].conv2.weight.is_contiguous(memory_format=torch.channels_last),
                     batch_size))  # fmt: skip
        return LatencyResult(median_ms=next(clock), p90_ms=0.0, batch_size=batch_size, threads=threads)

    monkeypatch.setattr("slimsearch.core.cost.measure_latency", fake)
    got = bound_check(pruned, base, (1, 3, 32, 32), ("torchscript",), ("channels_last", "contiguous"), 64, 0.55,
                      rounds=2)  # fmt: skip
    assert seen == [(False, True, 64), (True, False, 64)] * 2
    assert got == {"bound_latency_batch": 64, "bound_latency_ms": 6.0, "bound_base_latency_ms": 10.0,
                   "bound_latency_ratio": 0.6, "max_latency_ratio": 0.55, "bound_latency_met": False}  # fmt: skip


def test_program_speedup_auto_keeps_each_networks_faster_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """``memory_format = "auto"``: both layouts of both networks are timed; the compressed network keeps the
    layout that is faster for it (here NCHW), the baseline is compared in its own faster one (here NHWC)."""
    from slimsearch.core.cost import LatencyResult
    from slimsearch.search.export import program_speedup

    base = randomize_bn(build_model("resnet20")).eval()
    pruned = apply_policy(base, Policy({"layer2.0.conv1": LayerPolicy(prune_rate=0.5)}))
    n_base = sum(p.numel() for p in base.parameters())

    def fake(program: torch.nn.Module, shape: tuple[int, ...], batch_size: int, threads: int) -> LatencyResult:
        nhwc = program.layer2[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
        is_base = sum(p.numel() for p in program.parameters()) == n_base
        ms = {(True, True): 6.0, (True, False): 8.0, (False, True): 5.0, (False, False): 4.0}[(is_base, nhwc)]
        return LatencyResult(median_ms=ms, p90_ms=0.0, batch_size=batch_size, threads=threads)

    monkeypatch.setattr("slimsearch.core.cost.measure_latency", fake)
    got = program_speedup(pruned, base, (1, 3, 32, 32), ("torchscript",), "auto", rounds=2)
    assert got["memory_format"] == "contiguous" and got["base_memory_format"] == "channels_last"
    assert got["layout_latency_ms_batch1"] == {"contiguous": 4.0, "channels_last": 5.0}
    assert got["speedup_batch1"] == 1.5 and got["latency_program"] == "torchscript (contiguous)"
