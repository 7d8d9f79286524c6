"""evaluate / recalibrate_bn / finetune / kd_loss on tiny synthetic data and hand-made models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from slimsearch.core.data import Dataset, batches
from slimsearch.core.errors import SlimError
from slimsearch.core.train import (
    FinetuneConfig,
    NonFiniteLoss,
    build_scheduler,
    evaluate,
    final_finetune,
    finetune,
    kd_loss,
    recalibrate_bn,
)
from torch import nn


def stripes(n: int, seed: int = 0) -> Dataset:
    """4 classes on 3x8x8: horizontal or vertical stripes (random phase) drawn in channel 0 or 1, plus noise.

    Invariant to the pad-crop and horizontal-flip augmentation, and needs spatial filters to solve.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    y = y[torch.randperm(n, generator=g)]
    x = torch.randint(0, 60, (n, 3, 8, 8), generator=g).float()
    phase = torch.randint(0, 2, (n,), generator=g)
    idx = torch.arange(8)
    for i in range(n):
        line = ((idx + phase[i]) % 2).float() * 150
        pattern = line.view(8, 1).expand(8, 8) if y[i] < 2 else line.view(1, 8).expand(8, 8)
        x[i, int(y[i]) % 2] += pattern
    return Dataset(
        x=x.clamp(0, 255).to(torch.uint8), y=y.long(), classes=("h0", "h1", "v0", "v1"),
        mean=(0.3, 0.3, 0.1), std=(0.3, 0.3, 0.1), name="stripes",
    )  # fmt: skip


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


class Constant(nn.Module):
    """Always predicts ``cls`` (has one parameter so that it has a device)."""

    def __init__(self, cls: int, num_classes: int = 4, value: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.cls, self.num_classes, self.value = cls, num_classes, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes) + self.w
        out[:, self.cls] = self.value
        return out


# ---------------------------------------------------------------- evaluate


def test_evaluate_known_accuracy_and_mode_restored() -> None:
    y = torch.tensor([0] * 3 + [1] * 4 + [2] * 3).repeat(10)  # 30 % class 0
    ds = Dataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), y, ("a", "b", "c"), (0.5,), (0.5,))
    model = Constant(0, 3).train()
    assert evaluate(model, ds) == pytest.approx(0.3)
    assert evaluate(model, ds, batch_size=7) == pytest.approx(0.3)
    assert evaluate(Constant(1, 3), ds) == pytest.approx(0.4)
    assert model.training


def test_evaluate_empty_dataset_is_user_error() -> None:
    ds = Dataset(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), ("a",), (0.5,), (0.5,))
    with pytest.raises(SlimError, match="empty"):
        evaluate(Constant(0, 1), ds)


# ---------------------------------------------------------------- recalibrate_bn


def _bn_model() -> nn.Module:
    torch.manual_seed(1)
    # Dropout before the conv: recalibration must run it in eval mode, or the statistics would differ.
    return nn.Sequential(nn.Dropout(0.5), nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU())


def test_recalibrate_bn_matches_data_statistics() -> None:
    ds = stripes(256)
    model = _bn_model().train()
    model[0].eval()  # mixed modes must come back exactly
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    recalibrate_bn(model, ds, num_batches=4, batch_size=64)

    x = ds.normalize(ds.x)
    with torch.no_grad():
        conv_out = model[1](x)
    mean = conv_out.mean(dim=(0, 2, 3))
    assert torch.allclose(model[2].running_mean, mean, atol=1e-4)
    assert not torch.allclose(model[2].running_mean, torch.zeros(4), atol=1e-2)
    # running_var is the cumulative average of the per-batch unbiased variances
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))  # batches(shuffle, seed=0)
    per_batch = [conv_out[order[i : i + 64]].transpose(0, 1).reshape(4, -1).var(dim=1) for i in range(0, 256, 64)]
    assert torch.allclose(model[2].running_var, torch.stack(per_batch).mean(0), rtol=1e-4, atol=1e-5)

    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model[2].momentum == 0.1
    assert model.training and not model[0].training and model[2].training


def test_recalibrate_bn_single_full_batch_gives_exact_variance() -> None:
    ds = stripes(64)
    model = _bn_model().eval()
    recalibrate_bn(model, ds, num_batches=1, batch_size=64)
    with torch.no_grad():
        conv_out = model[1](ds.normalize(ds.x))
    flat = conv_out.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(model[2].running_mean, flat.mean(1), atol=1e-4)
    assert torch.allclose(model[2].running_var, flat.var(1), rtol=1e-4)
    assert not model.training


