"""CP and Tucker-2 replacements of a Conv2d (MTD, METHODS.md §2), rank helpers and a cache.

A decomposed conv is an ``nn.Sequential`` of plain ``nn.Conv2d`` layers, so it runs fewer MACs
at small rank, scripts/exports like any conv stack and never rebuilds the full kernel:

- CP rank R (Lebedev et al. 2015), kernel W[t,s,i,j] = sum_r A[t,r] B[s,r] C[i,r] D[j,r]:
  1×1 S→R; kh×1 depthwise (stride (sh,1)); 1×kw depthwise (stride (1,sw)); 1×1 R→T + bias.
  Params R·(S+kh+kw+T) (+T bias).
- Tucker-2 ranks (R_in, R_out) (Kim et al. 2016), W = core ×0 U_out ×1 U_in:
  1×1 S→R_in; kh×kw R_in→R_out (original stride/padding/dilation); 1×1 R_out→T + bias.
  Params S·R_in + R_in·R_out·kh·kw + R_out·T (+T bias).

Factorisations are done by tensorly on float64 numpy copies (the global tensorly backend is left
as it was). ``DecompositionCache`` keys results on the weight content, so the same (possibly
already pruned) layer decomposed at the same rank is factorised once per machine.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import tensorly as tl
import torch
from slimsearch.core.errors import SlimError
from slimsearch.core.evbmf import evbmf
from slimsearch.core.policy import cp_max_rank
from tensorly.decomposition import parafac, partial_tucker
from tensorly.tenalg.core_tenalg import CoreTenalgBackend
from threadpoolctl import threadpool_limits
from torch import nn

__all__ = [
    "METHODS",
    "DecompositionCache",
    "DecompositionError",
    "choose_rank",
    "cp_degeneracy",
    "cp_layers",
    "cp_param_cap",
    "decompose_conv",
    "decomposed_params",
    "default_cache",
    "evbmf",
    "evbmf_ranks",
    "full_ranks",
    "layer_structure",
    "normalize_rank",
    "ranks_from_ratio",
    "tucker2_layers",
]

log = logging.getLogger(__name__)

METHODS = ("cp", "tucker")
Rank = int | tuple[int, int]

# Defaults of the CP ALS; part of the cache key, so changing them never serves stale factors.
# ALS with line search; measured on ResNet-56 kernels, tol 1e-5 stops within ~0.005 relative error
# of 1000 plain iterations, and 300 iterations bound the time of wide layers.
CP_N_ITER_MAX = 300
CP_TOL = 1e-5
CP_LINESEARCH = True
# Plain ALS returns degenerate factors on trained kernels at useful ranks: components 40-170x ||W|| that
# cancel (ResNet-20 at half the parameter cap), which SGD cannot fine-tune (a CP-everywhere ResNet-20 went
# from 85 % val to chance within 10 steps at lr 0.01). Above CP_MAX_DEGENERACY (sum of component norms /
# ||W||) the ALS is redone with a ridge term CP_L2_REG on the unit-norm kernel: measured there, it bounds
# the sum to 6-12x ||W|| at about the same kernel error, and the same network then fine-tunes normally.
CP_MAX_DEGENERACY = 10.0
CP_L2_REG = 1e-3
TUCKER_N_ITER_MAX = 50
TUCKER_TOL = 1e-4  # HOOI gains < 0.005 relative error over HOSVD on ResNet-56 kernels
# Bump the version when the factorisation or the layer layout changes: invalidates cached entries.
FORMAT = f"slimsearch-decompose-v1/cp{CP_N_ITER_MAX},{CP_TOL},{CP_LINESEARCH},{CP_MAX_DEGENERACY},{CP_L2_REG}/tk{TUCKER_N_ITER_MAX},{TUCKER_TOL}"


class DecompositionError(SlimError):
    """A conv could not be decomposed (grouped conv, bad rank, non-finite weights, diverged ALS)."""


def _where(layer_name: str) -> str:
    return f"layer {layer_name!r}: " if layer_name else ""


# ---------------------------------------------------------------- checks and rank arithmetic


def _dims(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    t, s, kh, kw = conv.weight.shape
    return int(t), int(s), int(kh), int(kw)


def _check_conv(conv: nn.Conv2d, method: str, layer_name: str = "") -> None:
    w = _where(layer_name)
    if not isinstance(conv, nn.Conv2d):
        raise DecompositionError(f"{w}can only decompose nn.Conv2d, got {type(conv).__name__}")
    if method not in METHODS:
        raise DecompositionError(f"{w}unknown decomposition {method!r}; allowed: {', '.join(METHODS)}")
    if conv.groups != 1:
        raise DecompositionError(f"{w}{method} decomposition of a grouped conv (groups={conv.groups}) is not supported")
    if not bool(torch.isfinite(conv.weight).all()) or (
        conv.bias is not None and not bool(torch.isfinite(conv.bias).all())
    ):
        raise DecompositionError(f"{w}conv weights contain NaN or inf; cannot decompose")


def cp_param_cap(conv: nn.Conv2d) -> int:
    """CP rank at which R·(S+kh+kw+T) reaches the conv's T·S·kh·kw weights (>= 1).

    Beyond it CP saves nothing, so ``rank_ratio`` 1.0 maps here (= no compression).
    """
    t, s, kh, kw = _dims(conv)
    return max(1, (t * s * kh * kw) // (s + kh + kw + t))


def full_ranks(conv: nn.Conv2d) -> dict[str, int | tuple[int, int]]:
    """Rank limits of ``conv``: ``cp`` (max CP rank, product of the 3 smallest dims),
    ``cp_cap`` (param-neutral CP rank, see ``cp_param_cap``), ``tucker`` ((S, T) = (R_in, R_out))."""
    t, s, kh, kw = _dims(conv)
    return {"cp": cp_max_rank(t, s, kh, kw), "cp_cap": cp_param_cap(conv), "tucker": (s, t)}


def normalize_rank(conv: nn.Conv2d, method: str, rank: object, layer_name: str = "") -> Rank:
    """Validate ``rank`` for ``method`` on ``conv``: a positive int <= max CP rank for CP,
    ``(R_in, R_out)`` with 1 <= R_in <= S, 1 <= R_out <= T for Tucker-2 (lists accepted)."""
    w = _where(layer_name)
    t, s, kh, kw = _dims(conv)
    if method == "cp":
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise DecompositionError(f"{w}CP takes one integer rank, got {rank!r}")
        full = cp_max_rank(t, s, kh, kw)
        if not 1 <= int(rank) <= full:
            raise DecompositionError(f"{w}CP rank {rank} outside [1, {full}] for a {t}x{s}x{kh}x{kw} kernel")
        return int(rank)
    if method == "tucker":
        if not isinstance(rank, (tuple, list)) or len(rank) != 2:
            raise DecompositionError(f"{w}Tucker-2 takes two ranks (R_in, R_out), got {rank!r}")
        r_in, r_out = (int(r) for r in rank)
        if not (1 <= r_in <= s and 1 <= r_out <= t):
            raise DecompositionError(f"{w}Tucker ranks ({r_in}, {r_out}) outside [1, {s}] x [1, {t}] (in, out)")
        return (r_in, r_out)
    raise DecompositionError(f"{w}unknown decomposition {method!r}; allowed: {', '.join(METHODS)}")


def ranks_from_ratio(conv: nn.Conv2d, method: str, ratio: float) -> Rank:
    """Rank for a fraction ``ratio`` in (0, 1] of the full rank.

    CP: max(1, round(ratio · cp_param_cap)) — ratio 1.0 is the param-neutral rank, not the
    (much larger, useless for compression) max CP rank. Tucker: (round(ratio·S), round(ratio·T)),
    each at least 1.
    """
    if not 0.0 < float(ratio) <= 1.0:
        raise DecompositionError(f"rank_ratio must be in (0, 1], got {ratio!r}")
    t, s, _, _ = _dims(conv)
    if method == "cp":
        return max(1, round(ratio * cp_param_cap(conv)))
    if method == "tucker":
        return (min(s, max(1, round(ratio * s))), min(t, max(1, round(ratio * t))))
    raise DecompositionError(f"unknown decomposition {method!r}; allowed: {', '.join(METHODS)}")


def evbmf_ranks(conv: nn.Conv2d, method: str) -> Rank:
    """EVBMF rank estimates on the mode-1 (S × T·kh·kw) and mode-0 (T × S·kh·kw) unfoldings.

    Tucker: (R_in, R_out) = (estimate on mode 1, estimate on mode 0), as in Kim et al. 2016.
    CP [our choice]: the larger of the two (a CP rank is at least every unfolding's rank),
    clipped to ``cp_param_cap`` so that the estimate never grows the layer. All at least 1.
    """
    _check_conv(conv, method)
    t, s, _, _ = _dims(conv)
    w = conv.weight.detach().cpu().double().numpy()
    r_out = min(t, max(1, evbmf(w.reshape(t, -1))))
    r_in = min(s, max(1, evbmf(np.moveaxis(w, 1, 0).reshape(s, -1))))
    if method == "tucker":
        return (r_in, r_out)
    return max(1, min(max(r_in, r_out), cp_param_cap(conv)))


def choose_rank(
    conv: nn.Conv2d, method: str, rank: object = None, rank_ratio: float | None = None, layer_name: str = ""
) -> Rank:
    """The policy's rule: explicit ``rank``, else ``rank_ratio``, else the EVBMF estimate."""
    if rank is not None:
        return normalize_rank(conv, method, rank, layer_name)
    if rank_ratio is not None:
        return ranks_from_ratio(conv, method, rank_ratio)
    return evbmf_ranks(conv, method)


def decomposed_params(conv: nn.Conv2d, method: str, rank: Rank) -> int:
    """Parameter count of the replacement (including the bias), without decomposing."""
    t, s, kh, kw = _dims(conv)
    bias = t if conv.bias is not None else 0
    if method == "cp":
        return int(rank) * (s + kh + kw + t) + bias
    r_in, r_out = rank  # type: ignore[misc]
    return s * r_in + r_in * r_out * kh * kw + r_out * t + bias


# ---------------------------------------------------------------- layer structures


def _conv(
    cin: int, cout: int, kernel: tuple[int, int], like: nn.Conv2d, *, groups: int = 1, bias: bool = False, **kw
) -> nn.Conv2d:
    return nn.Conv2d(
        cin,
        cout,
        kernel,
        groups=groups,
        bias=bias,
        padding_mode=like.padding_mode,
        device=like.weight.device,
        dtype=like.weight.dtype,
        **kw,
    )


def _cp_structure(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    t, s, kh, kw = _dims(conv)
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    if isinstance(conv.padding, str):  # 'same' / 'valid' apply per axis, so the split keeps them
        pad_v: str | tuple[int, int] = conv.padding
        pad_h: str | tuple[int, int] = conv.padding
    else:
        pad_v, pad_h = (conv.padding[0], 0), (0, conv.padding[1])
    return nn.Sequential(
        _conv(s, rank, (1, 1), conv),
        _conv(rank, rank, (kh, 1), conv, groups=rank, stride=(sh, 1), padding=pad_v, dilation=(dh, 1)),
        _conv(rank, rank, (1, kw), conv, groups=rank, stride=(1, sw), padding=pad_h, dilation=(1, dw)),
        _conv(rank, t, (1, 1), conv, bias=conv.bias is not None),
    )


def _tucker_structure(conv: nn.Conv2d, ranks: tuple[int, int]) -> nn.Sequential:
    t, s, kh, kw = _dims(conv)
    r_in, r_out = ranks
    return nn.Sequential(
        _conv(s, r_in, (1, 1), conv),
        _conv(r_in, r_out, (kh, kw), conv, stride=conv.stride, padding=conv.padding, dilation=conv.dilation),
        _conv(r_out, t, (1, 1), conv, bias=conv.bias is not None),
    )


def layer_structure(conv: nn.Conv2d, method: str, rank: Rank) -> nn.Sequential:
    """The replacement's layer stack with untrained weights (for shapes/MACs without factorising)."""
    rank = normalize_rank(conv, method, rank)
    return _cp_structure(conv, rank) if method == "cp" else _tucker_structure(conv, rank)  # type: ignore[arg-type]


def _fill(seq: nn.Sequential, weights: list[np.ndarray], bias: torch.Tensor | None) -> nn.Sequential:
    with torch.no_grad():
        for layer, w in zip(seq, weights, strict=True):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)).reshape(layer.weight.shape))
        if bias is not None:
            seq[-1].bias.copy_(bias.detach())
    return seq


