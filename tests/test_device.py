"""The study's device without a GPU: names, auto -> CPU here, the cuda error path (exit 2, nothing written),
worker-to-GPU assignment and Ray trial resources with faked GPU counts, and device = "cpu" bit-for-bit equal
to the default."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from helpers import smallcnn_checkpoint
from slimsearch.core.data import batches, load_synthetic
from slimsearch.core.device import autocast, dataset_on, grad_scaler, resolve_device
from slimsearch.core.errors import SlimError
from slimsearch.core.policy import LayerPolicy, Policy
from slimsearch.core.train import FinetuneConfig, finetune
from slimsearch.evaluators.config import EvaluatorConfig
from slimsearch.evaluators.evaluate import evaluate
from slimsearch.search.cli import main
from slimsearch.search.placement import (
    Placement,
    plan_workers,
    ray_trial_device,
    ray_trial_resources,
    visible_gpus,
    worker_env,
)
from slimsearch.search.study import DEVICE_RE, load_study
from toy import toy_context

NO_CUDA = not torch.cuda.is_available()


# ----------------------------------------------------------------------------- core.device


def test_explicit_cpu_and_auto_resolve_to_the_cpu_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", cuda_count=lambda: 4) == torch.device("cpu")  # explicit cpu ignores GPUs
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", cuda_count=lambda: 0) == torch.device("cpu")
    assert resolve_device("auto", cuda_count=lambda: 2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_count=lambda: 2) == torch.device("cuda", 1)


def test_cuda_without_cuda_is_one_line_naming_where() -> None:
    with pytest.raises(SlimError, match=r"^s\.toml: \[study\] device cuda: CUDA is not available") as e:
        resolve_device("cuda", "s.toml: [study] device", cuda_count=lambda: 0)
    assert "\n" not in str(e.value)
    with pytest.raises(SlimError, match=r"cuda:2: this machine has 2 CUDA device\(s\), cuda:0\.\.cuda:1"):
        resolve_device("cuda:2", cuda_count=lambda: 2)
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", "", 3):
        with pytest.raises(SlimError, match="expected one of auto, cpu, cuda, cuda:N"):
            resolve_device(bad)  # type: ignore[arg-type]


def test_study_file_and_core_agree_on_device_names() -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert DEVICE_RE.match(ok)
        resolve_device(ok, cuda_count=lambda: 13)
    for bad in ("gpu", "cuda:", "cuda:x", "mps"):
        assert not DEVICE_RE.match(bad)


def test_amp_contexts_and_scaler() -> None:
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert y.dtype == torch.bfloat16
    with autocast(cpu, "off"):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.float32
    assert grad_scaler(cpu, "fp16") is None and grad_scaler(torch.device("cuda"), "bf16") is None
    with pytest.raises(SlimError, match="amp: expected one of off, bf16, fp16"):
        FinetuneConfig(amp="fp8")
    with pytest.raises(SlimError, match=r"\[evaluator\] amp: unknown value 'half'; allowed: off, bf16, fp16"):
        EvaluatorConfig.from_dict({"amp": "half"})


def test_bf16_autocast_trains_and_differs_from_fp32() -> None:
    ds = load_synthetic(n=256, size=8, channels=3)
    losses = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10)
        )
        net(torch.zeros(1, 3, 8, 8))
        res = finetune(net, ds, FinetuneConfig(steps=30, batch_size=32, lr=0.05, amp=amp))
        losses[amp] = res.final_loss
        assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast keeps fp32 master weights
    assert losses["off"] < 2.0 and losses["bf16"] < 2.0  # both learn (ln 10 = 2.30 at chance)
    assert losses["off"] != losses["bf16"]  # autocast really ran in bf16


def test_dataset_on_its_own_device_is_itself_and_batches_are_unchanged() -> None:
    ds = load_synthetic(n=64, size=8, channels=3)
    assert dataset_on(ds, torch.device("cpu")) is ds
    moved = dataclasses.replace(ds, x=ds.x.clone(), y=ds.y.clone())  # another copy: batches draw the same
    for (xa, ya), (xb, yb) in zip(
        batches(ds, 16, shuffle=True, augment_data=True, seed=3),
        batches(moved, 16, shuffle=True, augment_data=True, seed=3),
        strict=True,
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_dataset_crosses_to_another_device_once() -> None:
    """Checked on the meta device (no GPU here): one copy per dataset and device, reused, labels and classes kept."""
    meta = torch.device("meta")
    ds = load_synthetic(n=64, size=8, channels=3)
    first = dataset_on(ds, meta)
    assert first.x.device == meta and first.y.device == meta and first.x.dtype == torch.uint8
    assert first.x.shape == ds.x.shape and first.classes == ds.classes and first.mean == ds.mean
    assert dataset_on(ds, meta) is first  # reused, not copied again
    other = load_synthetic(n=32, size=8, channels=3, seed=1)
    assert dataset_on(other, meta) is not first and len(dataset_on(other, meta)) == 32
    assert ds.x.device.type == "cpu"  # the host dataset is untouched


# ----------------------------------------------------------------------------- device = cpu == the default


def _trial_metrics(ctx: object, kd: bool) -> dict:
    cfg = EvaluatorConfig(kind="finetune", steps=20, batch_size=32, lr=0.02, kd=kd, eval_every=10)
    names = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Conv2d)]  # type: ignore[attr-defined]
    r = evaluate(ctx, cfg, Policy({names[0]: LayerPolicy(prune_rate=0.5)}), cache=None)  # type: ignore[arg-type]
    return {"val_acc": r.metrics["val_acc"], "inter": r.intermediate, "status": r.status}


def test_trial_on_explicit_cpu_is_bit_for_bit_the_default() -> None:
    torch.set_num_threads(1)
    default = toy_context(steps=60, cache=None)
    explicit = dataclasses.replace(default, device=torch.device("cpu"))
    assert default.device == torch.device("cpu")
    for kd in (False, True):
        a, b = _trial_metrics(default, kd), _trial_metrics(explicit, kd)
        assert a == b and a["status"] == "ok"
    # The same trials before device support (commit 037b2c6, one thread): the CPU path did not change.
    assert default.base_val_acc == 0.9027777777777778
    assert _trial_metrics(default, False)["inter"] == [(10, 0.5659722222222222), (20, 0.84375)]
    assert _trial_metrics(default, True)["inter"] == [(10, 0.5625), (20, 0.8368055555555556)]


def test_device_and_placement_are_not_in_the_result_cache_key() -> None:
    base = EvaluatorConfig(kind="finetune")
    for other in (dict(workers=4), dict(workers="per-gpu"), dict(gpus_per_trial=0.25), dict(cpus_per_trial=3)):
        assert EvaluatorConfig(kind="finetune", **other).key == base.key  # type: ignore[arg-type]
    assert EvaluatorConfig(kind="finetune", amp="off").key == base.key
    assert EvaluatorConfig(kind="finetune", amp="bf16").key != base.key  # bf16 changes the numbers
    # The keys of commit 037b2c6 (before devices): persistent result caches of existing studies stay valid.
    assert (base.key, EvaluatorConfig().key) == ("345f90f4367dba04", "60b15ed722f62c05")
    ctx = toy_context(steps=5, cache=None)
    assert dataclasses.replace(ctx, device=torch.device("cuda")).fingerprint == ctx.fingerprint


# ----------------------------------------------------------------------------- workers across GPUs


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({}, 3) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}, 2) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 4 , 6,7"}, 2) == ["4", "6"]  # only those torch sees
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 0) == []


def test_workers_round_robin_over_faked_gpus() -> None:
    plan = plan_workers("auto", 5, ["0", "1", "2"])
    assert [p.cuda_visible for p in plan] == ["0", "1", "2", "0", "1"]
    assert {p.device for p in plan} == {"cuda"} and [p.index for p in plan] == [1, 2, 3, 4, 5]
    assert [p.cuda_visible for p in plan_workers("cuda", 2, ["4", "6"])] == ["4", "6"]
    assert [p.cuda_visible for p in plan_workers("cuda:1", 3, ["4", "6"])] == ["6", "6", "6"]
    # per-gpu: one per visible GPU; one CPU worker without GPUs or on device cpu
    assert [p.cuda_visible for p in plan_workers("auto", "per-gpu", ["0", "1", "2", "3"])] == ["0", "1", "2", "3"]
    assert plan_workers("auto", "per-gpu", []) == [Placement(1, "auto")]
    assert plan_workers("cpu", "per-gpu", ["0", "1"]) == [Placement(1, "cpu")]
    # CPU workers keep the environment
    assert plan_workers("cpu", 2, ["0"]) == [Placement(1, "cpu"), Placement(2, "cpu")]
    assert plan_workers("auto", 2, []) == [Placement(1, "auto"), Placement(2, "auto")]


def test_worker_env_sets_only_its_gpu() -> None:
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert worker_env(base, Placement(2, "cuda", "1")) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}
    assert worker_env(base, Placement(1, "cpu")) == base
    assert base["CUDA_VISIBLE_DEVICES"] == "0,1"  # the driver's own environment is untouched


def test_worker_plan_errors() -> None:
    with pytest.raises(SlimError, match="device cuda: CUDA is not available"):
        plan_workers("cuda", 2, [])
    with pytest.raises(SlimError, match=r"cuda:2: this machine has 2 CUDA device"):
        plan_workers("cuda:2", 1, ["0", "1"])
    with pytest.raises(SlimError, match='workers: expected an integer >= 1 or "per-gpu"'):
        plan_workers("auto", "all", ["0"])
    with pytest.raises(SlimError, match=r'\[evaluator\] workers: expected an integer or "per-gpu", got'):
        EvaluatorConfig.from_dict({"workers": "each"})
    assert EvaluatorConfig.from_dict({"workers": "per-gpu"}).worker_count(3) == 3


def test_driver_starts_workers_with_their_gpu_and_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``_drive_workers`` gives each worker process its placement's environment and ``--device``."""
    import slimsearch.search.runner as runner

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakeProc:
        def __init__(self, cmd: list[str], env: dict[str, str], stdin: object = None) -> None:
            started.append((cmd, env))
            self.stdin = io.BytesIO()  # the driver writes the pickled config here (never to a file)

        def poll(self) -> int:
            return 0

    class FakeStudy:
        user_attrs: dict = {}

        def get_trials(self, deepcopy: bool = False) -> list:
            return []

    class FakeDisp:
        def update(self, *a: object) -> None:
            pass

    monkeypatch.setattr(runner.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(runner, "target_trials", lambda study, n: 1)
    cfg = load_study(_write_study(tmp_path, ""))
    plan = plan_workers("auto", 3, ["3", "5"])
    runner._drive_workers(cfg, FakeStudy(), 3, None, FakeDisp(), 1, plan)  # type: ignore[arg-type]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["3", "5", "3"]
    assert all(cmd[cmd.index("--device") + 1] == "cuda" for cmd, _ in started)
    assert [cmd[cmd.index("--worker-index") + 1] for cmd, _ in started] == ["1", "2", "3"]
    assert all(cmd[cmd.index("--config-pickle") + 1] == "-" for cmd, _ in started)


# ----------------------------------------------------------------------------- Ray resources


def test_ray_trial_resources_with_faked_cluster_gpus() -> None:
    assert ray_trial_resources("auto", 1, None, 0) == {"cpu": 1.0, "gpu": 0.0}
    assert ray_trial_resources("auto", 2, None, 8) == {"cpu": 2.0, "gpu": 1.0}
    assert ray_trial_resources("cuda", 1, 0.25, 1) == {"cpu": 1.0, "gpu": 0.25}  # four trials per GPU
    assert ray_trial_resources("auto", 1, 0.5, 2) == {"cpu": 1.0, "gpu": 0.5}
    assert ray_trial_resources("cpu", 4, None, 8) == {"cpu": 4.0, "gpu": 0.0}
    assert ray_trial_device({"cpu": 1.0, "gpu": 0.5}) == "cuda"
    assert ray_trial_device({"cpu": 1.0, "gpu": 0.0}) == "cpu"


def test_ray_trial_resources_refuse_what_cannot_run() -> None:
    with pytest.raises(SlimError, match="the Ray cluster has 0 GPUs"):
        ray_trial_resources("cuda", 1, None, 0)
    with pytest.raises(SlimError, match="gpus_per_trial = 2, but the Ray cluster has 1 GPUs"):
        ray_trial_resources("auto", 1, 2, 1)
    with pytest.raises(SlimError, match="device = cpu: the trials would hold GPUs"):
        ray_trial_resources("cpu", 1, 0.5, 4)
    with pytest.raises(SlimError, match="device = cuda with .* gpus_per_trial = 0"):
        ray_trial_resources("cuda", 1, 0, 4)
    with pytest.raises(SlimError, match="cpus_per_trial: expected an integer >= 1"):
        ray_trial_resources("auto", 0, None, 0)
    with pytest.raises(SlimError, match=r"\[evaluator\] gpus_per_trial: must be in \[0, 1024\], got -0.5"):
        EvaluatorConfig.from_dict({"gpus_per_trial": -0.5})
    assert EvaluatorConfig.from_dict({"gpus_per_trial": 1}).gpus_per_trial == 1.0


# ----------------------------------------------------------------------------- the command line


def _write_study(tmp: Path, study_extra: str) -> Path:
    p = tmp / "dev.toml"
    p.write_text(f"""
[study]
name = "dev"
n_trials = 2
storage = "sqlite:///{tmp}/runs/dev.db"
workdir = "{tmp}/runs/dev"
{study_extra}

[model]
factory = "smallcnn"
pretrain_epochs = 1

[data]
dataset = "digits"
val_size = 200
""")
    return p


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize(
    ("extra", "args"),
    [
        ('device = "cuda"', ["run"]),
        ("", ["run", "--device", "cuda"]),
        ("", ["run", "--device", "cuda:1", "--workers", "2"]),
        ("", ["export", "--device", "cuda"]),
        ("", ["method", "abshpc", "--device", "cuda"]),
        ("", ["worker", "--device", "cuda:1"]),
    ],
)
def test_cuda_without_cuda_exits_2_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, args: list[str]
) -> None:
    study = _write_study(tmp_path, extra)
    cmd, rest = args[0], args[1:]
    argv = [cmd, *rest[:1], str(study), *rest[1:]] if cmd == "method" else [cmd, str(study), *rest]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA is not available on this machine" in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no database, workdir or baseline


