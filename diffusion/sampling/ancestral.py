"""The samplers of DDPM and DDIM: ancestral sampling and DDIM's family, on any step schedule.

Step i goes from ᾱ = ᾱ_i to ᾱ' = ᾱ_{i+1} (1 after the last step); between them the
process has β = 1 - ᾱ/ᾱ' and posterior variance β̃ = β (1 - ᾱ')/(1 - ᾱ) (improved DDPM
§4's respaced process, DDPM eq. 7). Both take ``eta`` so they share one signature.
"""

from __future__ import annotations

import math

import torch

from diffusion.sampling.denoiser import Denoiser
from diffusion.sampling.noise import NoiseSource, randn
from diffusion.sampling.steps import Steps
from diffusion.sampling.walk import Callback, report, walk


def ddpm_sample(
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
    """Ancestral sampling, DDPM Algorithm 2: x' = μ̃(x̂_0, x) + σ z, z ~ N(0, I), no noise at the
    last step, where μ̃ = β √ᾱ'/(1-ᾱ) x̂_0 + (1-ᾱ') √(1-β)/(1-ᾱ) x (DDPM eq. 7) and σ² is
    the denoiser's variance (:meth:`~diffusion.sampling.denoiser.Denoised.log_variance`: β̃,
    β or improved DDPM's learned interpolation, eq. 15). ``eta`` is ignored (DDPM is DDIM
    with η = 1 and fixed_small; see :func:`ddim_sample`).
    """
    for i, t, ab, ab_prev in walk(steps, x, progress):
        out = denoiser(x, t, y)
        report(callback, steps, i, x, out)
        beta = 1 - ab / ab_prev
        mean = beta * math.sqrt(ab_prev) / (1 - ab) * out.x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x
        if i == len(steps) - 1:
            return mean
        log_variance = out.log_variance(beta, beta * (1 - ab_prev) / (1 - ab))
        x = mean + torch.exp(0.5 * log_variance) * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x


def ddim_sample(
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
    """DDIM, Song et al. 2021 eq. 12:

        x' = √ᾱ' x̂_0 + √(1 - ᾱ' - σ²) ε̂ + σ z,   σ(η) = η √((1 - ᾱ')/(1 - ᾱ)) √(1 - ᾱ/ᾱ')  (eq. 16),

    so the last step (ᾱ' = 1) returns x̂_0. η = 0 is deterministic (the probability-flow
    ODE's first-order solver); η = 1 is DDPM with fixed_small variance. A learned variance is not used.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: got {eta!r}; allowed: 0 <= eta <= 1")
    for i, t, ab, ab_prev in walk(steps, x, progress):
        out = denoiser(x, t, y)
        report(callback, steps, i, x, out)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * out.x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * out.eps
        if sigma > 0 and i < len(steps) - 1:
            x = x + sigma * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x
