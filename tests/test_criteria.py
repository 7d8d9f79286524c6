"""Filter-selection criteria (core/criteria.py): known answers on hand-made weights, validation, distfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import shared_path
from slimsearch.core.criteria import (
    SELECT_CRITERIA,
    global_rates,
    group_importance,
    importance,
    norm_wasserstein,
    select_filters,
)
from slimsearch.core.errors import SlimError


def _filters(rows: list[list[float]]) -> torch.Tensor:
    """Filters given as flat 4-entry rows -> N x 1 x 2 x 2."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 2, 2)


def test_l1_and_l2_keep_their_own_largest_filters() -> None:
    w = _filters(
        [
            [3.0, 0, 0, 0],  # l1 3.0, l2 3.0
            [0.9, 0.9, 0.9, 0.9],  # l1 3.6, l2 1.8
            [0.1, 0, 0, 0],
            [2.0, 0, 0, 0],  # l1 2.0, l2 2.0
            [-0.6, 0.6, -0.6, 0.6],  # l1 2.4, l2 1.2
        ]
    )
    assert select_filters(w, 2, "l1").tolist() == [0, 1]
    assert select_filters(w, 2, "l2").tolist() == [0, 3]
    assert select_filters(w, 3, "l1").tolist() == [0, 1, 4]
    torch.testing.assert_close(importance(w, "l1"), torch.tensor([3.0, 3.6, 0.1, 2.0, 2.4], dtype=torch.float64))


def test_norm_ties_break_to_lower_index() -> None:
    w = _filters([[1.0, 0, 0, 0], [0, 0, 0, 2.0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])
    assert select_filters(w, 3, "l2").tolist() == [0, 1, 3]
    assert select_filters(w, 3, "l1").tolist() == [0, 1, 3]


def test_fpgm_removes_the_geometric_median_filter() -> None:
    # a symmetric star around index 2: its centre is the unique geometric median (distance sum 4 vs 5.83).
    # Shifted by +5 so norms do not identify it: l2 would drop index 1 (smallest norm) and keep the centre.
    star = _filters([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0, 0], [0, -1.0, 0, 0]]) + 5.0
    assert int(importance(star, "fpgm").argmin()) == 2
    assert importance(star, "fpgm")[2].item() == pytest.approx(4.0)
    assert select_filters(star, 4, "fpgm").tolist() == [0, 1, 3, 4]
    assert select_filters(star, 4, "l2").tolist() == [0, 1, 2, 3]  # drops a smallest-norm arm (tie -> index 4)


