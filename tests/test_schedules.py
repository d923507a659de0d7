"""Noise schedules against their closed forms, zero terminal SNR, and respacing."""

import math

import numpy as np
import pytest

from diffusion.process.schedules import (
    BETA_SCHEDULES,
    cosine_betas,
    linear_betas,
    make_betas,
    rescale_zero_terminal_snr,
    sigmoid_betas,
    space_timesteps,
)


def alpha_bar_of(betas):
    return np.cumprod(1.0 - betas)


# --- named schedules ---------------------------------------------------------


def test_linear_matches_ddpm_and_its_alpha_bar_T():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    for t in (0, 1, 321, 998, 999):
        assert betas[t] == pytest.approx(1e-4 + (0.02 - 1e-4) * t / 999, rel=1e-12)
    direct = math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * t / 999) for t in range(1000))
    assert alpha_bar_of(betas)[-1] == pytest.approx(direct, rel=1e-10)
    assert 4.03e-5 < direct < 4.04e-5


def test_linear_scales_both_ends_by_1000_over_T():
    betas = linear_betas(4000)
    assert betas[0] == pytest.approx(0.25e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.005, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.005 - 0.25e-4) / 3999, rtol=1e-9)


def test_cosine_alpha_bar_is_improved_ddpm_eq_17_and_betas_are_clipped():
    T, s = 1000, 0.008

    def f(tau):
        return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(T)
    alpha_bar = alpha_bar_of(betas)
    # index t is the paper's t+1: ᾱ = f((t+1)/T)/f(0), wherever β was not clipped
    for t in (0, 1, 100, 500, 900, 990):
        assert alpha_bar[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert betas.max() == 0.999 and betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)


def test_sigmoid_alpha_bar_is_chen_2023_algorithm_1():
    T, start, end = 1000, -3.0, 3.0

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def gamma(tau):
        return (sig(end) - sig(tau * (end - start) + start)) / (sig(end) - sig(start))

    betas = sigmoid_betas(T)
    alpha_bar = alpha_bar_of(betas)
    for t in (0, 10, 250, 500, 750, 990):
        assert alpha_bar[t] == pytest.approx(gamma((t + 1) / T), rel=1e-9)
    assert betas[-1] == 0.999 and betas.max() == 0.999


def test_zero_terminal_snr_is_lin_2024_algorithm_1():
    for name in ("linear", "cosine"):
        original = alpha_bar_of(make_betas(name, 1000))
        betas = make_betas(name, 1000, zero_terminal_snr=True)
        rescaled = alpha_bar_of(betas)
        assert rescaled[-1] == 0.0 and betas[-1] == 1.0
        assert rescaled[0] == pytest.approx(original[0], rel=1e-12)
        # √ᾱ is shifted and scaled: an affine map of the original √ᾱ
        a, a0, aT = np.sqrt(original), math.sqrt(original[0]), math.sqrt(original[-1])
        for t in (1, 200, 700, 998):
            assert math.sqrt(rescaled[t]) == pytest.approx((a[t] - aT) * a0 / (a0 - aT), rel=1e-9)
    assert np.array_equal(rescale_zero_terminal_snr(linear_betas(100)), make_betas("linear", 100, True))


def test_make_betas_table_and_errors():
    assert set(BETA_SCHEDULES) == {"linear", "cosine", "sigmoid"}
    assert np.array_equal(make_betas("cosine", 50), cosine_betas(50))
    with pytest.raises(ValueError, match=r"schedule: got 'quadratic'; allowed: linear, cosine, sigmoid"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps: got 0"):
        make_betas("cosine", 0)
    with pytest.raises(ValueError, match="num_timesteps: got 19; the linear schedule needs T >= 20"):
        make_betas("linear", 19)
    assert make_betas("linear", 20)[-1] == pytest.approx(1.0)


# --- respacing ---------------------------------------------------------------


def test_space_timesteps_specs():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "5,5") == [0, 125, 250, 374, 499, 500, 625, 750, 874, 999]
    # improved-diffusion's sections: sizes 34, 33, 33
    assert space_timesteps(100, "10,10,5") == [
        0, 4, 7, 11, 15, 18, 22, 26, 29, 33, 34, 38, 41, 45, 48, 52, 55, 59, 62, 66, 67, 75, 83, 91, 99,
    ]  # fmt: skip
    assert space_timesteps(1000, [999, 0, 500, 500]) == [0, 500, 999]
    for count in (2, 7, 50, 333):
        steps = space_timesteps(1000, count)
        assert len(steps) == count and steps[0] == 0 and steps[-1] == 999
        assert max(np.diff(steps)) - min(np.diff(steps)) <= 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (1001, "cannot take 1001 steps"),
        (0, "cannot take 0 steps"),
        ("abc", "got 'abc'"),
        ("ddim", "got 'ddim'"),
        ("ddim7,3", "got 'ddim7,3'"),
        ("ddim600", "no stride takes exactly 600"),
        ([1000], r"in \[0, 1000\)"),
        ([], "non-empty"),
        (2.5, "got 2.5"),
    ],
)
def test_space_timesteps_errors(spec, message):
    with pytest.raises(ValueError, match=f"spec: .*{message}"):
        space_timesteps(1000, spec)
