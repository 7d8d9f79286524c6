"""ABSHPC hybrid pyramids, fast closest-centre search and per-layer filter clustering (METHODS.md section 1).

Hybrid pyramid of a filter w (C x k x k, D = C*k^2 entries) [inferred: the mean pyramid of vector
quantisation adapted to 3-D]: P0 = the raw entries, P1[c] = mean of kernel c (C nodes of k^2 entries), then
pairwise merging up to one node, the root mean mu. An odd node count carries its last node up unchanged.

Deviation from the plain pairwise average of METHODS.md: a merged node is the ENTRY-WEIGHTED mean
(m_a P_a + m_b P_b) / (m_a + m_b), where m = entries under the node. Once an odd node has been carried, the
two nodes of a pair can cover different numbers of entries; the plain average would then no longer be the
mean of the node's entries, the root would not be the filter mean, and the bound below would be invalid.
For C a power of two every pair is balanced and both definitions coincide.

Lower bound: every node value is the mean of its m_{j,i} entries, so by Cauchy-Schwarz
(sum over the node of (x - y))^2 <= m * sum (x - y)^2, hence
    ||x - y||^2 >= B_j(x, y) = sum_i m_{j,i} (P_j^x[i] - P_j^y[i])^2
at every level j, exact at P0 and non-decreasing from the root (B = D (mu_x - mu_y)^2) down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from slimsearch.core.errors import SlimError
from torch import Tensor

__all__ = [
    "ClusterResult",
    "SearchStats",
    "assign",
    "closest_centre",
    "closest_centre_bruteforce",
    "hpc_cluster",
    "hybrid_pyramid",
    "node_sizes",
]

# Rounding guard for the rejection tests: a bound is only trusted to exclude a centre when it exceeds the
# current best distance by more than float64 rounding could explain (relative part for the sums, absolute
# part for cancellation in node-mean differences). Centres inside the guard get an exact full distance, so
# the answer is always the brute-force one; the guard costs at most a few extra full distances.
_REL_GUARD = 1e-9
_ABS_GUARD = 1e-18


def node_sizes(n_channels: int, kernel_entries: int) -> list[np.ndarray]:
    """Entries per node at every pyramid level, P0 (all ones) first, the root ([D]) last."""
    if n_channels < 1 or kernel_entries < 1:
        raise SlimError(f"pyramid needs >= 1 channel and >= 1 kernel entry, got C={n_channels}, k^2={kernel_entries}")
    sizes = [np.ones(n_channels * kernel_entries), np.full(n_channels, float(kernel_entries))]
    while sizes[-1].size > 1:
        sizes.append(_merge_sizes(sizes[-1]))
    return sizes


def _merge_sizes(m: np.ndarray) -> np.ndarray:
    pairs = m[: m.size // 2 * 2].reshape(-1, 2).sum(axis=1)
    return np.concatenate([pairs, m[-1:]]) if m.size % 2 else pairs


def _pyramid_np(flat: np.ndarray, n_channels: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pyramid levels (each N x n_j, float64) of N flattened filters, and the node sizes per level."""
    n, d = flat.shape
    k2 = d // n_channels
    sizes = node_sizes(n_channels, k2)
    levels = [flat, flat.reshape(n, n_channels, k2).mean(axis=2)]
    for j in range(1, len(sizes) - 1):
        p, m = levels[j], sizes[j]
        even = p.shape[1] // 2 * 2
        ma, mb = m[0:even:2], m[1:even:2]
        merged = (p[:, 0:even:2] * ma + p[:, 1:even:2] * mb) / (ma + mb)
        levels.append(np.concatenate([merged, p[:, -1:]], axis=1) if p.shape[1] % 2 else merged)
    return levels, sizes


def _as_flat(weight: Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    w = weight.detach().cpu().numpy() if isinstance(weight, Tensor) else np.asarray(weight)
    if w.ndim < 2 or w.shape[0] < 1 or w.size == 0:
        raise SlimError(f"hybrid pyramid needs a weight of shape N x C x ..., got {tuple(w.shape)}")
    return np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float64), int(w.shape[1])