def _mttkrp(tensor: np.ndarray, cp_tensor: tuple, mode: int) -> np.ndarray:
    """unfold(tensor, mode) @ khatri_rao(other factors) without forming the Khatri-Rao product.

    tensorly's default forms it explicitly: for a 256x256x3x3 kernel at rank 128 that is a
    196608x128 matrix per kh/kw mode and iteration, which made CP take minutes. Contracting the
    largest other mode by one GEMM first, then the small ones elementwise, is ~10x faster here.
    """
    weights, factors = cp_tensor
    others = sorted((k for k in range(tensor.ndim) if k != mode), key=lambda k: tensor.shape[k])
    big = others.pop()
    # (..., I_big) @ (I_big, R) -> remaining modes in original order, then R last
    axes = [k for k in range(tensor.ndim) if k != big]  # z's leading axes, R is last
    lead = [tensor.shape[k] for k in axes]
    z = (np.moveaxis(tensor, big, -1).reshape(-1, tensor.shape[big]) @ factors[big]).reshape(*lead, -1)
    for k in others:
        shape = [1] * z.ndim
        shape[axes.index(k)], shape[-1] = tensor.shape[k], -1
        z = (z * factors[k].reshape(shape)).sum(axis=axes.index(k), keepdims=True)
    out = z.reshape(tensor.shape[mode], -1)
    return out if weights is None else out * weights[None, :]