def test_recalibrate_bn_uses_only_num_batches() -> None:
    ds = stripes(256)
    model = _bn_model()
    recalibrate_bn(model, ds, num_batches=2, batch_size=32)
    assert int(model[2].num_batches_tracked) == 2


# ---------------------------------------------------------------- kd_loss


def test_kd_loss_limits() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(s, y, label_smoothing=0.1)
    assert torch.allclose(kd_loss(s, t, y, alpha=1.0, T=4.0, label_smoothing=0.1), ce)
    # identical logits: the KL term vanishes whatever alpha and T
    assert torch.allclose(kd_loss(s, s, y, alpha=0.3, T=2.0), 0.3 * F.cross_entropy(s, y), atol=1e-6)


def test_kd_loss_kl_term_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    T = 2.0
    p = torch.softmax(t / T, 1)[0]
    q = torch.softmax(s / T, 1)[0]
    kl = float((p * (p / q).log()).sum())
    got = kd_loss(s, t, torch.tensor([0]), alpha=0.0, T=T)
    assert float(got) == pytest.approx(T * T * kl, rel=1e-5)


# ---------------------------------------------------------------- finetune


def test_finetune_learns_synthetic_task() -> None:
    train, val = stripes(512, seed=0), stripes(256, seed=1)
    model = tiny_cnn()
    before = evaluate(model, val)
    lines: list[str] = []
    cfg = FinetuneConfig(steps=80, batch_size=32, lr=0.05, schedule="cosine", warmup=0.05)
    res = finetune(model, train, cfg, log=lines.append, log_every=40)
    after = evaluate(model, val)
    assert before < 0.5
    assert after > 0.9, (before, after)
    assert res.steps == 80 and math.isfinite(res.final_loss) and res.final_loss < 0.5
    assert len(lines) == 2 and lines[-1].startswith("step 80/80 loss") and "eta" in lines[-1]
    assert model.training  # mode restored (it was in train mode)


def test_finetune_is_deterministic() -> None:
    train = stripes(128)
    cfg = FinetuneConfig(steps=12, batch_size=16, lr=0.05, seed=3)
    a, b = tiny_cnn(), tiny_cnn()
    ra, rb = finetune(a, train, cfg), finetune(b, train, cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ra.final_loss == rb.final_loss
    c = tiny_cnn()
    finetune(c, train, FinetuneConfig(steps=12, batch_size=16, lr=0.05, seed=4))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_finetune_does_not_disturb_global_rng() -> None:
    model, ds = tiny_cnn(), stripes(32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, ds, FinetuneConfig(steps=2, batch_size=16))
    assert torch.equal(torch.rand(3), expected)


def test_finetune_epochs_give_full_batch_steps() -> None:
    res = finetune(tiny_cnn(), stripes(100), FinetuneConfig(epochs=1.5, batch_size=32))
    assert res.steps == math.ceil(1.5 * (100 // 32))
    res = finetune(tiny_cnn(), stripes(100), FinetuneConfig(epochs=100.0, steps=3, batch_size=32))
    assert res.steps == 3  # steps wins


def test_finetune_with_teacher_moves_student_towards_teacher() -> None:
    train = stripes(128)
    teacher = tiny_cnn(seed=5)
    finetune(teacher, train, FinetuneConfig(steps=40, batch_size=32, lr=0.05))
    teacher.train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_cnn(seed=6)
    x = train.normalize(train.x)

    def gap() -> float:
        with torch.no_grad():
            s, t = student.eval()(x), teacher.eval()(x)
        return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True))

    before = gap()
    teacher.train()
    student.train()
    finetune(student, train, FinetuneConfig(steps=30, batch_size=32, lr=0.05, kd_alpha=0.0, kd_temperature=2.0),
             teacher=teacher)  # fmt: skip
    assert gap() < 0.5 * before
    teacher.train()
    for k, v in teacher.state_dict().items():  # teacher ran in eval mode: BN statistics untouched
        assert torch.equal(v, teacher_state[k]), k


def test_non_finite_loss_raises_with_step_and_value() -> None:
    class NaNNet(Constant):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")

    with pytest.raises(NonFiniteLoss, match=r"step 1/5: loss is nan") as info:
        finetune(NaNNet(0), stripes(32), FinetuneConfig(steps=5, batch_size=16))
    assert isinstance(info.value, SlimError)
    with pytest.raises(NonFiniteLoss, match=r"step \d+/50: loss is (nan|inf)"):
        finetune(tiny_cnn(), stripes(64), FinetuneConfig(steps=50, batch_size=16, lr=1e30, momentum=0.0))


def test_on_eval_stops_early_at_expected_step() -> None:
    seen: list[tuple[int, float]] = []

    def on_eval(step: int, acc: float) -> bool:
        seen.append((step, acc))
        return step >= 30

    res = finetune(tiny_cnn(), stripes(64), FinetuneConfig(steps=100, batch_size=16), val_ds=stripes(32, seed=1),
                   eval_every=10, on_eval=on_eval)  # fmt: skip
    assert res.steps == 30 and res.stopped_early
    assert [s for s, _ in seen] == [10, 20, 30]
    assert [h["step"] for h in res.history] == [10, 20, 30]
    assert all(0 <= acc <= 1 for _, acc in seen)
    assert [h["val_acc"] for h in res.history] == [acc for _, acc in seen]


def test_eval_without_val_ds_is_user_error() -> None:
    with pytest.raises(SlimError, match="val_ds"):
        finetune(tiny_cnn(), stripes(32), FinetuneConfig(steps=2), eval_every=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"schedule": "step"}, "schedule"), ({"epochs": 0.0}, "epochs"), ({"kd_alpha": 1.5}, "kd_alpha"),
     ({"warmup": 1.0}, "warmup"), ({"steps": 0}, "steps")],
)  # fmt: skip
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(SlimError, match=match):
        FinetuneConfig(**kwargs)


