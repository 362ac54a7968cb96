"""Power-law fits: the median-xmin Hill estimator and the WeightWatcher-compatible KS fit."""

from __future__ import annotations

import logging
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rankwise.stats import fit_power_law, hill_alpha  # noqa: E402
from rankwise.stats import powerlaw as pl  # noqa: E402


def _heavy_tailed(rng, n: int) -> np.ndarray:
    """Pareto-tailed 'eigenvalues' on a random scale, or an MP spectrum (a random matrix) for variety."""
    if rng.random() < 0.3:
        x = rng.standard_normal((2 * n, n))
        return np.linalg.svd(x, compute_uv=False) ** 2
    a = rng.uniform(1.5, 6.0)
    return (rng.pareto(a - 1, size=n) + 1) * rng.uniform(1e-2, 10)


def _hill_direct(x) -> float:
    x = sorted(float(v) for v in x)
    n = len(x)
    i = n // 2
    m = n - i
    return 1 + m / (sum(math.log(v) for v in x[i:]) - m * math.log(x[i]))


def _ks_fit_loop(x, thresh=1e-5):
    """A literal, loop-by-loop transcription of WWFit.fit_power_law_standard (N >= 20), as an oracle."""
    x = sorted(float(v) for v in x if v > thresh)
    N = len(x)
    best = (math.inf, None, None)
    for i in range(N - 1):
        n = N - i
        alpha = 1 + n / (sum(math.log(v) for v in x[i:]) - n * math.log(x[i]))
        d = max(abs(1 - (x[j] / x[i]) ** (1 - alpha) - (j - i) / n) for j in range(i, N)) if alpha > 1 else 1.0
        if d < best[0]:
            best = (d, alpha, x[i])
    return best[1], best[2], best[0]


@pytest.mark.parametrize("seed", range(5))
def test_hill_alpha_equals_formula(seed):
    rng = np.random.default_rng(seed)
    for n in (3, 4, 10, 101, 300):
        x = _heavy_tailed(rng, n)
        assert hill_alpha(x) == pytest.approx(_hill_direct(x), rel=1e-6)


def test_hill_alpha_is_order_free_and_nan_when_median_is_zero():
    x = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert hill_alpha(x) == pytest.approx(hill_alpha(np.sort(x)), rel=1e-12)
    assert math.isnan(hill_alpha(np.array([0.0, 0.0, 0.0, 1.0])))
    assert math.isnan(hill_alpha(np.array([1.0])))
    assert math.isnan(hill_alpha(np.array([1.0, 2.0])))  # a one-eigenvalue tail has no slope


@pytest.mark.parametrize("n", [20, 37, 150])
def test_fit_power_law_matches_loop_oracle(n):
    rng = np.random.default_rng(n)
    x = _heavy_tailed(rng, n)
    alpha, xmin, d = fit_power_law(x)
    ref = _ks_fit_loop(x)
    assert alpha == pytest.approx(ref[0], rel=1e-9)
    assert xmin == ref[1]
    assert d == pytest.approx(ref[2], rel=1e-9)


def test_fit_power_law_drops_tiny_eigenvalues():
    rng = np.random.default_rng(1)
    x = _heavy_tailed(rng, 64)
    with_zeros = np.concatenate([x, np.zeros(10), np.full(5, 1e-6)])
    assert fit_power_law(with_zeros) == fit_power_law(x[x > pl.EVALS_THRESH])


def test_fit_power_law_degenerate_inputs_are_nan():
    assert all(math.isnan(v) for v in fit_power_law(np.array([1.0])))
    assert all(math.isnan(v) for v in fit_power_law(np.zeros(30)))


def test_ks_chunking_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(7)
    x = _heavy_tailed(rng, 500)
    whole = fit_power_law(x)
    monkeypatch.setattr(pl, "_CHUNK_ELEMS", 997)  # a few rows per chunk, not aligned with anything
    assert fit_power_law(x) == whole


def test_large_spectrum_is_fast_enough():
    # N = 8192 is a 4096x8192+ layer: the O(N^2) scan must stay bounded in time and memory (chunked).
    rng = np.random.default_rng(3)
    alpha, xmin, d = fit_power_law(rng.pareto(2.0, size=8192) + 1)
    assert 2.0 < alpha < 4.0 and 0 < d < 0.1 and xmin >= 1


def _weightwatcher_fit():
    from conftest import require

    require("weightwatcher", "weightwatcher not installed (pip install weightwatcher==0.7.7)")  # CI: fails
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    from weightwatcher.WW_powerlaw import WWFit

    return WWFit


@pytest.mark.parametrize("n", [3, 7, 8, 9, 12, 19, 20, 21, 64, 200])
def test_fit_power_law_equals_weightwatcher(n, capsys):
    WWFit = _weightwatcher_fit()
    rng = np.random.default_rng(100 + n)
    for _ in range(4):
        x = _heavy_tailed(rng, n)
        fit = WWFit(x[x > pl.EVALS_THRESH])  # WeightWatcher.fit_powerlaw thresholds before WWFit
        alpha, xmin, d = fit_power_law(x)
        assert alpha == pytest.approx(fit.alpha, rel=1e-9), (n, alpha, fit.alpha)
        assert xmin == pytest.approx(fit.xmin, rel=1e-12)
        assert d == pytest.approx(fit.D, rel=1e-9, abs=1e-12)
    capsys.readouterr()  # WWFit prints "SMALL N PL FIT" for N < 20
