"""EVBMF: empirical variational Bayes matrix factorisation rank estimate.

Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 2013. This is the usual port (VBMF.py, as used by Kim et al.
2016 to pick Tucker-2 ranks of conv kernels): estimate the noise variance by minimising the
empirical-Bayes free energy over a bounded interval, then keep the singular values above the
analytic threshold. Written here because no maintained package ships it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """EVB objective in sigma2 (JMLR 2013, eq. for the noise-variance estimate)."""
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    obj = (
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau_z1)
        + np.sum(np.log((tau_z1 + 1) / z1))
        + alpha * np.sum(np.log(tau_z1 / alpha + 1))
        + residual / (M * sigma2)
        + (L - H) * np.log(sigma2)
    )
    return float(obj)


def evbmf(matrix: np.ndarray, sigma2: float | None = None) -> int:
    """Estimated rank of ``matrix`` (2-D): singular values above the EVB threshold.

    ``sigma2`` is the noise variance; when None it is estimated (the "empirical" in EVBMF).
    Returns 0 for an all-zero matrix or pure noise; callers clamp to at least 1.
    """
    Y = np.asarray(matrix, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"evbmf needs a 2-D matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    if L == 0 or not np.all(np.isfinite(Y)):
        raise ValueError("evbmf needs a non-empty matrix of finite values")
    s = np.linalg.svd(Y, compute_uv=False)
    if s[0] <= 0 or s[0] <= 1e-12 * np.sqrt(L * M) * np.abs(Y).max(initial=0.0):
        return 0
    H = L
    alpha = L / M
    tauubar = 2.5129 * np.sqrt(alpha)
    if sigma2 is None:
        residual = 0.0  # H == L: every singular value kept in the objective
        xubar = (1 + tauubar) * (1 + alpha / tauubar)
        eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, H)) - 1
        upper = (np.sum(s**2) + residual) / (L * M)
        lower = max(s[eh_ub + 1] ** 2 / (M * xubar), float(np.mean(s[eh_ub + 1 :] ** 2)) / M)
        # Zero singular values (exactly low-rank input) make log(z2) -inf; floors keep it finite.
        s_obj = np.maximum(s, s[0] * 1e-10)
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            opt = minimize_scalar(
                _free_energy, args=(L, M, s_obj, residual, xubar), bounds=(lower, upper), method="bounded"
            )
            sigma2 = float(opt.x)
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))
