"""Exact denoisers of a Gaussian mixture, the reference for the solvers and guidance tests.

Data: class k has x_0 ~ N(mu_k, s² I) and prior weight pi_k. At noise level ᾱ, with
a = √ᾱ, b² = 1 - ᾱ and v = a² s² + b², x_t | k ~ N(a mu_k, v I), so

    E[x_0 | x_t, k] = mu_k + a s²/v (x_t - a mu_k)                    (one Gaussian)
    p(k | x_t)     = softmax_k(log pi_k - |x_t - a mu_k|²/(2v))
    E[x_0 | x_t]   = Σ_k p(k | x_t) E[x_0 | x_t, k]                   (the mixture)

The conditional denoiser of class y is its Gaussian's; the unconditional one the mixture's;
``log_prob_class`` is log p(y | x_t), the noise-aware classifier's exact answer. For one
Gaussian the probability-flow ODE keeps z = (x_t - a mu)/√v fixed, so it maps x_T to
mu + s z_T exactly: :func:`exact_ode_map`.
"""

from __future__ import annotations

import math

import torch

from diffusion.sampling.denoiser import Denoised, alpha_bar_at
from diffusion.process.base import NoiseProcess


class MixtureDenoiser:
    """The exact denoiser of the mixture (``means`` [K, D], common std ``s``, weights ``weights``)
    on ``process`` (any: it works in the samplers' variance-preserving view), as a
    :class:`~diffusion.sampling.denoiser.Denoiser`. Called with y (labels in 0..K-1, or
    ``null_class`` = K for "no label") it is class y's Gaussian; without y, the mixture. It counts the images it is called on in ``evaluations``."""

    def __init__(self, process: NoiseProcess, means, s: float, weights=None):
        self.process = process
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.s = s
        k = len(self.means)
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else (
            torch.as_tensor(weights, dtype=torch.float64)
        )
        self.null_class = k
        self.evaluations = 0

    def _terms(self, x: torch.Tensor, t: torch.Tensor):
        ab = alpha_bar_at(self.process, t, x).double().reshape(-1, 1, 1)  # [B, 1, 1]
        a, v = ab.sqrt(), ab * self.s**2 + (1 - ab)
        xd = x.double().reshape(x.shape[0], 1, -1)  # [B, 1, D]
        component_x0 = self.means[None] + a * self.s**2 / v * (xd - a * self.means[None])  # [B, K, D]
        log_joint = self.weights.log()[None] - ((xd - a * self.means[None]) ** 2).sum(-1) / (2 * v[..., 0])  # [B, K]
        return ab, component_x0, log_joint

    def log_prob_class(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(k | x_t) [B, K] in float64 (differentiable in x)."""
        _, _, log_joint = self._terms(x, t)
        return torch.log_softmax(log_joint, dim=1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        self.evaluations += x.shape[0]
        ab, component_x0, log_joint = self._terms(x, t)
        posterior = torch.softmax(log_joint, dim=1)[..., None]  # [B, K, 1]
        mixture_x0 = (posterior * component_x0).sum(1)  # [B, D]
        if y is not None:
            conditional = y < self.null_class
            picked = component_x0[torch.arange(len(y)), y.clamp(max=self.null_class - 1)]
            mixture_x0 = torch.where(conditional[:, None], picked, mixture_x0)
        x0 = mixture_x0.reshape(x.shape)
        ab = ab.reshape(-1, *(1,) * (x.ndim - 1))
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        return Denoised(x0.to(x.dtype), eps.to(x.dtype))


def exact_ode_map(x_T: torch.Tensor, alpha_bar_T: float, mu: float, s: float) -> torch.Tensor:
    """Where the probability-flow ODE of N(mu, s² I) data takes x_T at ᾱ_T: mu + s (x_T - √ᾱ_T mu)/√v_T."""
    v = alpha_bar_T * s**2 + 1 - alpha_bar_T
    return mu + s * (x_T.double() - math.sqrt(alpha_bar_T) * mu) / math.sqrt(v)