def hybrid_pyramid(weight: Tensor) -> list[Tensor]:
    """Hybrid pyramid levels of every filter: [P0 (N x D), P1 (N x C), ..., root (N x 1)], float64.

    Node sizes (entries per node) come from ``node_sizes(C, kh*kw)``.
    """
    flat, c = _as_flat(weight)
    return [torch.from_numpy(p) for p in _pyramid_np(flat, c)[0]]


@dataclass
class SearchStats:
    """Work done by the fast search compared with brute force (K full distances per query)."""

    n_full: int = 0  # full D-entry distances computed
    n_bruteforce: int = 0  # full distances brute force would compute
    n_direction_stops: int = 0  # scan directions ended by the root-mean bound
    rejected_by_level: dict[int, int] = field(default_factory=dict)  # pyramid level -> centres rejected there

    @property
    def saved(self) -> int:
        return self.n_bruteforce - self.n_full

    def add(self, other: SearchStats) -> None:
        self.n_full += other.n_full
        self.n_bruteforce += other.n_bruteforce
        self.n_direction_stops += other.n_direction_stops
        for j, v in other.rejected_by_level.items():
            self.rejected_by_level[j] = self.rejected_by_level.get(j, 0) + v


def _row_sqdist(c0: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Squared distance of each row of c0 to x0 (a row or matching rows); the ONE formula both searches use."""
    diff = c0 - x0
    return np.einsum("ij,ij->i", diff, diff)


def closest_centre_bruteforce(
    x_levels: Sequence[np.ndarray | Tensor], centre_levels: Sequence[np.ndarray | Tensor]
) -> tuple[int, float]:
    """Reference search: (index, squared distance) of the nearest centre, ties -> lowest index."""
    d = _row_sqdist(np.asarray(centre_levels[0], dtype=np.float64), np.asarray(x_levels[0], dtype=np.float64).ravel())
    i = int(np.argmin(d))  # argmin returns the first minimum
    return i, float(d[i])


def _guard(x0: np.ndarray, c0: np.ndarray) -> float:
    scale = max(float(np.abs(x0).max(initial=0.0)), float(np.abs(c0).max(initial=0.0)))
    return _ABS_GUARD * x0.shape[-1] * scale * scale


def assign(
    point_levels: Sequence[np.ndarray],
    centre_levels: Sequence[np.ndarray],
    sizes: Sequence[np.ndarray],
    *,
    fast: bool = True,
    warm: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Nearest centre of every point: (labels, squared distances, stats); fast and brute force agree exactly.

    Fast search per point [inferred, METHODS.md section 1]: visit centres outwards from the nearest root
    mean (merging both directions by |mu_x - mu_c|, so the first direction whose root bound D (mu_x - mu_c)^2
    exceeds the best distance ends the other one too); test the level bounds root -> P1 and reject at the
    first one above the best distance; otherwise compute the full distance. The per-point scans are run in
    lock-step over all points (step t = every point's t-th candidate) so each step is one vectorised numpy
    operation; each point still sees exactly its own sequential scan and its own running best distance.

    ``warm`` (one centre index per point, e.g. last k-means labels) [our addition, not in the paper]: its full
    distance seeds the running best before the scan, so the bounds reject more from the first candidate on;
    the answer is unchanged (ties still go to the lowest index).
    """
    n_pts, n_c = point_levels[0].shape[0], centre_levels[0].shape[0]
    stats = SearchStats(n_bruteforce=n_pts * n_c)
    x0, c0 = point_levels[0], centre_levels[0]
    labels = np.full(n_pts, -1, dtype=np.int64)
    dmin = np.full(n_pts, np.inf)
    if not fast:
        for i in range(n_pts):
            labels[i], dmin[i] = closest_centre_bruteforce([x0[i]], [c0])
        stats.n_full = stats.n_bruteforce
        return labels, dmin, stats
    top = len(sizes) - 1
    big_d = float(sizes[top][0])
    gap = np.abs(point_levels[top][:, :1] - centre_levels[top][:, 0][None, :])  # |mu_x - mu_c|, P x K
    order = np.argsort(gap, axis=1, kind="stable")  # outward scan order per point, ties -> lower index
    guard = _guard(x0, c0)
    active = np.ones(n_pts, dtype=bool)
    buf_c, buf_x = np.empty_like(x0), np.empty_like(x0)
    if warm is not None:
        labels[:] = warm
        dmin[:] = _row_sqdist(c0[warm], x0)
        stats.n_full += n_pts
    for t in range(n_c):
        pts = np.flatnonzero(active)
        if pts.size == 0:
            break
        cand = order[pts, t]
        thr = dmin[pts] * (1.0 + _REL_GUARD) + guard
        stop = big_d * gap[pts, cand] ** 2 > thr  # root bound only grows from here on: the scan is over
        stats.n_direction_stops += int(stop.sum())
        active[pts[stop]] = False
        live = ~stop
        pts, cand, thr = pts[live], cand[live], thr[live]
        for j in range(top - 1, 0, -1):  # top -> down, P1 last
            if pts.size == 0:
                break
            diff = point_levels[j][pts] - centre_levels[j][cand]
            live = (diff * diff) @ sizes[j] <= thr
            stats.rejected_by_level[j] = stats.rejected_by_level.get(j, 0) + int((~live).sum())
            pts, cand = pts[live], cand[live]
            thr = thr[live]
        if warm is not None:
            fresh = cand != warm[pts]  # the warm centre's distance is already known
            pts, cand = pts[fresh], cand[fresh]
        if pts.size == 0:
            continue
        m = pts.size
        # preallocated buffers (fresh 10+ MB temporaries per step cost page faults); mode="clip" because
        # np.take buffers ``out`` in the default mode (4x slower); the indices are always in range
        np.take(c0, cand, axis=0, out=buf_c[:m], mode="clip")
        xs = x0 if m == n_pts else np.take(x0, pts, axis=0, out=buf_x[:m], mode="clip")
        np.subtract(buf_c[:m], xs, out=buf_c[:m])  # same arithmetic as _row_sqdist, so ties match brute force
        d = np.einsum("ij,ij->i", buf_c[:m], buf_c[:m])
        stats.n_full += pts.size
        better = (d < dmin[pts]) | ((d == dmin[pts]) & (cand < labels[pts]))
        dmin[pts[better]] = d[better]
        labels[pts[better]] = cand[better]
    return labels, dmin, stats


def closest_centre(
    x_levels: Sequence[np.ndarray | Tensor],
    centre_levels: Sequence[np.ndarray | Tensor],
    sizes: Sequence[np.ndarray] | None = None,
) -> tuple[int, float, SearchStats]:
    """Fast nearest centre of one filter: (index, squared distance, stats); equals brute force exactly.

    ``x_levels`` are one filter's pyramid levels (1-D each, P0 first), ``centre_levels`` the centres'
    (K x n_j each, e.g. from ``hybrid_pyramid``). Centres are scanned outwards from the nearest root mean;
    a direction stops once D (mu_x - mu_c)^2 exceeds the best distance; a centre is rejected at the first
    level (root -> P1) whose bound exceeds it; otherwise its full distance is computed. Ties -> lowest index.
    """
    xs = [np.asarray(x, dtype=np.float64).reshape(1, -1) for x in x_levels]
    cs = [np.asarray(c, dtype=np.float64) for c in centre_levels]
    if sizes is None:
        sizes = node_sizes(cs[1].shape[1], cs[0].shape[1] // cs[1].shape[1])
    if len(xs) != len(sizes) or len(cs) != len(sizes):
        raise SlimError(f"pyramids have {len(xs)} / {len(cs)} levels but the node sizes have {len(sizes)}")
    labels, dists, stats = assign(xs, cs, sizes)
    return int(labels[0]), float(dists[0]), stats


@dataclass
class ClusterResult:
    """HPC clustering of one layer's filters."""

    labels: np.ndarray  # cluster of every filter (N,)
    representatives: np.ndarray  # kept filter per cluster (k,), the member with the median root mean
    distortion: float  # mean squared distance of the filters to their cluster centre, last assignment
    n_full_distance: int  # full distances the fast search computed, all iterations
    n_bruteforce_distance: int  # what brute force would have computed (N * k per iteration)
    n_iter: int
    stats: SearchStats = field(default_factory=SearchStats)


def _fill_empty(labels: np.ndarray, dists: np.ndarray, flat: np.ndarray, centres: np.ndarray, k: int) -> None:
    """Re-seed every empty cluster with the farthest point of a cluster that has >= 2 members (in place)."""
    counts = np.bincount(labels, minlength=k)
    for e in np.flatnonzero(counts == 0):
        movable = counts[labels] >= 2
        p = int(np.argmax(np.where(movable, dists, -1.0)))  # N >= k guarantees a movable point
        counts[labels[p]] -= 1
        counts[e] = 1
        labels[p] = e
        dists[p] = 0.0
        centres[e] = flat[p]


def _median_mu_members(labels: np.ndarray, mu: np.ndarray, k: int) -> np.ndarray:
    """Per cluster, the member at the (lower) median of root means; ties in mu -> index order."""
    reps = np.empty(k, dtype=np.int64)
    order = np.lexsort((np.arange(mu.size), mu))
    for c in range(k):
        members = order[labels[order] == c]
        reps[c] = members[(members.size - 1) // 2]
    return reps


def hpc_cluster(
    weight: Tensor | np.ndarray,
    k: int,
    max_iter: int = 20,
    tol: float = 1e-4,
    *,
    fast: bool = True,
    warm_start: bool = True,
) -> ClusterResult:
    """Cluster a layer's N filters into k clusters with LBG/k-means and the fast pyramid search [inferred].

    Initial centres are k filters evenly spaced in root-mean order; iterations stop when the relative
    distortion change is < ``tol`` or after ``max_iter``. Empty clusters are re-seeded from the farthest
    point, so exactly k distinct representatives come back. ``fast=False`` uses brute force (same result);
    ``warm_start`` seeds each search after the first iteration with the previous label (see ``assign``).
    """
    flat, n_channels = _as_flat(weight)
    n = flat.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise SlimError(f"hpc clusters must be an integer in 1..{n} (the layer has {n} filters), got {k!r}")
    if max_iter < 1 or tol < 0:
        raise SlimError(f"hpc needs max_iter >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}")
    levels, sizes = _pyramid_np(flat, n_channels)
    mu = levels[-1][:, 0]
    if k == n:
        ident = np.arange(n)
        return ClusterResult(ident, ident.copy(), 0.0, 0, 0, 0)
    by_mu = np.lexsort((np.arange(n), mu))
    centres = flat[by_mu[((np.arange(k) + 0.5) * n / k).astype(np.int64)]].copy()
    total = SearchStats()
    prev = None
    labels = None
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        c_levels, _ = _pyramid_np(centres, n_channels)
        warm = labels if (warm_start and fast) else None
        labels, dists, stats = assign(levels, c_levels, sizes, fast=fast, warm=warm)
        total.add(stats)
        _fill_empty(labels, dists, flat, centres, k)
        distortion = float(dists.mean())
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, flat)
        centres = sums / counts[:, None]
        if distortion == 0.0 or (prev is not None and abs(prev - distortion) <= tol * prev):
            break
        prev = distortion
    reps = _median_mu_members(labels, mu, k)
    return ClusterResult(labels, reps, distortion, total.n_full, total.n_bruteforce, n_iter, total)
