"""DPM-Solver++ (Lu et al. 2022): multistep solvers of the probability-flow ODE in data prediction.

In λ = log(α/σ), α = √ᾱ and σ = √(1-ᾱ), the ODE's exact solution from λ_s to λ_t is

    x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x̂_0(x_λ, λ) dλ   (over [λ_s, λ_t]),

and the solvers integrate exactly a polynomial in λ through the last evaluations of x̂_0.
With h = λ_t - λ_s, φ_1 = e^{-h} - 1, φ_2 = φ_1/h + 1, φ_3 = φ_2/h - 1/2:

* order 1 (DDIM): x_t = (σ_t/σ_s) x_s - α_t φ_1 x̂_0;
* 2M, Algorithm 2: D = (1 + 1/(2r)) x̂_0 - 1/(2r) x̂_0^prev, r = h_prev/h, in place of x̂_0;
* 3M, the authors' ``multistep_dpm_solver_third_update`` with one factor corrected: with
  r_0 = h_0/h, r_1 = h_1/h, D1_k = (x̂_0^(k) - x̂_0^(k+1))/r_k, D1 = D1_0 + r_0/(r_0 + r_1)
  (D1_0 - D1_1) ≈ h x̂_0' and D2 = 2 (D1_0 - D1_1)/(r_0 + r_1) ≈ h² x̂_0'',
  x_t = (σ_t/σ_s) x_s - α_t φ_1 x̂_0 + α_t φ_2 D1 - α_t φ_3 D2, the exact integral of x̂_0's
  quadratic Taylor polynomial (σ_t ∫ e^λ (λ-λ_s)²/2 dλ = -α_t h² φ_3). The authors' code
  (and diffusers', k-diffusion's) leave out the 2, so their D2 is h² x̂_0''/2: half the
  second-order term, which makes their "3M" a second-order method (tests/test_solvers.py
  measures the order of both; the corrected one is third order).

The first steps run at the orders their history allows (warm-up). The last step goes to
ᾱ = 1 (σ = 0, h = ∞) and is first order, so it returns x̂_0; with fewer than 15 steps the
one before it is at most second order (``lower_order_final``, as the authors and diffusers).
Under zero terminal SNR the first step starts at ᾱ = 0 (λ = -∞): written with σ_t/σ_s and
φ_1 = expm1(-h) = -1 it stays finite (DDIM's step from pure noise), and the history starts
after it, since no difference quotient reaches across an infinite h.
"""

from __future__ import annotations

import math

import torch

from diffusion.sampling.denoiser import Denoiser
from diffusion.sampling.noise import NoiseSource
from diffusion.sampling.steps import Steps
from diffusion.sampling.walk import Callback, check_deterministic, half_log_snr, report, walk

LOWER_ORDER_FINAL_BELOW = 15
"""Fewer steps than this: the step before the last is at most second order (diffusers' rule)."""


def step_order(order: int, i: int, steps: Steps, lower_order_final_below: int | None) -> int:
    """The order of step i: at most the evaluations since the last ᾱ = 0 (warm-up), 1 on the
    last step (to σ = 0), at most n - i on the last steps when n < ``lower_order_final_below``
    (None: always)."""
    n = len(steps)
    history = i + 1 - int(steps.alpha_bar[0] == 0)
    final = n - i if lower_order_final_below is None or n < lower_order_final_below else (1 if i == n - 1 else order)
    return max(1, min(order, history, final))


def dpm_solver_pp_update(
    x: torch.Tensor, ab_s: float, ab_t: float, lambdas: list[float], x0s: list[torch.Tensor]
) -> torch.Tensor:
    """One multistep step from ᾱ_s = ``ab_s`` (λ_s = lambdas[-1]) to ``ab_t``, of order
    len(x0s) (1, 2 or 3): x̂_0 at the λ of the last evaluations, newest last."""
    h = half_log_snr(ab_t) - lambdas[-1]
    alpha_t, phi_1 = math.sqrt(ab_t), math.expm1(-h)
    x_t = math.sqrt((1 - ab_t) / (1 - ab_s)) * x - alpha_t * phi_1 * x0s[-1]
    if len(x0s) == 2:
        r0 = (lambdas[-1] - lambdas[-2]) / h
        x_t = x_t - 0.5 * alpha_t * phi_1 / r0 * (x0s[-1] - x0s[-2])
    elif len(x0s) == 3:
        r0, r1 = (lambdas[-1] - lambdas[-2]) / h, (lambdas[-2] - lambdas[-3]) / h
        d1_0, d1_1 = (x0s[-1] - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1
        d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), 2 * (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        x_t = x_t + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
    return x_t


def _dpm_solver_pp(
    order: int, denoiser: Denoiser, x: torch.Tensor, steps: Steps, y, callback: Callback | None, progress: bool
) -> torch.Tensor:
    lambdas: list[float] = []
    x0s: list[torch.Tensor] = []  # x̂_0 of the last evaluations, newest last
    for i, t, ab, ab_next in walk(steps, x, progress):
        out = denoiser(x, t, y)
        report(callback, steps, i, x, out)
        lambdas, x0s = [*lambdas, half_log_snr(ab)][-order:], [*x0s, out.x0][-order:]
        p = step_order(order, i, steps, LOWER_ORDER_FINAL_BELOW)
        x = dpm_solver_pp_update(x, ab, ab_next, lambdas[-p:], x0s[-p:])
    return x


def dpmpp_2m_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: Steps,
    *,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: one evaluation a step, second order."""
    check_deterministic(eta, "dpm++2m")
    return _dpm_solver_pp(2, denoiser, x, steps, y, callback, progress)


def dpmpp_3m_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: Steps,
    *,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep update, one evaluation a step."""
    check_deterministic(eta, "dpm++3m")
    return _dpm_solver_pp(3, denoiser, x, steps, y, callback, progress)
