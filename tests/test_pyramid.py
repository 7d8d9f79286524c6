"""ABSHPC hybrid pyramid, exact fast closest-centre search and HPC clustering (core/pyramid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import shared_path
from slimsearch.core.errors import SlimError
from slimsearch.core.pyramid import (
    assign,
    closest_centre,
    closest_centre_bruteforce,
    hpc_cluster,
    hybrid_pyramid,
    node_sizes,
)

SHAPES = [(1, 3, 3), (2, 3, 3), (3, 3, 3), (5, 3, 3), (6, 1, 1), (7, 3, 3), (12, 3, 3), (13, 5, 5), (16, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pyramid_levels_are_entry_means_and_root_is_filter_mean(shape: tuple[int, int, int]) -> None:
    c, kh, kw = shape
    w = torch.randn(4, c, kh, kw, generator=torch.Generator().manual_seed(c))
    levels = hybrid_pyramid(w)
    sizes = node_sizes(c, kh * kw)
    assert len(levels) == len(sizes)
    flat = w.double().reshape(4, -1)
    assert torch.equal(levels[0], flat)
    assert levels[1].shape == (4, c)
    torch.testing.assert_close(levels[1], w.double().mean(dim=(2, 3)))
    assert levels[-1].shape == (4, 1)
    torch.testing.assert_close(levels[-1][:, 0], flat.mean(dim=1), rtol=0, atol=1e-12)
    for lvl, m in zip(levels, sizes, strict=True):
        assert m.sum() == c * kh * kw  # every level covers every entry once
        assert lvl.shape[1] == m.size
        torch.testing.assert_close(lvl @ torch.from_numpy(m), flat.sum(dim=1), rtol=0, atol=1e-10)
    for a, b in zip(sizes[1:-1], sizes[2:], strict=False):
        assert b.size == (a.size + 1) // 2  # pairwise merging, odd count carries the last node


def test_odd_channel_count_carries_last_node_unchanged() -> None:
    w = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 2, 2)
    levels = hybrid_pyramid(w)
    assert node_sizes(5, 4)[2].tolist() == [8.0, 8.0, 4.0]
    assert levels[2][0, 2] == levels[1][0, 4]  # carried
    assert levels[2][0, 0] == (levels[1][0, 0] + levels[1][0, 1]) / 2
    # level 3 merges nodes of 8 and 4 entries: entry-weighted, not the plain average
    assert levels[3][0, 1] == pytest.approx((8 * levels[2][0, 2] + 4 * levels[2][0, 2]) / 12)
    assert levels[3][0].tolist() == pytest.approx([w[0, :4].mean().item(), w[0, 4:].mean().item()])


def test_level_bounds_are_valid_and_tighten_downwards() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        c, k = int(rng.integers(1, 20)), int(rng.choice([1, 2, 3]))
        scale = rng.uniform(0.1, 3.0, size=(2, c, 1, 1))  # per-channel structure makes upper levels informative
        w = torch.from_numpy(rng.normal(size=(2, c, k, k)) * scale + rng.normal(size=(2, c, 1, 1)))
        levels, sizes = hybrid_pyramid(w), node_sizes(c, k * k)
        true = float(((levels[0][0] - levels[0][1]) ** 2).sum())
        bounds = [float((lv[0] - lv[1]) ** 2 @ torch.from_numpy(m)) for lv, m in zip(levels, sizes, strict=True)]
        assert bounds[0] == pytest.approx(true, rel=1e-12)
        for j, b in enumerate(bounds):
            assert b <= true * (1 + 1e-12) + 1e-12, (trial, j)
        for finer, coarser in zip(bounds, bounds[1:], strict=False):
            assert coarser <= finer * (1 + 1e-12) + 1e-12, trial


def test_node_sizes_rejects_empty() -> None:
    with pytest.raises(SlimError):
        node_sizes(0, 9)


def _trial_data(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer filters and centres: exact float arithmetic, so equal distances (ties) are frequent."""
    c = int(rng.choice([1, 3, 5, 6, 7, 10]))
    k = int(rng.choice([1, 3]))
    n_c = int(rng.integers(1, 16))
    centres = rng.integers(-2, 3, size=(n_c, c, k, k)).astype(np.float64)
    if n_c > 2 and rng.random() < 0.5:
        centres[rng.integers(n_c)] = centres[rng.integers(n_c)]  # duplicate centre -> guaranteed tie
    x = rng.integers(-2, 3, size=(1, c, k, k)).astype(np.float64)
    if rng.random() < 0.3:
        x[:] = centres[rng.integers(n_c)]  # distance 0
    return torch.from_numpy(x), torch.from_numpy(centres)


def test_fast_search_equals_brute_force_on_200_trials_with_ties() -> None:
    rng = np.random.default_rng(1)
    n_ties = 0
    for trial in range(200):
        x, centres = _trial_data(rng)
        xl = [lv[0] for lv in hybrid_pyramid(x)]
        cl = hybrid_pyramid(centres)
        i, d, stats = closest_centre(xl, cl)
        bi, bd = closest_centre_bruteforce(xl, cl)
        assert (i, d) == (bi, bd), trial
        all_d = ((centres - x).reshape(len(centres), -1) ** 2).sum(1)
        n_ties += int((all_d == all_d.min()).sum() > 1)
        assert i == int(torch.nonzero(all_d == all_d.min())[0])  # ties -> lowest index
        assert 1 <= stats.n_full <= len(centres) == stats.n_bruteforce
    assert n_ties >= 20  # the trials really exercised the tie rule