def test_bad_device_names_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(_write_study(tmp_path, 'device = "gpu"'))]) == 2
    assert "[study] device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    assert main(["run", str(_write_study(tmp_path, "")), "--device", "tpu"]) == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_help_says_latency_stays_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("run", "worker", "export", "method"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--device" in out and "latency is always measured on the CPU" in out, cmd


def test_study_device_default_and_override(tmp_path: Path) -> None:
    cfg = load_study(_write_study(tmp_path, ""))
    assert cfg.study.device == "auto"
    assert cfg.with_device("cuda:1").study.device == "cuda:1" and cfg.with_device(None) is cfg
    assert load_study(_write_study(tmp_path, 'device = "cpu"')).study.device == "cpu"


def _ray_study(tmp: Path, evaluator: str) -> Path:
    ckpt = smallcnn_checkpoint(tmp)
    path = tmp / "rayg.toml"
    path.write_text(f"""
[study]
name = "rayg"
workdir = "{tmp / "runs" / "rayg"}"
storage = "sqlite:///{tmp / "runs" / "rayg"}.db"
n_trials = 2
backend = "ray"

[model]
factory = "smallcnn"
checkpoint = "{ckpt}"

[data]
dataset = "digits"

[evaluator]
kind = "proxy"
bn_batches = 2
workers = 1
{evaluator}
""")
    return path


