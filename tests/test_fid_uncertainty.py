"""FID's uncertainty: the bootstrap interval and FID extrapolated to infinitely many images,
on Gaussian features whose FID is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import gammaln

from diffusion.evaluation import metrics


def expected_fid_1d(n: int, mean_gap: float, std_a: float, std_b: float) -> float:
    """E[FID] of n draws from N(mean_gap, std_a^2) against n from N(0, std_b^2): in one dimension
    FID is (x_bar - y_bar)^2 + (s_x - s_y)^2, and E[s] = c4(n) std for the unbiased sample
    variance's root, c4(n) = sqrt(2 / (n - 1)) Gamma(n / 2) / Gamma((n - 1) / 2)."""
    c4 = np.sqrt(2 / (n - 1)) * np.exp(gammaln(n / 2) - gammaln((n - 1) / 2))
    return mean_gap**2 + (std_a**2 + std_b**2) / n + std_a**2 + std_b**2 - 2 * c4**2 * std_a * std_b


@pytest.mark.parametrize("mean_gap", [0.1, 0.5])
def test_the_interval_contains_fid_at_this_n_at_its_nominal_rate(mean_gap: float) -> None:
    n, draws, confidence = 200, 300, 0.9
    expected = expected_fid_1d(n, mean_gap, 1.5, 1.0)
    rng = np.random.default_rng(0)
    hits = 0
    for draw in range(draws):
        x, y = mean_gap + 1.5 * rng.standard_normal((n, 1)), rng.standard_normal((n, 1))
        estimate = metrics.fid_from_features(x, y)
        low, high = metrics.bootstrap_interval(estimate, metrics.fid_bootstrap(x, y, replicates=100, seed=draw), confidence)
        hits += low <= expected <= high
    # the number of intervals that hold it is Binomial(draws, confidence): 3 of its standard deviations
    assert hits / draws == pytest.approx(confidence, abs=3 * np.sqrt(confidence * (1 - confidence) / draws))


def test_the_bootstrap_is_seeded_and_a_fixed_reference_adds_no_spread() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2000, 4)) + 0.3, rng.standard_normal((60, 4))  # few reference images
    both = metrics.fid_bootstrap(x, y, replicates=200, seed=3)
    assert np.array_equal(both, metrics.fid_bootstrap(x, y, replicates=200, seed=3))
    fixed = metrics.fid_bootstrap(x, metrics.moments(y), replicates=200, seed=3)
    # resampling 60 reference images moves FID far more than resampling 2000 generated ones
    assert both.std() > 2 * fixed.std()


def test_fid_infinity_recovers_the_population_fid() -> None:
    d = 16
    variances, mean = np.linspace(0.5, 1.5, d), np.full(d, 0.15)
    population = float(mean @ mean + np.sum((np.sqrt(variances) - 1) ** 2))  # against N(0, I)
    reference = metrics.statistics_moments(np.zeros(d), np.eye(d))
    rng = np.random.default_rng(0)
    extrapolated, at_most = [], []
    for seed in range(10):
        x = mean + rng.standard_normal((4000, d)) * np.sqrt(variances)
        limit, points = metrics.fid_infinity(x, reference, sizes=np.linspace(250, 4000, 8).astype(int), seed=seed)
        extrapolated.append(limit)
        at_most.append(points[-1][1])
    error = 3 * np.std(extrapolated) / np.sqrt(len(extrapolated))
    assert np.mean(extrapolated) == pytest.approx(population, abs=error)
    # FID of all 4000 images is still biased upwards by more than that
    assert np.mean(at_most) - population > error


def test_the_nuclear_norm_fid_equals_the_matrix_square_root_one() -> None:
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 6)) * [1, 2, 3, 1, 1, 0.5], rng.standard_normal((30, 6)) + 0.2
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    direct = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx + sy - 2 * sqrtm(sx @ sy).real)
    assert metrics.fid_from_features(x, y) == pytest.approx(direct, rel=1e-10)
    assert metrics.fid_from_statistics(x, y.mean(0), sy) == pytest.approx(direct, rel=1e-10)
    wide = rng.standard_normal((5, 6))  # fewer images than dimensions: the factor is the images
    assert metrics.fid_from_features(wide, y) == pytest.approx(
        np.sum((wide.mean(0) - y.mean(0)) ** 2)
        + np.trace(np.cov(wide, rowvar=False) + sy - 2 * sqrtm(np.cov(wide, rowvar=False) @ sy).real),
        rel=1e-8,
    )