def test_fast_assign_equals_brute_force_on_real_valued_batches() -> None:
    rng = np.random.default_rng(2)
    for trial in range(20):
        c = int(rng.choice([3, 5, 7, 9]))
        pts = torch.from_numpy(rng.normal(size=(40, c, 3, 3)) + rng.normal(size=(40, c, 1, 1)) * 2)
        cen = pts[rng.choice(40, size=7, replace=False)] + 0.1
        pl, cl = [p.numpy() for p in hybrid_pyramid(pts)], [p.numpy() for p in hybrid_pyramid(cen)]
        sizes = node_sizes(c, 9)
        fl, fd, fs = assign(pl, cl, sizes)
        bl, bd, bs = assign(pl, cl, sizes, fast=False)
        assert np.array_equal(fl, bl) and np.array_equal(fd, bd), trial
        warm = rng.integers(0, 7, size=40)
        wl, wd, _ = assign(pl, cl, sizes, warm=warm)
        assert np.array_equal(wl, bl) and np.array_equal(wd, bd), trial
        assert bs.n_full == bs.n_bruteforce == 280


def _groups(k: int, sizes: list[int], c: int = 6, seed: int = 0):
    """k tight, well-separated groups; member j of a group is the prototype shifted by a known offset.

    Returns the weight (rows shuffled), the group of every row and the row that has the median root mean
    of each group (lower median for an even group size).
    """
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(k, c, 3, 3)) * 5 + np.arange(k)[:, None, None, None] * 3.0
    rows, group, shift = [], [], []
    for g, n in enumerate(sizes):
        offsets = np.linspace(-0.02, 0.02, n)
        for off in rng.permutation(offsets):
            rows.append(protos[g] + off + rng.normal(size=(c, 3, 3)) * 1e-4)
            group.append(g)
            shift.append(off)
    perm = rng.permutation(len(rows))
    w = torch.from_numpy(np.stack(rows)[perm])
    group, shift = np.array(group)[perm], np.array(shift)[perm]
    median_rows = []
    for g, n in enumerate(sizes):
        members = np.flatnonzero(group == g)
        median_off = np.sort(shift[members])[(n - 1) // 2]
        median_rows.append(int(members[shift[members] == median_off][0]))
    return w, group, median_rows


def _same_partition(labels: np.ndarray, group: np.ndarray) -> bool:
    pairs = {(int(a), int(b)) for a, b in zip(labels, group, strict=True)}
    return len(pairs) == len(set(labels.tolist())) == len(set(group.tolist()))


@pytest.mark.parametrize("sizes", [[5, 5, 5, 5], [4, 5, 4, 5, 4], [3, 4, 3]])
def test_hpc_cluster_recovers_groups_and_median_mu_members(sizes: list[int]) -> None:
    w, group, median_rows = _groups(len(sizes), sizes)
    res = hpc_cluster(w, len(sizes))
    assert _same_partition(res.labels, group)
    assert sorted(res.representatives.tolist()) == sorted(median_rows)
    for c, rep in enumerate(res.representatives):
        assert res.labels[rep] == c
    assert res.n_full_distance < res.n_bruteforce_distance  # the fast search saved distance computations
    assert res.distortion < w[0].numel() * 0.02**2  # within-group spread only: no group was split or merged


def test_hpc_fast_and_bruteforce_clustering_agree() -> None:
    w = torch.randn(48, 10, 3, 3, generator=torch.Generator().manual_seed(3))
    fast, brute = hpc_cluster(w, 12), hpc_cluster(w, 12, fast=False)
    assert np.array_equal(fast.labels, brute.labels)
    assert np.array_equal(fast.representatives, brute.representatives)
    assert fast.distortion == brute.distortion and fast.n_iter == brute.n_iter
    assert brute.n_full_distance == brute.n_bruteforce_distance == 48 * 12 * brute.n_iter


@pytest.mark.parametrize(("n_distinct", "k"), [(1, 4), (2, 5), (3, 3)])
def test_hpc_handles_empty_clusters_with_duplicate_filters(n_distinct: int, k: int) -> None:
    base = torch.randn(n_distinct, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    w = base.repeat(4, 1, 1, 1)  # many identical filters -> centres coincide and clusters empty out
    res = hpc_cluster(w, k)
    assert len(res.representatives) == k == len(set(res.representatives.tolist()))
    assert sorted(set(res.labels.tolist())) == list(range(k))


def test_hpc_k_bounds() -> None:
    w = torch.randn(6, 2, 3, 3)
    ident = hpc_cluster(w, 6)
    assert ident.representatives.tolist() == list(range(6)) and ident.n_full_distance == 0
    assert hpc_cluster(w, 1).representatives.size == 1
    for bad in (0, 7, 2.5, True):
        with pytest.raises(SlimError):
            hpc_cluster(w, bad)  # type: ignore[arg-type]
    with pytest.raises(SlimError):
        hpc_cluster(torch.randn(6), 2)


def test_hpc_on_real_resnet56_layer_is_exact_and_saves_work() -> None:
    from slimsearch.core.models import read_state_dict

    sd = read_state_dict(shared_path("models", "resnet56-4bfd9763.th"))
    w = sd["layer3.8.conv2.weight"]
    fast, brute = hpc_cluster(w, 32), hpc_cluster(w, 32, fast=False)
    assert np.array_equal(fast.labels, brute.labels) and fast.distortion == brute.distortion
    assert fast.n_full_distance < 0.5 * fast.n_bruteforce_distance