class _FastMttkrpTenalg(CoreTenalgBackend, backend_name="slimsearch-mttkrp"):
    """tensorly's core tensor-algebra backend with ``_mttkrp`` (used only inside ``_numpy_backend``)."""


_FastMttkrpTenalg.register_method("unfolding_dot_khatri_rao", _mttkrp)


def _gram_svd(matrix: np.ndarray, n_eigenvecs: int | None = None, **_: object) -> tuple[np.ndarray, ...]:
    """Truncated SVD of a wide matrix via the eigendecomposition of its small Gram matrix (U is
    exactly orthonormal, which Tucker's exactness at full rank needs). LAPACK's full SVD of a
    256x2304 unfolding took seconds on our loaded CPUs; tall matrices here are small, plain SVD."""
    n = min(matrix.shape)
    k = n if n_eigenvecs is None else min(n, n_eigenvecs)
    if matrix.shape[0] > matrix.shape[1]:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    ev, vec = np.linalg.eigh(matrix @ matrix.T)
    order = np.argsort(ev)[::-1][:k]
    s = np.sqrt(np.clip(ev[order], 0.0, None))
    u = vec[:, order]
    vt = (u.T @ matrix) / np.maximum(s, s[0] * 1e-12 if s[0] > 0 else 1.0)[:, None]
    return u, s, vt


