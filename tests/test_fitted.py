"""Fitted step schedules (diffusion/sampling/fitted.py) on Gaussian mixtures with exact denoisers.

The fit sees a calibration batch of x_T and its exact ODE solutions (tests/mixtures.py); it is
judged on other x_T. What it must do: never end worse on the calibration batch than the
schedule it starts from (it keeps that one when nothing beats it), and where the start is
poor, place the steps so that the error on unseen x_T falls well below the start's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixtures import MIXTURES, MixtureDenoiser, exact_ode_solution

from diffusion.process.factory import make_diffusion
from diffusion.sampling.fitted import fit_timesteps, mean_distance
from diffusion.sampling.sample import SAMPLER_FUNCTIONS
from diffusion.sampling.steps import make_steps

SECTION = {"timesteps": 1000, "variance": "fixed_small", "loss": "mse", "zero_terminal_snr": False, "sigma_data": 0.5}


def process_of(name: str):
    schedule = "linear" if name in ("ddpm", "vp") else None
    return make_diffusion({**SECTION, "process": name, "schedule": schedule, "prediction": None}).process


def batch(mixture, process, count: int, seed: int):
    x = torch.randn((count, mixture.dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    start = make_steps("log-snr", process, 2)
    return x, exact_ode_solution(mixture, x, max(float(start.alpha_bar[0]), 1e-12))


@pytest.mark.parametrize("name", ["ddpm", "vp", "edm", "flow"])
def test_a_fitted_schedule_halves_the_error_on_unseen_noise(name):
    """UniPC at 5 evaluations on the 2-d mixture of three unequal Gaussians: fitted on 256 x_T,
    its mean distance from the exact ODE solution on 1000 other x_T is below half the log-snr
    schedule's it started from (measured: about a quarter), on every process."""
    mixture, process = MIXTURES["2d-3"], process_of(name)
    calibration, calibration_ref = batch(mixture, process, 256, seed=1)
    unseen, unseen_ref = batch(mixture, process, 1000, seed=0)
    denoiser = MixtureDenoiser(process, mixture)
    solve = SAMPLER_FUNCTIONS["unipc"]
    start = make_steps("log-snr", process, 5)
    fit = fit_timesteps(lambda steps: solve(denoiser, calibration.clone(), steps), calibration_ref, start, max_solves=150)
    assert fit.solves <= 150 and fit.distance < fit.start_distance
    assert fit.steps.timesteps[0] == start.timesteps[0] and np.all(np.diff(fit.steps.timesteps) < 0)
    before = mean_distance(solve(denoiser, unseen.clone(), start), unseen_ref)
    after = mean_distance(solve(denoiser, unseen.clone(), fit.steps), unseen_ref)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(("sampler", "mixture", "steps"), [("dpm++2m", "8d-5", 6), ("heun", "2d-3", 4), ("ddim", "64d-10", 5)])
def test_the_fit_never_ends_worse_than_its_start(sampler, mixture, steps):
    """Started from a schedule the fit already improved, and with budgets of 1 and 6 solves, the
    returned schedule's distance on the calibration batch, measured again, is the one reported
    and at most the start's; a fit that finds nothing better returns the start itself."""
    mixture, process = MIXTURES[mixture], process_of("ddpm")
    x, reference = batch(mixture, process, 64, seed=1)
    denoiser = MixtureDenoiser(process, mixture)

    def solve(s):
        return SAMPLER_FUNCTIONS[sampler](denoiser, x.clone(), s)

    first = fit_timesteps(solve, reference, make_steps("karras", process, steps), max_solves=40)
    for start, budget in ((first.steps, 40), (make_steps("trailing", process, steps), 1), (first.steps, 6)):
        fit = fit_timesteps(solve, reference, start, max_solves=budget)
        assert fit.solves <= budget and fit.distance <= fit.start_distance
        assert mean_distance(solve(fit.steps), reference) == pytest.approx(fit.distance, rel=1e-12)
        if fit.distance == fit.start_distance:
            assert fit.steps is start


@pytest.mark.parametrize(
    ("timesteps", "message"),
    [
        (None, "schedule: 'fitted' needs the fitted times"),
        ([999.0, 500.0], "schedule: the fitted schedule has 2 steps, not 3: fit it again for 3 steps"),
        ([1500.0, 500.0, 0.0], "schedule: the fitted times run from 1500 to 0; process 'ddpm' has them from t_max 999 to t_min 0"),
        ([999.0, 500.0, 600.0], "steps: the schedule gives no strictly decreasing timesteps"),
    ],
)
def test_fitted_times_that_do_not_fit_the_process_are_refused(timesteps, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_steps("fitted", process_of("ddpm"), 3, timesteps)
