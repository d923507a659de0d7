"""A held-out loss that compares across noise schedules, parameterisations and losses.

The training loss of a run is on its own scale: ε-MSE under a linear schedule, v-MSE,
or the hybrid loss are not comparable numbers, so neither a pruner nor a person can
rank runs of a sweep by them. :func:`reference_loss` scores any model the same way:
L_simple (Ho et al. 2020, eq. 14), the ε-prediction error, at fixed noise levels of
one reference process, the cosine schedule at T=1000 (Nichol & Dhariwal 2021, eq. 17),
on fixed held-out images and fixed noise. A model of the discrete chain is asked at its
own timestep whose log-SNR is nearest to the reference level; one of a continuous process
at the exact time of that level (:func:`reference_times`), on the process's own x_t. Its
output, whatever it predicts, is turned into ε̂ by the model's own process.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffusion.process.base import NoiseProcess
from diffusion.process.continuous import ContinuousDiffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.schedules import cosine_betas

REFERENCE_TIMESTEPS = 1000
LEVELS = 16
"""Noise levels: the midpoints of 16 equal slices of the reference's timesteps (log-SNR 5.6 to -6.1)."""


def reference_log_snr(levels: int = LEVELS) -> np.ndarray:
    """log(ᾱ/(1-ᾱ)) of the cosine schedule (T=1000) at the midpoints of ``levels`` equal slices."""
    alpha_bar = np.cumprod(1.0 - cosine_betas(REFERENCE_TIMESTEPS))
    index = ((np.arange(levels) + 0.5) * REFERENCE_TIMESTEPS / levels).astype(int)
    return np.log(alpha_bar[index] / (1.0 - alpha_bar[index]))


def nearest_timesteps(diffusion: GaussianDiffusion, log_snr: np.ndarray) -> np.ndarray:
    """The index t of ``diffusion`` whose log-SNR is nearest to each of ``log_snr``."""
    ab = diffusion.alphas_cumprod
    own = np.log(ab / np.maximum(1.0 - ab, 1e-300))
    return np.abs(own[None, :] - log_snr[:, None]).argmin(axis=1)


def reference_times(process: NoiseProcess, log_snr: np.ndarray) -> np.ndarray:
    """The times of a continuous ``process`` at each of ``log_snr`` = log(ᾱ/(1-ᾱ)) = 2λ:
    EDM's σ = e^{-λ} = exp(-log_snr/2), and t = ``process.t_of_sigma(σ)``."""
    return process.t_of_sigma(np.exp(-np.asarray(log_snr, dtype=np.float64) / 2))


@torch.no_grad()
def reference_loss(
    model: nn.Module, diffusion: GaussianDiffusion | ContinuousDiffusion, x0: torch.Tensor, *, seed: int = 0
) -> float:
    """Mean ε-MSE of ``model`` on images ``x0`` [N, C, H, W] in the model's range [-1, 1],
    image i at reference level i mod :data:`LEVELS`.

    The noise comes from ``seed`` alone, so two calls on the same model give the same
    number, and two models see the same x_0, ε and levels. The model is called
    without labels (a class-conditional model with its null class).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x0 = x0.to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if isinstance(diffusion, ContinuousDiffusion):
        return _continuous_reference_loss(model, diffusion, x0, noise)
    levels = nearest_timesteps(diffusion, reference_log_snr())
    t = torch.as_tensor(levels[np.arange(len(x0)) % LEVELS], device=device)
    x_t = diffusion.q_sample(x0, t, noise)
    was_training = model.training
    model.eval()
    try:
        output = model(x_t, t)
    finally:
        model.train(was_training)
    _, eps = diffusion.x0_eps_from_output(output[:, : x0.shape[1]], x_t, t)
    return float(((eps.float() - noise) ** 2).mean())


def _continuous_reference_loss(model: nn.Module, diffusion: ContinuousDiffusion, x0: torch.Tensor, noise: torch.Tensor) -> float:
    """:func:`reference_loss` on a continuous process: image i at the time of reference level
    i mod :data:`LEVELS`, x_t = α x_0 + σ ε, ε̂ from the prediction (its preconditioning applied)."""
    process = diffusion.process
    times = reference_times(process, reference_log_snr())
    t = torch.as_tensor(times[np.arange(len(x0)) % LEVELS], dtype=torch.float64, device=x0.device)
    x_t = process.q_sample(x0, t, noise).to(x0.dtype)
    was_training = model.training
    model.eval()
    try:
        prediction = diffusion.predict(model, x_t, t)
    finally:
        model.train(was_training)
    _, eps = process.x0_eps(diffusion.prediction, prediction, x_t, t)
    return float(((eps.float() - noise) ** 2).mean())
