"""Continuous-time processes: the VP SDE, EDM's σ process and the flow-matching interpolant.

Each is a :class:`~diffusion.process.base.NoiseProcess` (x_t = α(t) x_0 + σ(t) ε, clean at t = 0):

* :class:`VPProcess`, Song et al. 2021 ("Score-Based Generative Modeling through SDEs"),
  the variance-preserving SDE dx = -½β(t) x dt + √β(t) dw: with the ``linear`` β(t) = β_min
  + t (β_max - β_min), β from 0.1 to 20, α(t) = exp(-¼ t² (β_max - β_min) - ½ t β_min)
  (their eq. 33); with ``cosine``, improved DDPM's α(t) = cos(φ(t))/cos(φ(0)), φ(t) =
  (t + s)/(1 + s) π/2, s = 0.008, in continuous time. σ = √(1 - α²). The network sees
  999 t (the score-SDE code's time input for DDPM-style networks).
* :class:`EDMProcess`, Karras et al. 2022: α = 1, σ(t) = t, t in [σ_min, σ_max] =
  [0.002, 80], and the preconditioning of its Table 1 wrapped around any network:
  D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) with c_skip = σ_d²/(σ² + σ_d²),
  c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ. The network predicts
  x_0 through D; its loss weight is λ(σ) = 1/c_out² (:mod:`~diffusion.process.weighting`).
* :class:`FlowProcess`, the linear interpolant of rectified flow and flow matching (Liu et
  al. 2023; Lipman et al. 2023; SiT, Ma et al. 2024): x_t = (1 - t) x_0 + t ε, t in [0, 1],
  the network predicting the velocity u = ε - x_0. The network sees 999 t.

:class:`ContinuousDiffusion` trains a network on any of them: L = w(t) |target - prediction|²,
the target per prediction (:meth:`~diffusion.process.base.NoiseProcess.target`), t from a
noise-level distribution (:mod:`~diffusion.process.timestep_sampling`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffusion.process.base import NoiseProcess, shaped
from diffusion.process.gaussian import mean_flat
from diffusion.process.options import CONTINUOUS_TIME_MAX, Loss, Prediction, Process, Variance, parse

NETWORK_TIME_SCALE = 999.0
"""The network's time input is 999 t on the unit interval (score-SDE's DDPM++ convention),
so a network built for the discrete chain's timesteps 0..999 sees the same range."""


class VPProcess(NoiseProcess):
    """Song et al. 2021's VP SDE in closed form (module doc), t in [t_min, 1]."""

    name = "vp"
    variance_preserving = True
    BETA_MIN, BETA_MAX = 0.1, 20.0
    COSINE_S = 0.008
    T_MIN = 1e-3
    """The smallest time sampled (score-SDE's sampling ε)."""

    def __init__(self, schedule: str = "linear"):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"diffusion.schedule: got {schedule!r}; process 'vp' allows 'linear' or 'cosine'")
        self.schedule = schedule
        self.t_min, self.t_max = self.T_MIN, 1.0

    def _phi(self, t):
        return (t + self.COSINE_S) / (1 + self.COSINE_S) * (math.pi / 2)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.BETA_MAX - self.BETA_MIN) - 0.5 * t * self.BETA_MIN
        # cos φ(t) written as sin((1 - t)/(1 + s) π/2): exactly 0 at t = 1 (cos(π/2) is 6e-17 in floats,
        # which made σ_max 1.6e16, beyond what t_of_sigma resolves near t = 1)
        cos_phi = torch.sin((1 - t) / (1 + self.COSINE_S) * (math.pi / 2))
        return torch.log(cos_phi.clamp(min=0)) - math.log(math.cos(self._phi(0.0)))

    def alpha_sigma(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).clamp(min=0).sqrt()

    def alpha_sigma_derivatives(self, t):
        t = t.to(torch.float64)
        alpha, sigma = self.alpha_sigma(t)
        if self.schedule == "linear":
            d_alpha = -0.5 * (self.BETA_MIN + t * (self.BETA_MAX - self.BETA_MIN)) * alpha
        else:
            d_alpha = -torch.sin(self._phi(t)) * (math.pi / 2) / (1 + self.COSINE_S) / math.cos(self._phi(0.0))
        return d_alpha, -alpha * d_alpha / sigma

    def t_of_sigma(self, sigma):
        log1p_sigma2 = np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)  # -log ᾱ = -2 log α
        if self.schedule == "linear":
            delta = self.BETA_MAX - self.BETA_MIN
            t = (-self.BETA_MIN + np.sqrt(self.BETA_MIN**2 + 2 * delta * log1p_sigma2)) / delta
        else:
            phi = np.arccos(np.cos(self._phi(0.0)) * np.exp(-0.5 * log1p_sigma2))
            t = phi * 2 * (1 + self.COSINE_S) / math.pi - self.COSINE_S
        return np.clip(t, self.t_min, self.t_max)

    def network_time(self, t):
        return (NETWORK_TIME_SCALE * t).float()


