"""Step schedules give the noise levels their docstrings promise (diffusion/sampling/steps.py),
for DDPM's linear and improved DDPM's cosine schedule at T = 1000.

σ below is EDM's σ = √((1-ᾱ)/ᾱ) of a level ᾱ; σ_max and σ_min are those of the process's last
and first timesteps, pinned here: linear ᾱ_999 = 4.0358e-5 (σ_max = 157.41), ᾱ_0 = 1 - 1e-4
(σ_min = 0.0100005); cosine ᾱ_999 = 2.4288e-9 (σ_max = 20291), ᾱ_0 = 0.99995872.
"""

import numpy as np
import pytest

from diffusion.process.schedules import make_betas, space_timesteps
from diffusion.process.discrete import DiscreteChain
from diffusion.sampling.steps import KARRAS_RHO, make_steps

LEVELS = {name: DiscreteChain(np.cumprod(1 - make_betas(name, 1000))) for name in ("linear", "cosine")}
SIGMA_RANGE = {"linear": (0.010000500037502575, 157.40728081040749), "cosine": (0.006425412771142062, 20291.169610019904)}


def sigmas(steps):
    """σ of the n levels where the network is evaluated (the (n+1)-th is ᾱ = 1, σ = 0)."""
    ab = steps.alpha_bar[:-1]
    return np.sqrt((1 - ab) / ab)


@pytest.mark.parametrize("name", LEVELS)
def test_sigma_range_is_the_process_ends(name):
    levels = LEVELS[name]
    ab = levels.alphas_cumprod
    assert levels.sigma_range() == pytest.approx(SIGMA_RANGE[name], rel=1e-12)
    assert levels.sigma_range() == pytest.approx((np.sqrt((1 - ab[0]) / ab[0]), np.sqrt((1 - ab[-1]) / ab[-1])), rel=1e-12)


@pytest.mark.parametrize("name", LEVELS)
@pytest.mark.parametrize("schedule", ["linspace", "trailing", "log-snr", "karras"])
@pytest.mark.parametrize("n", [1, 2, 10, 37, 250])
def test_every_schedule_starts_at_the_last_timestep_and_ends_clean(name, schedule, n):
    levels = LEVELS[name]
    steps = make_steps(schedule, levels, n)
    assert len(steps) == n and len(steps.alpha_bar) == n + 1 and steps.alpha_bar[-1] == 1.0
    # linspace's single step is space_timesteps(1000, 1) == [0] (improved DDPM's respacing keeps t = 0 first)
    assert steps.timesteps[0] == (0 if (schedule, n) == ("linspace", 1) else 999)
    assert np.all(np.diff(steps.timesteps) < 0)
    np.testing.assert_array_equal(steps.alpha_bar[:-1], levels.alpha_bar(steps.timesteps))


@pytest.mark.parametrize("name", LEVELS)
def test_linspace_is_space_timesteps(name):
    levels = LEVELS[name]
    for spec in (1, 10, 25, 1000, "ddim25", "10,10,5"):
        steps = make_steps("linspace", levels, spec)
        assert steps.timesteps.tolist() == space_timesteps(1000, spec)[::-1]
        np.testing.assert_array_equal(steps.alpha_bar[:-1], levels.alphas_cumprod[space_timesteps(1000, spec)[::-1]])
    assert make_steps("linspace", levels, 10).timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


@pytest.mark.parametrize("name", LEVELS)
def test_trailing_is_diffusers_formula(name):
    """diffusers' ``timestep_spacing="trailing"``: np.round(np.arange(T, 0, -T/n)) - 1 (Lin et al. 2024, Table 2)."""
    levels = LEVELS[name]
    for n in (1, 3, 7, 10, 50, 333, 1000):
        expected = np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1
        assert make_steps("trailing", levels, n).timesteps.tolist() == expected.tolist()
    assert make_steps("trailing", levels, 10).timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    with pytest.raises(ValueError, match="steps: 1001 is more than the 1000 timesteps"):
        make_steps("trailing", levels, 1001)


def test_trailing_matches_diffusers_itself():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in (3, 10, 50, 333):
        scheduler.set_timesteps(n)
        assert make_steps("trailing", LEVELS["linear"], n).timesteps.tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("name", LEVELS)
@pytest.mark.parametrize("n", [2, 10, 50, 400])
def test_log_snr_levels_are_uniform_in_log_sigma(name, n):
    levels = LEVELS[name]
    sigma_min, sigma_max = SIGMA_RANGE[name]
    log_sigma = np.log(sigmas(make_steps("log-snr", levels, n)))
    np.testing.assert_allclose(log_sigma, np.linspace(np.log(sigma_max), np.log(sigma_min), n), rtol=0, atol=1e-9)
    # λ = log(α/σ_VP) = -log σ: the same spacing, DPM-Solver's logSNR steps
    assert np.ptp(np.diff(log_sigma)) < 1e-9


@pytest.mark.parametrize("name", LEVELS)
@pytest.mark.parametrize("n", [2, 10, 50, 400])
def test_karras_is_edm_eq_5_with_rho_7(name, n):
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ: both ends exact, σ^(1/ρ) evenly spaced."""
    assert KARRAS_RHO == 7.0
    sigma_min, sigma_max = SIGMA_RANGE[name]
    got = sigmas(make_steps("karras", LEVELS[name], n))
    ramp = np.arange(n) / (n - 1)
    expected = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[0] == pytest.approx(sigma_max, rel=1e-12) and got[-1] == pytest.approx(sigma_min, rel=1e-12)
    assert np.ptp(np.diff(got ** (1 / 7))) < 1e-9 * got[0] ** (1 / 7)


def test_karras_single_step_is_sigma_max():
    steps = make_steps("karras", LEVELS["linear"], 1)
    assert steps.timesteps.tolist() == [999.0] and sigmas(steps)[0] == pytest.approx(157.40728081040749, rel=1e-12)


@pytest.mark.parametrize("name", LEVELS)
def test_t_of_sigma_inverts_the_interpolated_levels(name):
    """Between timesteps log σ is linear in t: t_of_sigma is alpha_bar's inverse, exact on the grid."""
    levels = LEVELS[name]
    sigma_min, sigma_max = SIGMA_RANGE[name]
    sigma = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), 997))
    np.testing.assert_allclose(levels.alpha_bar(levels.t_of_sigma(sigma)), 1 / (1 + sigma**2), rtol=1e-10)
    grid = np.sqrt((1 - levels.alphas_cumprod) / levels.alphas_cumprod)
    np.testing.assert_allclose(levels.t_of_sigma(grid), np.arange(1000), rtol=0, atol=1e-9)
    assert levels.t_of_sigma(10 * sigma_max) == 999 and levels.t_of_sigma(sigma_min / 10) == 0  # clamped to the table


def test_unknown_schedule_and_bad_counts():
    with pytest.raises(ValueError, match="schedule: got 'cosine'; allowed: linspace, trailing, log-snr, karras"):
        make_steps("cosine", LEVELS["linear"], 10)
    for schedule in ("trailing", "log-snr", "karras"):
        with pytest.raises(ValueError, match=f"the '{schedule}' schedule takes a number of steps >= 1"):
            make_steps(schedule, LEVELS["linear"], 0)
