"""The discrete DDPM chain as a :class:`~diffusion.process.base.NoiseProcess`, readable at any real t.

The chain (:class:`~diffusion.process.gaussian.GaussianDiffusion`) defines ᾱ at its model
timesteps only; between them log σ, σ = √((1-ᾱ)/ᾱ) (EDM's σ of the same process), is
interpolated linearly, as k-diffusion's ``DiscreteSchedule``, so schedules that place
levels between integer timesteps (log-SNR, Karras) give the network a real-valued t.
The network's time input is the model timestep itself; α = √ᾱ and σ = √(1-ᾱ).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffusion.process.base import NoiseProcess
from diffusion.process.schedules import space_timesteps


class DiscreteChain(NoiseProcess):
    """ᾱ of a trained chain at its model timesteps 0..T-1. Its float64 table becomes tensors
    once per device (:meth:`alpha_bar_tensor` reads them there: an index and a cast, never a
    host copy)."""

    name = "ddpm"
    variance_preserving = True

    def __init__(self, alphas_cumprod: Sequence[float]):
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.timesteps = np.arange(len(self.alphas_cumprod), dtype=np.float64)
        with np.errstate(divide="ignore"):
            self.log_sigmas = 0.5 * (np.log1p(-self.alphas_cumprod) - np.log(self.alphas_cumprod))
        self.t_min, self.t_max = float(self.timesteps[0]), float(self.timesteps[-1])
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_tables:
            self._device_tables[device] = tuple(
                torch.from_numpy(a).to(device) for a in (self.timesteps, self.alphas_cumprod, self.log_sigmas)
            )
        return self._device_tables[device]

    def __getstate__(self):
        return {"alphas_cumprod": self.alphas_cumprod}

    def __setstate__(self, state):
        self.__init__(state["alphas_cumprod"])

    def alpha_bar_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) in float64 on t's device: exact on a timestep, 1/(1 + σ²) with log σ
        interpolated between."""
        timesteps, alphas_cumprod, log_sigmas = self._tables(t.device)
        t = t.to(torch.float64)
        low = (torch.searchsorted(timesteps, t, right=True) - 1).clamp(0, len(timesteps) - 2)
        w = ((t - timesteps[low]) / (timesteps[low + 1] - timesteps[low])).clamp(0, 1)
        between = torch.sigmoid(-2 * ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]))  # 1/(1 + σ²)
        return torch.where(w == 0, alphas_cumprod[low], torch.where(w == 1, alphas_cumprod[low + 1], between))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar_tensor(t)
        return ab.sqrt(), (1 - ab).sqrt()

    def alpha_bar(self, t: np.ndarray | float) -> np.ndarray:
        """ᾱ(t) on the host (float64 numpy), as :meth:`alpha_bar_tensor`."""
        t = np.asarray(t, dtype=np.float64)
        on_grid = np.interp(t, self.timesteps, np.arange(self.num_timesteps))
        low = np.floor(on_grid).astype(int)
        high = np.minimum(low + 1, self.num_timesteps - 1)
        w = on_grid - low
        exact = np.where(w == 0, self.alphas_cumprod[low], self.alphas_cumprod[high])
        with np.errstate(invalid="ignore"):
            log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        between = 1.0 / (1.0 + np.exp(2 * log_sigma))
        return np.where((w == 0) | (w == 1), exact, between)

    def t_of_sigma(self, sigma: np.ndarray | float) -> np.ndarray:
        """The model timestep of EDM's σ: the inverse of :meth:`alpha_bar`'s interpolation (σ
        beyond the table is clamped to its ends)."""
        finite = np.isfinite(self.log_sigmas)
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        return np.interp(log_sigma, self.log_sigmas[finite], self.timesteps[finite])

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): σ at the first and last timesteps (the last finite one under zero terminal SNR)."""
        finite = self.log_sigmas[np.isfinite(self.log_sigmas)]
        return float(np.exp(finite[0])), float(np.exp(finite[-1]))

    def time_tensor(self, t: float, batch: int, device: torch.device) -> torch.Tensor:
        """A long tensor on an integer timestep (what the network was trained on), float32 between."""
        if float(t).is_integer():
            return torch.full((batch,), int(t), dtype=torch.long, device=device)
        return torch.full((batch,), float(t), dtype=torch.float32, device=device)

    def linspace_times(self, steps) -> np.ndarray:
        """The kept timesteps of :func:`~diffusion.process.schedules.space_timesteps` (any of
        its specs: n evenly spaced, 0 and T-1 included; ``"ddimN"``; ``"a,b,c"``), decreasing."""
        return self.timesteps[space_timesteps(self.num_timesteps, steps)][::-1]

    def alpha_sigma_derivatives(self, t):
        raise ValueError("process 'ddpm' is a discrete chain with no time derivative; use process vp, edm or flow")