@pytest.mark.skipif(not NO_CUDA, reason="checks a machine without GPUs")
def test_ray_gpu_request_this_machine_cannot_meet_fails_before_writing(tmp_path: Path) -> None:
    from slimsearch.search.ray_runner import run_ray

    cfg = load_study(_ray_study(tmp_path, "gpus_per_trial = 0.5"))
    with pytest.raises(SlimError, match=r"gpus_per_trial = 0.5, but the Ray cluster has 0 GPUs"):
        run_ray(cfg, log=lambda s: None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ray_trials_request_their_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local Ray study asks Tune for {"cpu": cpus_per_trial, "gpu": 0} here, and its trials run on the CPU."""
    from ray import tune
    from slimsearch.search.ray_runner import ray_trials, run_ray

    asked: list[dict] = []
    real = tune.with_resources

    def spy(trainable: object, resources: dict) -> object:
        asked.append(dict(resources))
        return real(trainable, resources)

    monkeypatch.setattr(tune, "with_resources", spy)
    cfg = load_study(_ray_study(tmp_path, "cpus_per_trial = 2"))
    summary = run_ray(cfg, progress=False, log=lambda s: None)
    assert asked == [{"cpu": 2.0, "gpu": 0.0}]
    assert summary.counted == 2
    assert len(ray_trials(cfg)) == 2


def _cpu_study(tmp: Path, name: str, device_line: str) -> Path:
    ckpt = smallcnn_checkpoint(tmp)
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[study]
name = "{name}"
workdir = "{tmp / "runs" / name}"
storage = "sqlite:///{tmp / "runs" / name}.db"
n_trials = 3
n_startup_trials = 2
{device_line}

[model]
factory = "smallcnn"
checkpoint = "{ckpt}"

[data]
dataset = "digits"
val_size = 200

[constraint]
max_macs_ratio = 0.6

[evaluator]
kind = "finetune"
steps = 6
batch_size = 32
kd = true
eval_every = 3
workers = 1
""")
    return path


