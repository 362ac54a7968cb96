"""Power-law exponents of an eigenvalue spectrum: the median-xmin Hill estimator and WeightWatcher's KS fit.

Both work on eigenvalues lambda_i = sigma_i^2 of a weight matrix, in any order. `fit_power_law` reproduces
WeightWatcher 0.7.7's default (`WW_powerlaw.WWFit`, reached from `WeightWatcher.fit_powerlaw`) exactly,
including its small-N branch, but scans all xmin candidates at once with numpy instead of a Python loop.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EVALS_THRESH", "SMALL_N_CUTOFF", "hill_alpha", "fit_power_law"]

# WeightWatcher drops eigenvalues <= 1e-5 before fitting (constants.EVALS_THRESH, applied to the raw,
# un-normalised eigenvalues of W^T W on CPU).
EVALS_THRESH = 1e-5
# Below this many eigenvalues WWFit switches to its bias-corrected small-N fit.
SMALL_N_CUTOFF = 20
_SMALL_N_MIN_TAIL = 8  # WWFit.fit_powerlaw_smallN's k_min: tails shorter than this are not candidates
# Elements per chunk of the (xmin candidate x eigenvalue) KS matrix: ~16 MB per float64 temporary, so a
# 8192-eigenvalue layer needs ~100 MB at most instead of 8192^2 * 8 bytes * temporaries.
_CHUNK_ELEMS = 1 << 21
_CHUNK_ROWS = 64

_NAN3 = (float("nan"), float("nan"), float("nan"))


def _sorted64(evals) -> np.ndarray:
    return np.sort(np.asarray(evals, dtype=np.float64).ravel())


def hill_alpha(evals) -> float:
    """AlphaPruning's Hill estimator with xmin at the median eigenvalue.

    Sorted ascending, i = floor(n/2), m = n - i: alpha = 1 + m / (sum(log lambda[i:]) - m * log lambda[i]).
    NaN when the median eigenvalue is not positive (more than half of the spectrum is zero).
    """
    x = _sorted64(evals)
    n = x.size
    if n < 2:
        return float("nan")
    i = n // 2
    m = n - i
    if x[i] <= 0:
        return float("nan")
    logs = np.log(x[i:])
    denom = np.sum(logs) - m * logs[0]
    if denom <= 0:  # a flat tail: every eigenvalue from the median up is equal
        return float("nan")
    return float(1.0 + m / denom)


def _suffix_log_sums(log_x: np.ndarray) -> np.ndarray:
    """s[i] = sum(log_x[i:] - log_x[i]) for every i, in O(N).

    Centering the logs before the cumulative sum keeps the running total small, so rounding stays at the level
    of WWFit's per-candidate np.sum.
    """
    c = log_x - log_x.mean()
    suffix = np.cumsum(c[::-1])[::-1]
    n = np.arange(log_x.size, 0, -1, dtype=np.float64)
    return suffix - n * c


def _ks_distances(x: np.ndarray, alphas: np.ndarray, n_tail: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """KS distance of the power law (xmin = x[i], alphas[i]) to the tail x[i:], for each candidate i in rows.

    Same formula as WWFit: max_j |1 - (x_j / x_i)^(1 - alpha) - (j - i) / n|, with the empirical CDF starting
    at 0. Rows are processed in chunks so memory stays bounded for large N.
    """
    out = np.ones(rows.size, dtype=np.float64)
    if rows.size == 0:
        return out
    N = x.size
    width = N - int(rows[0])
    # Few rows per chunk also skips most of the j < i triangle, which a single full-width block would compute.
    step = max(1, min(_CHUNK_ROWS, _CHUNK_ELEMS // max(width, 1)))
    with np.errstate(all="ignore"):  # masked-out cells (j < i) may overflow; they are discarded
        for start in range(0, rows.size, step):
            r = rows[start : start + step]
            lo = int(r[0])
            cols = np.arange(lo, N)
            a = alphas[r][:, None]
            offset = cols[None, :] - r[:, None]  # j - i
            theo = 1.0 - np.power(x[None, lo:] / x[r][:, None], 1.0 - a)
            diff = np.abs(theo - offset / n_tail[r][:, None])
            diff[offset < 0] = 0.0
            out[start : start + step] = diff.max(axis=1)
    return out


def _fit_standard(x: np.ndarray, log_x: np.ndarray):
    """WWFit.fit_power_law_standard: MLE alpha for every xmin, keep the smallest KS distance."""
    N = x.size
    n_tail = np.arange(N, 0, -1, dtype=np.float64)[:-1]  # n = N - i for candidates i = 0..N-2
    s = _suffix_log_sums(log_x)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / s
    valid = np.flatnonzero(alphas > 1)  # WWFit leaves D = 1 where alpha <= 1 (or NaN)
    ds = np.ones(N - 1, dtype=np.float64)
    if valid.size:
        full_n = np.arange(N, 0, -1, dtype=np.float64)
        ds[valid] = _ks_distances(x, np.append(alphas, 0.0), full_n, valid)
    return alphas, ds


def _fit_small_n(x: np.ndarray, log_x: np.ndarray):
    """WWFit.fit_powerlaw_smallN: bias-corrected alpha = 1 + (n-1)/s on tails of >= 8 eigenvalues.

    WWFit's own objective J picks a winner, but WWFit.__init__ then re-selects by argmin(D) over the same
    arrays, so the KS distance is what decides; we return the arrays and let the caller do that.
    """
    N = x.size
    n_int = np.arange(N, 0, -1)[:-1]
    n_tail = n_int.astype(np.float64)
    s = _suffix_log_sums(log_x)[:-1]
    alphas = np.zeros(N - 1, dtype=np.float64)
    ok = (n_int >= _SMALL_N_MIN_TAIL) & (s > 1e-12)
    alphas[ok] = 1.0 + (n_tail[ok] - 1.0) / s[ok]
    ok &= alphas > 1.0
    ds = np.ones(N - 1, dtype=np.float64)
    if not ok.any():
        # No candidate survived: WWFit falls back to the whole spectrum as the tail (i = 0).
        if s[0] <= 1e-12:
            return None, None
        alphas[0] = 1.0 + (n_tail[0] - 1.0) / s[0]
        ok[0] = True
    full_n = np.arange(N, 0, -1, dtype=np.float64)
    rows = np.flatnonzero(ok)
    ds[rows] = _ks_distances(x, np.append(alphas, 0.0), full_n, rows)
    return alphas, ds


def fit_power_law(evals, thresh: float = EVALS_THRESH) -> tuple[float, float, float]:
    """(alpha, xmin, D): WeightWatcher 0.7.7's default power-law fit of an eigenvalue spectrum.

    Eigenvalues <= `thresh` are dropped (WeightWatcher's EVALS_THRESH), then every eigenvalue but the largest
    is tried as xmin; alpha is the continuous MLE on the tail above it and the xmin with the smallest
    Kolmogorov-Smirnov distance D wins (first one on ties, like np.argmin). Spectra with fewer than 20
    eigenvalues use WWFit's small-N branch. NaNs when fewer than 2 eigenvalues remain or the tail is flat.
    """
    x = _sorted64(evals)
    x = x[x > thresh]
    if x.size < 2:
        return _NAN3
    log_x = np.log(x)
    if x.size < SMALL_N_CUTOFF:
        alphas, ds = _fit_small_n(x, log_x)
    else:
        alphas, ds = _fit_standard(x, log_x)
    if alphas is None:
        return _NAN3
    i = int(np.argmin(ds))
    alpha = float(alphas[i])
    if not np.isfinite(alpha) or alpha <= 1.0:
        return _NAN3
    return alpha, float(x[i]), float(ds[i])
