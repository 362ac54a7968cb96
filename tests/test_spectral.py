"""Eigenvalues and per-layer metrics: pinned values, batching, Marchenko-Pastur spikes."""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rankwise.stats import METRIC_NAMES, eigenvalues, spectral_metrics  # noqa: E402
from rankwise.stats.spectral import count_spikes, effective_rank, mp_bulk_edge, mp_median  # noqa: E402
from rankwise.types import RankwiseError  # noqa: E402


def fixed_matrix() -> torch.Tensor:
    """64x48 Gaussian plus a rank-2 spike, float64, from a seeded generator (same on every machine)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g, dtype=torch.float64)
    u = torch.randn(64, 2, generator=g, dtype=torch.float64)
    v = torch.randn(48, 2, generator=g, dtype=torch.float64)
    return w + 1.5 * u @ v.T


# Computed independently of rankwise: numpy SVD, the Hill formula and a pure-Python KS loop
# (see test_powerlaw._ks_fit_loop), effective rank from the singular values, log10 for the logs.
PINNED = {
    "alpha_hill": 1.9663291880364946,
    "alpha": 1.86212880441921,
    "xmin": 33.858970241941044,
    "ks_distance": 0.12120805392671652,
    "num_spikes": 2.0,
    "spectral_norm": 7483.229635861023,
    "log_spectral_norm": 3.8740890725058206,
    "stable_rank": 1.938263596355017,
    "frobenius_norm": 120.43451160840247,
    "effective_rank": 28.720402614465762,
    "alpha_weighted": 7.2140528527987895,
}


def test_pinned_metrics_on_fixed_matrix():
    w = fixed_matrix()
    assert float(w.sum()) == pytest.approx(-95.83357117931482, rel=1e-12)  # the matrix itself is reproducible
    metrics = spectral_metrics(eigenvalues([w])[0], tuple(w.shape))
    assert set(metrics) == set(METRIC_NAMES) == set(PINNED)
    for key, ref in PINNED.items():
        assert metrics[key] == pytest.approx(ref, rel=1e-9), key
    assert all(isinstance(v, float) for v in metrics.values())


def test_metric_definitions_against_numpy():
    w = fixed_matrix()
    sv = np.linalg.svd(w.numpy(), compute_uv=False)
    m = spectral_metrics(sv**2, tuple(w.shape))
    assert m["spectral_norm"] == pytest.approx(sv.max() ** 2, rel=1e-12)  # lambda_max = sigma_max^2, like WW
    assert m["frobenius_norm"] == pytest.approx(float(torch.linalg.norm(w)), rel=1e-12)
    assert m["stable_rank"] == pytest.approx((sv**2).sum() / sv.max() ** 2, rel=1e-12)
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(sv.max() ** 2), rel=1e-12)
    assert effective_rank(np.ones(10)) == pytest.approx(10.0)
    assert effective_rank(np.array([0.0, 0.0, 4.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32), (1, 5)])
def test_eigenvalues_are_squared_singular_values(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    ev = eigenvalues([w])[0]
    sv = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False))
    assert ev.dtype == np.float64 and ev.shape == (min(shape),)
    assert np.all(np.diff(ev) >= 0) and np.all(ev >= 0)
    np.testing.assert_allclose(ev, sv**2, rtol=1e-9, atol=1e-12 * sv.max() ** 2)


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(*s, generator=g) for s in [(16, 8), (8, 16), (16, 8), (12, 12), (16, 8), (8, 16)]]
    batched = eigenvalues(ws)
    for w, ev in zip(ws, batched):
        np.testing.assert_allclose(ev, eigenvalues([w])[0], rtol=1e-10, atol=1e-12)


def test_rank_deficient_has_no_negative_eigenvalues():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)
    ev = eigenvalues([w])[0]
    assert ev.min() >= 0 and np.count_nonzero(ev > 1e-6 * ev.max()) == 3


def test_eigenvalues_rejects_non_matrix():
    with pytest.raises(RankwiseError, match="2-D"):
        eigenvalues([torch.zeros(2, 3, 4)])


def test_mp_median_matches_quadrature():
    # Reference medians from scipy quad + brentq on the MP density (variance 1).
    assert mp_median(1.0) == pytest.approx(0.652775941633569, rel=1e-6)
    assert mp_median(0.75) == pytest.approx(0.742948487007944, rel=1e-6)
    assert mp_median(0.25) == pytest.approx(0.9160040706866617, rel=1e-6)
    with pytest.raises(RankwiseError):
        mp_median(1.5)


def test_mp_edge_is_right_for_pure_noise():
    # For Gaussian noise the median-based sigma^2 is within a few % of the truth, so the edge is too.
    g = torch.Generator().manual_seed(4)
    n, p = 800, 400
    w = 0.3 * torch.randn(n, p, generator=g, dtype=torch.float64)
    ev = eigenvalues([w])[0]
    true_edge = 0.09 * (math.sqrt(n) + math.sqrt(p)) ** 2
    assert mp_bulk_edge(ev, (n, p)) == pytest.approx(true_edge, rel=0.03)
    assert count_spikes(ev, (n, p), tracy_widom=True) == 0
    assert count_spikes(ev, (n, p)) <= 2


@pytest.mark.parametrize("tracy_widom", [False, True])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (96, 96)])
def test_spike_count_is_scale_invariant(shape, tracy_widom):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    w += 0.4 * torch.randn(shape[0], 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, shape[1], generator=g, dtype=torch.float64
    )
    counts = {
        scale: spectral_metrics(eigenvalues([w * scale])[0], shape, tracy_widom)["num_spikes"]
        for scale in (1e-3, 1.0, 1e3)
    }
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("k", [1, 4, 10])
def test_rank_k_spike_gives_k_spikes(k):
    # Noise with unit-variance entries plus k orthogonal directions of strength 3x the BBP detection threshold.
    g = torch.Generator().manual_seed(10 + k)
    n, p = 512, 256
    noise = torch.randn(n, p, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    theta = 3 * (n * p) ** 0.25  # BBP: a spike separates when theta > (n p)^(1/4) for unit-variance noise
    w = noise + theta * u @ v.T
    ev = eigenvalues([w])[0]
    assert count_spikes(ev, (n, p)) == k
    assert count_spikes(ev, (n, p), tracy_widom=True) == k


def test_tracy_widom_raises_the_edge():
    ev = eigenvalues([fixed_matrix()])[0]
    assert mp_bulk_edge(ev, (64, 48), tracy_widom=True) > mp_bulk_edge(ev, (64, 48))


def test_zero_matrix_gives_finite_or_nan_metrics_without_warnings():
    m = spectral_metrics(np.zeros(8), (8, 8))
    assert m["num_spikes"] == 0 and m["spectral_norm"] == 0 and m["frobenius_norm"] == 0
    assert math.isnan(m["alpha"]) and math.isnan(m["alpha_hill"])


def test_bad_device_is_an_error():
    from rankwise.stats.spectral import resolve_device

    with pytest.raises(RankwiseError, match="not valid"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RankwiseError, match="CUDA is not available"):
            resolve_device("cuda")


def test_stacked_path_and_low_precision_inputs_agree():
    # float32 compute goes through the stacked (GPU-style) path; bfloat16 weights through the float64 CPU path.
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(40, 24, generator=g) for _ in range(3)]
    ref = eigenvalues(ws)
    for ev32, ev in zip(eigenvalues(ws, dtype=torch.float32), ref):
        np.testing.assert_allclose(ev32, ev, rtol=1e-4, atol=1e-4 * ev.max())
    bf = [w.to(torch.bfloat16) for w in ws]
    for evb, w in zip(eigenvalues(bf), bf):
        np.testing.assert_allclose(evb, eigenvalues([w.double()])[0], rtol=1e-12)
