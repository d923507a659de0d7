"""EDM's sampler (Karras et al. 2022): Heun's second-order method in σ, with optional churn.

EDM writes the process as x̃ = x_0 + σ ε, σ = √((1-ᾱ)/ᾱ) (our x_t = α x̃, α = √ᾱ), where
the probability-flow ODE is dx̃/dσ = (x̃ - D(x̃; σ))/σ = ε̂ (eq. 4 with σ(t) = t). Algorithm 1
takes Heun steps between the σ of the schedule, Euler on the last (to σ = 0, it returns
x̂_0): 2n - 1 evaluations for n steps. Algorithm 2 first raises σ_i to σ̂ = σ_i (1 + γ_i),
γ_i = min(S_churn/n, √2 - 1) where S_tmin <= σ_i <= S_tmax, by adding noise
√(σ̂² - σ_i²) S_noise z: σ̂ is off the schedule, so the network sees the model timestep of
σ̂ (:meth:`~diffusion.process.base.NoiseProcess.t_of_sigma`, which stops at the process's
largest σ). S_churn = 0 is Algorithm 1.

Under zero terminal SNR σ_0 = ∞: the first step is then Euler's in its limit,
x̃_1 = x̂_0 + σ_1 ε̂ (DDIM's step; the trapezoid needs a finite σ), one evaluation fewer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusion.sampling.denoiser import Denoiser
from diffusion.sampling.noise import NoiseSource, randn
from diffusion.sampling.steps import Steps
from diffusion.sampling.walk import Callback, check_deterministic, report, walk


def edm_sigma(alpha_bar: float) -> float:
    """EDM's σ = √((1-ᾱ)/ᾱ): ∞ at ᾱ = 0, 0 at ᾱ = 1."""
    return math.inf if alpha_bar <= 0 else math.sqrt((1 - alpha_bar) / alpha_bar)


def heun_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: Steps,
    *,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Algorithm 2 (Algorithm 1 when ``s_churn`` = 0) on the σ of ``steps``; S_tmin and
    S_tmax (None: ∞) bound the σ_i that churn, S_noise scales the added noise."""
    s_tmax = math.inf if s_tmax is None else s_tmax
    check_deterministic(eta, "heun")
    if s_churn < 0 or s_noise < 0 or s_tmin > s_tmax:
        raise ValueError(
            f"s_churn: need s_churn >= 0, s_noise >= 0, s_tmin <= s_tmax; got {s_churn}, {s_noise}, {s_tmin}, {s_tmax}"
        )
    n, process = len(steps), steps.process
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    if steps.alpha_bar[0] > 0:
        x = x / math.sqrt(steps.alpha_bar[0])  # x̃ = x/α
    for i, t, ab, ab_next in walk(steps, x, progress):
        t_next = None if i == n - 1 else process.time_tensor(steps.timesteps[i + 1], x.shape[0], x.device)
        if ab == 0:  # σ_0 = ∞: Euler's step in its limit
            out = denoiser(x, t, y)
            report(callback, steps, i, x, out)
            x = out.x0 + edm_sigma(ab_next) * out.eps
            continue
        sigma, sigma_next, t_hat, ab_hat = edm_sigma(ab), edm_sigma(ab_next), t, ab
        if gamma > 0 and s_tmin <= sigma <= s_tmax:
            t_hat_value = float(np.float32(process.t_of_sigma(sigma * (1 + gamma))))  # the t the network sees
            ab_hat = float(process.alpha_bar(t_hat_value))
            t_hat = process.time_tensor(t_hat_value, x.shape[0], x.device)
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(max(edm_sigma(ab_hat) ** 2 - sigma**2, 0.0)) * s_noise * noise
        sigma_hat = edm_sigma(ab_hat)
        out = denoiser(math.sqrt(ab_hat) * x, t_hat, y)
        report(callback, steps, i, math.sqrt(ab_hat) * x, out)
        if t_next is None:  # Euler to σ = 0: x̃ - σ̂ (x̃ - D)/σ̂ = D
            return out.x0
        d = out.eps  # (x̃ - D(x̃; σ̂))/σ̂
        x_next = x + (sigma_next - sigma_hat) * d
        d_next = denoiser(math.sqrt(ab_next) * x_next, t_next, y).eps
        x = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
    return x
