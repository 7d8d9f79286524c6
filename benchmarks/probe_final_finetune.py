"""Why the old final fine-tune lost accuracy (issue 22): BN recalibration variants and KD after a 1-epoch fine-tune.

ResNet-20 public checkpoint, JPEG CIFAR-10: 10k stratified train images (seed 1), 3000 test images (seed 2),
1 thread. Unaugmented recalibration (the old export step) vs augmented, vs keeping the trained statistics; KD.
Writes benchmarks/results/final_finetune.json:  nice python benchmarks/probe_final_finetune.py
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimsearch.core.models import build_model, load_checkpoint
from slimsearch.core.train import FinetuneConfig, evaluate, finetune, recalibrate_bn

from benchmarks.common import load_cifar, shared_root, stratified_subset

torch.set_num_threads(1)
t0 = time.time()
splits = load_cifar(shared_root(), log=print)
train = stratified_subset(splits.train, 10000, seed=1)
test = stratified_subset(splits.test, 3000, seed=2)
base = load_checkpoint(build_model("resnet20"), Path(shared_root()) / "models" / "resnet20-12fca82f.th").eval()
res = {}


def rec(k, m):
    res[k] = evaluate(m, test)
    print(f"{time.time() - t0:6.0f}s {k}: {res[k]:.4f}", flush=True)


def bnstats(m):
    return [(b.running_mean.clone(), b.running_var.clone()) for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]


def aug_recal(m, n=20):
    # like recalibrate_bn but augmented batches
    from slimsearch.core.data import batches

    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    m.eval()
    with torch.no_grad():
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
            b.train()
        for i, (x, _) in enumerate(batches(train, 128, shuffle=True, augment_data=True, seed=0)):
            if i >= n:
                break
            m(x)
        for b in bns:
            b.momentum = 0.1
            b.eval()
    return m


rec("loaded", base)
rec("loaded+recal", recalibrate_bn(copy.deepcopy(base), train, num_batches=20))
rec("loaded+recal_aug", aug_recal(copy.deepcopy(base)))
rec("loaded+recal200", recalibrate_bn(copy.deepcopy(base), train, num_batches=78))
cfg = FinetuneConfig(epochs=1, lr=0.01, batch_size=128, seed=0)
m = copy.deepcopy(base)
finetune(m, train, cfg)
rec("ft1", m)
s_ft = bnstats(m)
rec("ft1+recal", recalibrate_bn(copy.deepcopy(m), train, num_batches=20))
r = recalibrate_bn(copy.deepcopy(m), train, num_batches=20)
s_rc = bnstats(r)
rec("ft1+recal_aug", aug_recal(copy.deepcopy(m)))
rec("ft1+recal_full", recalibrate_bn(copy.deepcopy(m), train, num_batches=78))
# where do stats differ?
for i, ((m1, v1), (m2, v2)) in enumerate(zip(s_ft, s_rc, strict=True)):
    if i in (0, 1, 5, 10, 18):
        print(f"bn{i}: mean diff {float((m1 - m2).abs().mean()):.4f} var ratio {float((v2 / v1).mean()):.3f}")
mk = copy.deepcopy(base)
finetune(mk, train, cfg, teacher=base)
rec("ft1_kd", mk)
rec("ft1_kd+recal", recalibrate_bn(copy.deepcopy(mk), train, num_batches=20))
(Path(__file__).resolve().parent / "results" / "final_finetune.json").write_text(
    json.dumps({"test_acc": res}, indent=1) + "\n"
)