@contextmanager
def _numpy_backend() -> Iterator[None]:
    """tensorly on numpy with the fast MTTKRP, restoring the caller's backends afterwards.

    BLAS is held to one thread meanwhile: the matrices are small, and on a shared CPU multi-threaded
    OpenBLAS made a 64x144 SVD take ~100 ms (17 s for one Tucker-2) against ~3 ms single-threaded;
    parallel search workers use the cores better than BLAS threads would.
    """
    ctx = nullcontext() if tl.get_backend() == "numpy" else tl.backend_context("numpy", local_threadsafe=True)
    tenalg = tl.tenalg.backend_context(_FastMttkrpTenalg(), local_threadsafe=True)
    with ctx, tenalg, threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_eigenvecs.*", category=UserWarning)
        yield


def _weight64(conv: nn.Conv2d) -> np.ndarray:
    return conv.weight.detach().cpu().to(torch.float64).numpy()


# ---------------------------------------------------------------- CP and Tucker-2


def cp_degeneracy(factors: Sequence[np.ndarray], norm: float) -> float:
    """Sum of the CP components' norms over the kernel's norm: 1 for orthogonal components, >> 1 when
    large components cancel each other (a degenerate fit, which SGD cannot fine-tune)."""
    comp = np.prod([np.linalg.norm(f, axis=0) for f in factors], axis=0)
    return float(comp.sum() / norm) if norm > 0 else 0.0