# ---------------------------------------------------------------- schedules


def _lrs(cfg: FinetuneConfig, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=0.9)
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_start_and_end() -> None:
    lrs = _lrs(FinetuneConfig(lr=0.1, schedule="cosine"), 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_with_warmup() -> None:
    lrs = _lrs(FinetuneConfig(lr=0.1, schedule="cosine", warmup=0.1), 100)
    assert lrs[0] == pytest.approx(0.1 / 11)
    assert lrs[10] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < 1e-3


def test_onecycle_schedule_start_peak_end() -> None:
    lrs = _lrs(FinetuneConfig(lr=0.1, schedule="onecycle", warmup=0.25), 100)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 24
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)


def test_constant_schedule() -> None:
    assert _lrs(FinetuneConfig(lr=0.1, schedule="constant"), 5) == pytest.approx([0.1] * 5)


def test_finetune_records_the_lrs_it_used() -> None:
    cfg = FinetuneConfig(steps=8, batch_size=16, lr=0.1, schedule="onecycle")
    res = finetune(tiny_cnn(), stripes(32), cfg)
    assert res.lrs == pytest.approx(_lrs(cfg, 8))


def test_batches_cover_dataset_for_stats() -> None:
    # guard for the recalibration test above: batches(shuffle, seed=0) uses randperm with that seed
    ds = stripes(16)
    ys = torch.cat([y for _, y in batches(ds, 4, shuffle=True, seed=0)])
    assert torch.equal(ys, ds.y[torch.randperm(16, generator=torch.Generator().manual_seed(0))])


# ---------------------------------------------------------------- final_finetune (issue 22)


def test_final_finetune_keeps_the_best_val_variant_and_never_loses_val() -> None:
    train, val = stripes(256, seed=1), stripes(128, seed=2)
    model, teacher = tiny_cnn(0), tiny_cnn(1)  # an untrained teacher: KD can only hurt
    cfg = FinetuneConfig(steps=30, batch_size=32, lr=0.05, seed=0)
    res = final_finetune(model, train, val, cfg, teacher=teacher, bn_batches=4)
    assert set(res.val_accs) == {"start", "ft", "ft+bn", "kd", "kd+bn"} and res.steps == 60
    assert res.val_acc == max(res.val_accs.values()) >= res.val_accs["start"]
    assert evaluate(model, val) == pytest.approx(res.val_acc)  # the model holds the kept variant
    assert not model.training
    plain = tiny_cnn(0)
    finetune(plain, train, cfg)
    assert res.val_accs["ft"] == pytest.approx(evaluate(plain, val))  # "ft" is exactly the plain fine-tune