def test_random_is_seeded_and_deterministic() -> None:
    w = torch.randn(40, 3, 3, 3)
    a, b, c = (select_filters(w, 10, "random", seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10


def test_mask_validation() -> None:
    w = torch.randn(6, 2, 3, 3)
    assert select_filters(w, 3, "mask", keep_idx=[4, 0, 2]).tolist() == [0, 2, 4]
    assert select_filters(w, 2, "mask", keep_idx=np.array([5, 1])).tolist() == [1, 5]
    assert select_filters(w, 2, "mask", keep_idx=torch.tensor([3, 1])).tolist() == [1, 3]
    for bad in (None, [0, 6], [-1, 2], [1, 1, 2], [0.5, 1], [True, 2], [0, 1]):
        keep = 2 if bad in ([0, 6], [-1, 2], [0.5, 1], [True, 2]) else 3
        with pytest.raises(SlimError):
            select_filters(w, keep, "mask", keep_idx=bad)


@pytest.mark.parametrize("criterion", [c for c in SELECT_CRITERIA if c != "mask"])
def test_keep_out_of_range_and_contract(criterion: str) -> None:
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    if criterion == "group":  # given the filters' group norms (core.apply computes them), not a conv weight
        with pytest.raises(SlimError, match="whole coupled group"):
            select_filters(w, 3, "group")
        w = w.flatten(1).norm(dim=1, keepdim=True)
    for bad in (0, 9, -1, 2.0, True):
        with pytest.raises(SlimError):
            select_filters(w, bad, criterion)  # type: ignore[arg-type]
    for keep in (1, 3, 8):
        idx = select_filters(w, keep, criterion)
        assert idx.dtype == torch.long and idx.numel() == keep == len(set(idx.tolist()))
        assert torch.equal(idx, idx.sort().values) and 0 <= int(idx.min()) and int(idx.max()) < 8
    assert select_filters(w, 8, criterion).tolist() == list(range(8))


def test_bad_inputs() -> None:
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(SlimError, match="unknown filter criterion"):
        select_filters(w, 2, "bn")
    with pytest.raises(SlimError, match="does not take"):
        select_filters(w, 2, "l1", max_iter=3)
    with pytest.raises(SlimError):
        select_filters(torch.randn(4), 2, "l1")
    with pytest.raises(SlimError):
        importance(w, "hpc")


def test_hpc_criterion_keeps_one_median_member_per_group() -> None:
    # distinct root means per group: the initial centres (evenly spaced in mu order) start one per group
    protos = torch.tensor([[5.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 0, 15.0]])
    offsets = torch.tensor([-0.02, 0.0, 0.02])
    rows = [protos[g] + off for g in range(3) for off in offsets[[2, 0, 1]]]  # median (offset 0) at 3g + 2
    w = torch.stack(rows).reshape(9, 1, 2, 2)
    assert select_filters(w, 3, "hpc").tolist() == [2, 5, 8]
    assert select_filters(w, 3, "hpc", max_iter=5, tol=0.0).tolist() == [2, 5, 8]


def _strata(w: torch.Tensor, keep: int) -> list[set[int]]:
    norms = w.double().reshape(len(w), -1).norm(dim=1)
    return [set(s.tolist()) for s in torch.tensor_split(torch.sort(norms, stable=True).indices, keep)]


def test_distfit_keeps_least_redundant_filter_of_every_stratum() -> None:
    w = torch.randn(30, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    kept = select_filters(w, 7, "distfit").tolist()
    scores = importance(w, "distfit")
    for stratum in _strata(w, 7):
        inside = [i for i in kept if i in stratum]
        assert len(inside) == 1
        assert scores[inside[0]] == max(scores[j] for j in stratum)


def test_distfit_ties_go_to_the_median_norm() -> None:
    # the corners of a square all have the same distance sum (2 + 2 + 2*sqrt2); norms are sqrt17, sqrt17,
    # sqrt5, sqrt5, the (lower) median norm is sqrt5, so the first sqrt5 corner (index 2) is kept.
    square = _filters([[4.0, 1, 0, 0], [4.0, -1, 0, 0], [2.0, 1, 0, 0], [2.0, -1, 0, 0]])
    sums = importance(square, "distfit")
    assert torch.allclose(sums, sums[0].expand(4))
    assert select_filters(square, 1, "distfit").tolist() == [2]
    # two strata of two: {2, 3} (norm sqrt5) and {0, 1} (sqrt17); each stratum is a tie at its own median
    assert select_filters(square, 2, "distfit").tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(5))
def test_distfit_fits_the_norm_distribution_better_than_norm_and_fpgm(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 16, 3, 3, generator=g) * torch.rand(64, 1, 1, 1, generator=g)
    keep = 16
    dist = norm_wasserstein(w, select_filters(w, keep, "distfit"))
    for other in ("l1", "l2", "fpgm"):
        assert dist < norm_wasserstein(w, select_filters(w, keep, other)), other
    assert norm_wasserstein(w, range(64)) == pytest.approx(0.0, abs=1e-12)


def test_distfit_beats_l1_on_a_real_resnet56_layer() -> None:
    from slimsearch.core.models import read_state_dict

    sd = read_state_dict(shared_path("models", "resnet56-4bfd9763.th"))
    for name in ("layer2.3.conv1.weight", "layer3.8.conv2.weight"):
        w = sd[name]
        keep = w.shape[0] // 2
        assert norm_wasserstein(w, select_filters(w, keep, "distfit")) < norm_wasserstein(
            w, select_filters(w, keep, "l1")
        )


def test_group_importance_is_the_l2_norm_over_the_coupled_convs() -> None:
    a, b = torch.randn(6, 3, 3, 3), torch.randn(6, 8, 1, 1)
    want = (importance(a, "l2") ** 2 + importance(b, "l2") ** 2).sqrt()
    torch.testing.assert_close(group_importance([a, b]), want)
    torch.testing.assert_close(group_importance([a]), importance(a, "l2"))


def test_global_rates_one_threshold_over_mean_normalised_scores() -> None:
    # "flat": all filters equal (normalised 1.0); "spread": normalised 0.25, 0.25, 1.75, 1.75.
    scores = {"flat": torch.ones(4), "spread": torch.tensor([1.0, 1.0, 7.0, 7.0])}
    assert global_rates(scores, 0.25) == {"flat": 0.0, "spread": 0.5}  # the 2 lowest of 8 are spread's
    assert global_rates(scores, 0.5) == {"flat": 0.75, "spread": 0.5}  # max_rate 0.9 -> 3 of 4 at most
    assert global_rates(scores, 0.0) == {"flat": 0.0, "spread": 0.0}
    assert global_rates(scores, 0.5, max_rate=0.5) == {"flat": 0.5, "spread": 0.5}
    with pytest.raises(SlimError, match="fraction"):
        global_rates(scores, 1.0)