def _parafac(w: np.ndarray, rank: int, l2_reg: float, layer_name: str, **kw: object) -> list[np.ndarray]:
    """``parafac`` of ``w`` scaled to unit norm: the factors, lambda and the norm folded into the first."""
    norm = float(np.linalg.norm(w))
    with _numpy_backend():
        try:
            cp, errors = parafac(w / norm, rank, svd=_gram_svd, l2_reg=l2_reg, return_errors=True, **kw)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as e:
            raise DecompositionError(f"{_where(layer_name)}CP decomposition at rank {rank} failed: {e}") from None
    lam, factors = cp.weights, list(cp.factors)
    factors[0] = factors[0] * (lam * norm)[None, :]
    rel = float(errors[-1]) if errors else 0.0
    if not all(np.isfinite(f).all() for f in factors) or not math.isfinite(rel) or rel > 1.0 + 1e-6:
        raise DecompositionError(
            f"{_where(layer_name)}CP decomposition at rank {rank} did not converge (relative error {rel:.3g}, "
            "non-finite or worse than zero); try another rank or Tucker"
        )
    return factors


def cp_layers(
    conv: nn.Conv2d,
    rank: int,
    *,
    init: str = "svd",
    n_iter_max: int = CP_N_ITER_MAX,
    tol: float = CP_TOL,
    linesearch: bool = CP_LINESEARCH,
    max_degeneracy: float = CP_MAX_DEGENERACY,
    l2_reg: float = CP_L2_REG,
    seed: int = 0,
    layer_name: str = "",
) -> nn.Sequential:
    """CP-decompose ``conv`` at ``rank`` (tensorly ``parafac``, ALS) into four convs.

    Plain ALS first; when its factors are degenerate (``cp_degeneracy`` above ``max_degeneracy``) it is
    redone with the ridge term ``l2_reg`` (on the kernel scaled to unit norm), which trades a little fit
    for factors a network can be fine-tuned with (see ``CP_L2_REG``). A ridge from the start would bias
    well-posed fits: it drops weak components of exactly low-rank kernels.
    The CP weights (lambda) are folded into the last 1×1 conv. Raises ``DecompositionError``
    when the factors are not finite or the fit is worse than the zero tensor (diverged).
    """
    _check_conv(conv, "cp", layer_name)
    rank = normalize_rank(conv, "cp", rank, layer_name)
    w = _weight64(conv)
    t, s, kh, kw = w.shape
    norm = float(np.linalg.norm(w))
    if norm == 0.0:  # parafac's SVD init divides by zero; the exact answer is trivial
        a = np.zeros((t, rank))
        b, c, d = (np.ones((n, rank)) / math.sqrt(n) for n in (s, kh, kw))
    else:
        als = {"n_iter_max": n_iter_max, "init": init, "tol": tol, "random_state": seed, "linesearch": linesearch}
        factors = _parafac(w, rank, 0.0, layer_name, **als)
        if l2_reg > 0 and cp_degeneracy(factors, norm) > max_degeneracy:
            factors = _parafac(w, rank, l2_reg, layer_name, **als)
        a, b, c, d = factors
    seq = _cp_structure(conv, rank)
    # Layer weights: 1×1 (R,S), kh×1 (R,1,kh,1), 1×kw (R,1,1,kw), 1×1 (T,R).
    return _fill(seq, [b.T, c.T, d.T, a], conv.bias)