def test_final_finetune_keeps_the_start_when_training_hurts() -> None:
    train, val = stripes(256, seed=1), stripes(128, seed=2)
    model = tiny_cnn(0)
    finetune(model, train, FinetuneConfig(steps=60, batch_size=32, lr=0.05, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = Dataset(train.x, (train.y + 1) % 4, train.classes, train.mean, train.std)  # labels shifted: harmful
    res = final_finetune(model, wrong, val, FinetuneConfig(steps=40, batch_size=32, lr=0.05, seed=0))
    assert res.choice == "start"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _digits_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def test_export_final_finetune_of_the_baseline_is_not_below_the_plain_finetune() -> None:
    """Issue 22's regression: the unpruned baseline fine-tuned the export's way (KD on, as the ResNet study files
    set it; BN and KD chosen on val) scores at least the plain fine-tune on the held-out test images (real
    data: scikit-learn digits). The old recipe (KD, then unaugmented recalibration) is what this replaced."""
    import copy

    from slimsearch.core.data import load_splits

    s = load_splits("digits", None, 150, seed=0, val_from="test")
    base = _digits_net()
    finetune(base, s.train, FinetuneConfig(epochs=2, batch_size=64, lr=0.05, seed=1))  # the user's checkpoint
    cfg = FinetuneConfig(epochs=2, batch_size=64, lr=0.01, seed=0)
    plain = copy.deepcopy(base)
    finetune(plain, s.train, cfg)
    export_way = copy.deepcopy(base)
    res = final_finetune(export_way, s.train, s.val, cfg, teacher=base)
    assert evaluate(export_way, s.test) >= evaluate(plain, s.test)
    assert res.val_acc >= max(res.val_accs["start"], res.val_accs["ft"])


@pytest.mark.slow
def test_export_final_finetune_of_public_resnet20_is_not_below_the_plain_finetune() -> None:
    """The same on the issue's setting: the public ResNet-20 checkpoint, JPEG CIFAR-10 (small real split: 3000
    train images, val 500 test images, reported on 2000 others), KD on as in the ResNet study files."""
    import copy

    from helpers import shared_path
    from slimsearch.core.data import load_splits, split_train_val
    from slimsearch.core.models import build_model, load_checkpoint

    archive, ckpt = shared_path("data", "cifar10-jpeg.tar.gz"), shared_path("models", "resnet20-12fca82f.th")
    full = load_splits("cifar10", archive, 500, seed=0, val_from="test")
    train = split_train_val(full.train, 3000, seed=1)[1]
    test = split_train_val(full.test, 2000, seed=2)[1]
    base = load_checkpoint(build_model("resnet20"), ckpt).eval()
    cfg = FinetuneConfig(epochs=1, batch_size=128, lr=0.01, seed=0)
    plain = copy.deepcopy(base)
    finetune(plain, train, cfg)
    export_way = copy.deepcopy(base)
    res = final_finetune(export_way, train, full.val, cfg, teacher=base)
    assert evaluate(export_way, test) >= evaluate(plain, test), res.val_accs


def test_final_finetune_resumed_from_a_checkpoint_ends_as_an_uninterrupted_run() -> None:
    train, val = stripes(256, seed=1), stripes(128, seed=2)
    cfg = FinetuneConfig(steps=30, batch_size=32, lr=0.05, seed=0)
    whole = tiny_cnn(0)
    want = final_finetune(whole, train, val, cfg, teacher=tiny_cnn(1), bn_batches=4)
    saved: list[dict] = []
    first = tiny_cnn(0)
    final_finetune(first, train, val, cfg, teacher=tiny_cnn(1), bn_batches=4,
                   checkpoint=lambda state: saved.append(copy.deepcopy(state)),  # live tensors: copy them now
                   checkpoint_every=10)  # fmt: skip
    assert [(s["tag"], s["finetune"]["step"]) for s in saved] == [("ft", 10), ("ft", 20), ("kd", 10), ("kd", 20)]
    for state in (saved[1], saved[2]):  # killed in the plain fine-tune, and in the KD one after ft was scored
        again = tiny_cnn(7)  # whatever it holds: the checkpoint's start and steps win
        got = final_finetune(again, train, val, cfg, teacher=tiny_cnn(1), bn_batches=4, resume=state)
        assert (
            (got.choice, got.val_accs, got.steps)
            == (want.choice, want.val_accs, want.steps)
            == (got.choice, got.val_accs, 60)
        )
        for a, b in zip(again.state_dict().values(), whole.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)