class EDMProcess(NoiseProcess):
    """Karras et al. 2022's σ process with Table 1's preconditioning (module doc); t = σ."""

    name = "edm"
    SIGMA_MIN, SIGMA_MAX = 0.002, CONTINUOUS_TIME_MAX[Process.EDM]

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)
        self.t_min, self.t_max = self.SIGMA_MIN, self.SIGMA_MAX

    def alpha_sigma(self, t):
        t = t.to(torch.float64)
        return torch.ones_like(t), t

    def alpha_sigma_derivatives(self, t):
        t = t.to(torch.float64)
        return torch.zeros_like(t), torch.ones_like(t)

    def t_of_sigma(self, sigma):
        return np.clip(np.asarray(sigma, dtype=np.float64), self.t_min, self.t_max)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) of Table 1 at σ, float64."""
        sigma = sigma.to(torch.float64)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def network_time(self, t):
        return self.preconditioning(t)[3].float()

    def network_input(self, x, t):
        return shaped(self.preconditioning(t)[2], x) * x

    def network_output(self, output, x, t):
        c_skip, c_out, _, _ = self.preconditioning(t)
        return shaped(c_skip, x) * x + shaped(c_out, x) * output


class FlowProcess(NoiseProcess):
    """The linear interpolant x_t = (1 - t) x_0 + t ε (module doc)."""

    name = "flow"

    def __init__(self):
        self.t_min, self.t_max = EDMProcess.SIGMA_MIN / (1 + EDMProcess.SIGMA_MIN), 1.0

    def alpha_sigma(self, t):
        t = t.to(torch.float64)
        return 1 - t, t

    def alpha_sigma_derivatives(self, t):
        t = t.to(torch.float64)
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_sigma(self, sigma):
        with np.errstate(divide="ignore"):
            t = 1 / (1 + 1 / np.asarray(sigma, dtype=np.float64))  # σ/(1 + σ), 1 at σ = ∞
        return np.clip(t, self.t_min, self.t_max)

    def network_time(self, t):
        return (NETWORK_TIME_SCALE * t).float()


class ContinuousDiffusion:
    """A network trained on a continuous ``process`` to predict ``prediction``: per example,
    ``mse`` = mean |target - prediction|² and ``loss`` = w(t) ``mse`` (the weights from
    :mod:`~diffusion.process.weighting`, passed as ``mse_weight``). The variance is not
    learned (``fixed_small`` for ancestral steps) and the loss is ``mse``."""

    variance = Variance.FIXED_SMALL
    loss = Loss.MSE

    def __init__(self, process: NoiseProcess, prediction: str):
        self.process = process
        self.prediction = parse(Prediction, prediction, "prediction")

    def __getstate__(self) -> dict[str, Any]:
        return {"process": self.process, "prediction": self.prediction.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["process"], state["prediction"])

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict[str, Any] | None = None):
        """The network's prediction at the process's x_t (EDM's preconditioning applied)."""
        p = self.process
        output = model(p.network_input(x_t, t), p.network_time(t), **(model_kwargs or {}))
        if tuple(output.shape) != tuple(x_t.shape):
            raise ValueError(f"model output: got shape {tuple(output.shape)}; need {tuple(x_t.shape)}")
        return p.network_output(output, x_t, t)

    def training_losses(
        self, model, x0: torch.Tensor, t: torch.Tensor, *, model_kwargs=None, noise=None, mse_weight=None
    ) -> dict[str, torch.Tensor]:
        """Per-example ``mse`` (unweighted) and ``loss`` (times ``mse_weight`` [B] if given)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.process.q_sample(x0, t, noise).to(x0.dtype)
        prediction = self.predict(model, x_t, t, model_kwargs)
        target = self.process.target(self.prediction, x0, t, noise).to(x0.dtype)
        mse = mean_flat((target - prediction) ** 2)
        return {"mse": mse, "loss": mse if mse_weight is None else mse * mse_weight}