def tucker2_layers(
    conv: nn.Conv2d,
    ranks: tuple[int, int],
    *,
    n_iter_max: int = TUCKER_N_ITER_MAX,
    tol: float = TUCKER_TOL,
    seed: int = 0,
    layer_name: str = "",
) -> nn.Sequential:
    """Tucker-2-decompose ``conv`` (tensorly ``partial_tucker`` on the out/in modes, HOOI) with
    ``ranks = (R_in, R_out)`` into three convs."""
    _check_conv(conv, "tucker", layer_name)
    r_in, r_out = normalize_rank(conv, "tucker", ranks, layer_name)  # type: ignore[misc]
    w = _weight64(conv)
    if not w.any():  # HOOI's error is 0/0 here; the exact answer is trivial
        seq = _tucker_structure(conv, (r_in, r_out))
        u_out, u_in = np.eye(w.shape[0], r_out), np.eye(w.shape[1], r_in)
        return _fill(seq, [u_in.T, np.zeros((r_out, r_in, *w.shape[2:])), u_out], conv.bias)
    with _numpy_backend():
        try:
            (core, (u_out, u_in)), _ = partial_tucker(
                w,
                rank=[r_out, r_in],
                modes=[0, 1],
                n_iter_max=n_iter_max,
                svd=_gram_svd,
                tol=tol,
                random_state=seed,
            )
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as e:
            raise DecompositionError(
                f"{_where(layer_name)}Tucker-2 decomposition at ranks ({r_in}, {r_out}) failed: {e}"
            ) from None
    if not all(np.isfinite(f).all() for f in (core, u_out, u_in)):
        raise DecompositionError(
            f"{_where(layer_name)}Tucker-2 decomposition at ranks ({r_in}, {r_out}) gave non-finite factors"
        )
    seq = _tucker_structure(conv, (r_in, r_out))
    # Layer weights: 1×1 (R_in,S) = U_in^T, core (R_out,R_in,kh,kw), 1×1 (T,R_out) = U_out.
    return _fill(seq, [u_in.T, core, u_out], conv.bias)


def _compute(conv: nn.Conv2d, method: str, rank: Rank, seed: int, layer_name: str) -> nn.Sequential:
    if method == "cp":
        return cp_layers(conv, rank, seed=seed, layer_name=layer_name)  # type: ignore[arg-type]
    return tucker2_layers(conv, rank, seed=seed, layer_name=layer_name)  # type: ignore[arg-type]


def decompose_conv(
    conv: nn.Conv2d,
    method: str,
    rank: Rank,
    *,
    cache: DecompositionCache | None = None,
    layer_name: str = "",
    seed: int = 0,
) -> nn.Sequential:
    """Replacement ``nn.Sequential`` for ``conv`` (method "cp" with an int rank, or "tucker" with
    (R_in, R_out)), on the conv's device and dtype. ``cache=None`` factorises without caching;
    pass ``default_cache()`` (or your own) to reuse results."""
    _check_conv(conv, method, layer_name)
    rank = normalize_rank(conv, method, rank, layer_name)
    if cache is None:
        return _compute(conv, method, rank, seed, layer_name)
    return cache.get_or_compute(conv, method, rank, seed=seed, layer_name=layer_name)


# ---------------------------------------------------------------- cache


def _tensor_bytes(x: torch.Tensor) -> bytes:
    x = x.detach().cpu().contiguous()
    return str((x.dtype, tuple(x.shape))).encode() + x.reshape(-1).view(torch.uint8).numpy().tobytes()


def cache_key(conv: nn.Conv2d, method: str, rank: Rank, seed: int = 0) -> str:
    """sha256 of the weight/bias content, conv hyper-parameters, method, rank, seed and FORMAT.

    Content rather than layer name: a pruned layer is a different key, an identical one is shared.
    """
    h = hashlib.sha256()
    hyper = (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.padding_mode,
    )
    rank_t = tuple(rank) if isinstance(rank, (tuple, list)) else int(rank)
    h.update(repr((FORMAT, method, rank_t, int(seed), hyper)).encode())
    h.update(_tensor_bytes(conv.weight))
    h.update(_tensor_bytes(conv.bias) if conv.bias is not None else b"no-bias")
    return h.hexdigest()


