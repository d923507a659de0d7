"""Precision, recall, density and coverage (diffusion/evaluation/fidelity.py) on synthetic
features: against a brute-force k-NN written here and the authors' `prdc` package, at their
closed-form expectations for one distribution (Naeem et al. 2020), and at the limits of
disjoint and nested supports."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from conftest import full_params
from diffusion.config import ConfigError, parse_params
from diffusion.evaluation import fidelity
from diffusion.evaluation.fidelity import FidelityError, precision_recall_density_coverage

KEYS = ("precision", "recall", "density", "coverage")


def brute_force(fake: np.ndarray, real: np.ndarray, k: int) -> dict[str, float]:
    """The definitions of Kynkäänniemi et al. 2019 and Naeem et al. 2020, point by point, with
    distances by subtraction (the module uses |a|^2 + |b|^2 - 2 a.b in blocks)."""

    def radius(points, i):  # distance to the k-th nearest other point
        return sorted(np.linalg.norm(points - points[i], axis=1))[k]  # [0] is the point itself

    real_r = [radius(real, i) for i in range(len(real))]
    fake_r = [radius(fake, j) for j in range(len(fake))]
    d = np.array([[np.linalg.norm(x - y) for y in fake] for x in real])  # d[i, j]: real i, fake j
    holding = [sum(d[i, j] < real_r[i] for i in range(len(real))) for j in range(len(fake))]
    return {
        "precision": sum(h > 0 for h in holding) / len(fake),
        "recall": sum(any(d[i, j] < fake_r[j] for j in range(len(fake))) for i in range(len(real))) / len(real),
        "density": sum(holding) / (k * len(fake)),
        "coverage": sum(min(d[i]) < real_r[i] for i in range(len(real))) / len(real),
    }


@pytest.mark.parametrize(("n_real", "n_fake", "k"), [(40, 30, 3), (6, 25, 5), (30, 4, 3)])
def test_equals_a_brute_force_knn(monkeypatch, n_real, n_fake, k):
    """A narrowed, shifted copy in 8-d, in blocks of a few rows (BLOCK_VALUES small); k up to
    min(N, M) - 1 (6 reference images and k 5: the radius is the farthest other point)."""
    monkeypatch.setattr(fidelity, "BLOCK_VALUES", 50)
    rng = np.random.default_rng(n_real + n_fake + k)
    real = rng.standard_normal((n_real, 8))
    fake = 0.6 * rng.standard_normal((n_fake, 8)) + 0.3
    got = precision_recall_density_coverage(fake.astype(np.float32), real.astype(np.float32), k)
    want = brute_force(fake.astype(np.float32).astype(np.float64), real.astype(np.float32).astype(np.float64), k)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got["recall"] < 1 and got["density"] > 0  # the case decides something


def test_equals_the_prdc_package():
    """The authors' code (prdc 0.2, compute_prdc(real, fake, k)) on float64 features, whose
    distances it computes in float64 as well: the same counts, hence the same four ratios."""
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(7)
    real = rng.standard_normal((300, 32))
    fake = 0.8 * rng.standard_normal((200, 32)) + 0.05
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        want = {key: float(value) for key, value in prdc.compute_prdc(real, fake, 5).items()}
    got = precision_recall_density_coverage(fake, real, 5)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got["recall"] < 1 and 0 < got["coverage"] < 1


def _coverage_expectation(n_real: int, n_fake: int, k: int, first: int = 1) -> float:
    """1 - prod_{i=first..first+k-1} (N - i) / (N + M - i); first 1 is Naeem et al.'s (their
    Section 3.3): a reference point X_i is uncovered when its k nearest among the N - 1 other
    reference and the M generated points (exchangeable given X_i) are all reference points."""
    return 1 - math.prod((n_real - i) / (n_real + n_fake - i) for i in range(first, first + k))


def test_one_distribution_has_density_1_and_coverage_at_its_closed_form():
    """Real and generated features i.i.d. from one Gaussian: E[density] = 1 (Y_j ranks among X_i's
    k nearest of N exchangeable points with probability k / N) and E[coverage] as above, each
    within 4 standard errors over 1,500 draws. The test has the power to see an off-by-one: the
    expectation with self counted as a neighbour (first 0) lies more than 4 errors away."""
    n_real, n_fake, k, draws = 10, 5, 2, 1500
    rng = np.random.default_rng(0)
    values = np.array([
        [precision_recall_density_coverage(rng.standard_normal((n_fake, 4)), rng.standard_normal((n_real, 4)), k)[key]
         for key in ("density", "coverage")]
        for _ in range(draws)
    ])
    mean, error = values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(draws)
    coverage = _coverage_expectation(n_real, n_fake, k)
    assert abs(mean[0] - 1) < 4 * error[0]
    assert abs(mean[1] - coverage) < 4 * error[1]
    assert abs(_coverage_expectation(n_real, n_fake, k, first=0) - coverage) > 4 * error[1]


def test_far_apart_gaussians_score_0():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((50, 16))
    fake = rng.standard_normal((40, 16)) + 100.0
    assert precision_recall_density_coverage(fake, real, 5) == dict.fromkeys(KEYS, 0.0)


def test_a_narrowed_copy_keeps_precision_and_loses_recall():
    """Real uniform on [0, 1]^2, generated uniform on [0, a]^2 (a = 1/2): the generated support
    lies inside the real one, so precision and density tend to 1, while recall and coverage tend
    to the real mass inside the generated support, a^2 = 1/4 (Naeem et al. 2020, Section 3).
    Finite sets add a band along the square's two inner edges (length 2a = 1) as wide as a
    k-NN radius, r = sqrt(k / (pi * count)) times the side: generated r_g ~ 0.02, reference
    r_r ~ 0.04; and the share of reference points in the square has binomial error
    sigma = sqrt(a^2 (1 - a^2) / N). The bounds are those widths, with 3 sigma."""
    n, k, a = 1000, 5, 0.5
    rng = np.random.default_rng(2)
    real, fake = rng.random((n, 2)), a * rng.random((n, 2))
    got = precision_recall_density_coverage(fake, real, k)
    sigma = math.sqrt(a**2 * (1 - a**2) / n)
    band_fake, band_real = 2 * a * math.sqrt(2) * a * math.sqrt(k / (math.pi * n)), 2 * a * math.sqrt(k / (math.pi * n))
    assert got["precision"] > 0.97
    assert abs(got["density"] - 1) < 0.1
    assert a**2 - 3 * sigma < got["recall"] < a**2 + band_fake + 3 * sigma
    assert a**2 - 3 * sigma < got["coverage"] < a**2 + band_real + 3 * sigma


@pytest.mark.parametrize(
    ("fake", "real", "k", "expected"),
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), 1, "features: 3 dimensions, but the reference features have 4"),
        (np.zeros((5, 3)), np.zeros(5), 1, "reference features: expected [count >= 2, dimensions] numbers; got float64 (5,)"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), 1, "features: 15 values are not finite"),
        (np.zeros((5, 3)), np.zeros((9, 3)), 5, "k: got 5; allowed 1..4 (a k-th nearest neighbour among 9 reference and 5 generated features)"),
        (np.zeros((5, 3)), np.zeros((9, 3)), 0, "k: got 0; allowed 1..4 (a k-th nearest neighbour among 9 reference and 5 generated features)"),
    ],
)
def test_bad_input_is_one_line(fake, real, k, expected):
    with pytest.raises(FidelityError) as err:
        precision_recall_density_coverage(fake, real, k)
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"evaluate": {"prdc_k": 0}}, "params: evaluate.prdc_k: Input should be greater than or equal to 1 (got 0)"),
        ({"evaluate": {"prdc_k": 6}, "sample": {"num_samples": 6}},
         "params: evaluate.prdc_k: 6 needs more than 6 images, but sample.num_samples is 6; allowed 1..5"),
        ({"evaluate": {"prdc_k": 5}, "data": {"reference_images": 5}},
         "params: evaluate.prdc_k: 5 needs more than 5 images, but data.reference_images is 5; allowed 1..4"),
    ],
)
def test_config_refuses_a_k_without_k_neighbours(changes, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(full_params(changes))
    assert str(err.value) == expected
    parse_params(full_params({"evaluate": {"prdc_k": 5}, "sample": {"num_samples": 6}, "data": {"reference_images": 6}}))