def test_study_on_explicit_cpu_is_bit_for_bit_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole study (sampler, fit, KD fine-tune trials) with device = "cpu" equals one with no device key."""
    from slimsearch.search.runner import load_optuna_study, open_storage, run_study

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    rows = {}
    for name, line in (("dflt", ""), ("cpu", 'device = "cpu"')):
        cfg = load_study(_cpu_study(tmp_path, name, line))
        run_study(cfg, progress=False, log=lambda s: None)
        trials = load_optuna_study(cfg, open_storage(cfg, create=False)).get_trials()
        rows[name] = [(t.state.name, t.values, t.user_attrs.get("policy"), t.user_attrs.get("val_acc"),
                       t.user_attrs.get("intermediate")) for t in trials]  # fmt: skip
    assert len(rows["cpu"]) == 3 and all(r[0] == "COMPLETE" for r in rows["cpu"])
    assert rows["cpu"] == rows["dflt"]


def test_evaluator_amp_reaches_the_fine_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimsearch.core.train as train

    seen: list[str] = []
    real = train.finetune

    def spy(model: torch.nn.Module, ds: object, cfg: FinetuneConfig, **kw: object) -> object:
        seen.append(cfg.amp)
        return real(model, ds, cfg, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "finetune", spy)
    ctx = toy_context(steps=5, cache=None)
    names = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    res = evaluate(ctx, EvaluatorConfig(kind="finetune", steps=3, batch_size=32, amp="bf16"),
                   Policy({names[0]: LayerPolicy(prune_rate=0.5)}), cache=None)  # fmt: skip
    assert res.status == "ok" and seen == ["bf16"]