class DecompositionCache:
    """Decompositions keyed by ``cache_key``: an in-memory LRU plus an optional directory of
    ``<key>.pt`` files (torch.save of the replacement's state dict, written atomically, read with
    ``weights_only=True``), which lets separate worker processes share work.

    Counters ``computed``, ``hits_memory``, ``hits_disk`` are public ints. Every call returns a new
    module (fine-tuning it never alters the cache). Unreadable or mismatched files are ignored,
    recomputed and overwritten.
    """

    def __init__(self, directory: Path | str | None = None, max_memory_entries: int = 2048) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_memory_entries = max_memory_entries
        self.computed = 0
        self.hits_memory = 0
        self.hits_disk = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"DecompositionCache(directory={self.directory}, computed={self.computed}, "
            f"hits_memory={self.hits_memory}, hits_disk={self.hits_disk})"
        )

    def path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory is not None else None

    def _remember(self, key: str, state: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._memory[key] = state
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_memory_entries:
                self._memory.popitem(last=False)

    def _build(self, conv: nn.Conv2d, method: str, rank: Rank, state: dict[str, torch.Tensor]) -> nn.Sequential:
        seq = layer_structure(conv, method, rank)
        seq.load_state_dict(state, strict=True)  # copies into conv's device/dtype
        return seq

    def _read_disk(self, key: str, conv: nn.Conv2d, method: str, rank: Rank) -> nn.Sequential | None:
        p = self.path(key)
        if p is None or not p.is_file():
            return None
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
            if payload.get("format") != FORMAT or payload.get("key") != key:
                raise ValueError("format/key mismatch")
            state = payload["state"]
            seq = self._build(conv, method, rank, state)
        except Exception as e:  # any unreadable/mismatched file: recompute rather than crash
            log.warning("ignoring unreadable decomposition cache file %s (%s); recomputing", p, e)
            return None
        self._remember(key, state)
        return seq

    def _write_disk(self, key: str, state: dict[str, torch.Tensor]) -> None:
        p = self.path(key)
        if p is None:
            return
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=p.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save({"format": FORMAT, "key": key, "state": state}, f)
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:  # a full/read-only disk costs speed, not correctness
            log.warning("could not write decomposition cache file %s: %s", p, e)

    def get_or_compute(
        self, conv: nn.Conv2d, method: str, rank: Rank, *, seed: int = 0, layer_name: str = ""
    ) -> nn.Sequential:
        """The replacement for ``conv``: from memory, else disk, else factorised (and stored)."""
        _check_conv(conv, method, layer_name)
        rank = normalize_rank(conv, method, rank, layer_name)
        key = cache_key(conv, method, rank, seed)
        with self._lock:
            state = self._memory.get(key)
            if state is not None:
                self._memory.move_to_end(key)
                self.hits_memory += 1
        if state is not None:
            return self._build(conv, method, rank, state)
        seq = self._read_disk(key, conv, method, rank)
        if seq is not None:
            with self._lock:
                self.hits_disk += 1
            return seq
        seq = _compute(conv, method, rank, seed, layer_name)
        state = {k: v.detach().cpu().clone() for k, v in seq.state_dict().items()}
        with self._lock:
            self.computed += 1
        self._remember(key, state)
        self._write_disk(key, state)
        return seq


_DEFAULT_CACHES: dict[Path, DecompositionCache] = {}
_DEFAULT_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """$SLIMSEARCH_CACHE/decompositions, else ~/.cache/slimsearch/decompositions."""
    root = os.environ.get("SLIMSEARCH_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "slimsearch"
    return base / "decompositions"


def default_cache() -> DecompositionCache:
    """The process-wide cache for the current ``default_cache_dir()`` (re-read on every call)."""
    d = default_cache_dir()
    with _DEFAULT_LOCK:
        if d not in _DEFAULT_CACHES:
            _DEFAULT_CACHES[d] = DecompositionCache(d)
        return _DEFAULT_CACHES[d]
