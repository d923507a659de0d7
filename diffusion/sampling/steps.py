"""Noise levels of a trained process and the step schedules samplers walk, by name (numpy only).

:class:`NoiseLevels` is the trained process's ᾱ at its model timesteps, read at any real
t: log σ, σ = √((1-ᾱ)/ᾱ) (EDM's σ of the same process), is interpolated linearly between
neighbouring timesteps, as k-diffusion's ``DiscreteSchedule``, so schedules that place
levels between integer timesteps (log-SNR, Karras) give the network a real-valued t.

A step schedule (:data:`STEP_SCHEDULES`) turns a number of steps into :class:`Steps`: n
model timesteps t_0 > ... > t_{n-1} where the network is evaluated, and n + 1 values ᾱ,
the last 1 (clean data): step i goes from ᾱ[i] to ᾱ[i+1]. Every schedule starts at the
process's last timestep (but linspace's single step: ``space_timesteps(T, 1)`` is [0]);
they differ in where the rest go:

* ``linspace``: today's respacing (improved DDPM's ``space_timesteps``: n evenly spaced
  integer timesteps, 0 and T-1 included; also any of its specs such as ``"ddim25"``);
* ``trailing``: diffusers' ``timestep_spacing="trailing"``, round(T - k T/n) - 1 (Lin et
  al. 2024, Table 2): the last evaluation at T/n - 1, not 0;
* ``log-snr``: uniform in λ = log(α/σ) from the last timestep to the first (DPM-Solver's
  ``logSNR`` skip type);
* ``karras``: EDM eq. 5, σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffusion.process.schedules import space_timesteps

KARRAS_RHO = 7.0
"""ρ of EDM eq. 5 (Karras et al. 2022, Table 1)."""


class NoiseLevels:
    """ᾱ of a trained process at its model timesteps ``timesteps`` (increasing; 0..T-1 unless
    the process was respaced), readable at any real t in their range."""

    def __init__(self, alphas_cumprod: Sequence[float], timesteps: Sequence[float] | None = None):
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.timesteps = np.arange(len(self.alphas_cumprod), dtype=np.float64) if timesteps is None else (
            np.asarray(timesteps, dtype=np.float64)
        )
        if self.timesteps.shape != self.alphas_cumprod.shape or np.any(np.diff(self.timesteps) <= 0):
            raise ValueError("timesteps: need one increasing model timestep per alpha_bar")
        with np.errstate(divide="ignore"):
            self.log_sigmas = 0.5 * (np.log1p(-self.alphas_cumprod) - np.log(self.alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: np.ndarray | float) -> np.ndarray:
        """ᾱ(t) = 1/(1 + σ(t)²) with log σ interpolated linearly between timesteps (exact on them)."""
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
        """The model timestep of EDM's noise level σ: the inverse of :meth:`alpha_bar`'s
        interpolation (σ beyond the table is clamped to its ends)."""
        finite = np.isfinite(self.log_sigmas)
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        return np.interp(log_sigma, self.log_sigmas[finite], self.timesteps[finite])

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): σ at the first and last timesteps (the last finite one under zero terminal SNR)."""
        finite = self.log_sigmas[np.isfinite(self.log_sigmas)]
        return float(np.exp(finite[0])), float(np.exp(finite[-1]))


@dataclass(frozen=True)
class Steps:
    """Where a sampler evaluates the network and which noise levels it walks."""

    timesteps: np.ndarray
    """n model timesteps, decreasing: the network is evaluated at t_i on step i."""
    alpha_bar: np.ndarray
    """n + 1 values of ᾱ, ᾱ[i] at timesteps[i] and the last 1: step i goes from ᾱ[i] to ᾱ[i + 1]."""
    levels: NoiseLevels
    """The process's levels, for samplers that leave the schedule (EDM's churn)."""

    def __len__(self) -> int:
        return len(self.timesteps)


def _steps(levels: NoiseLevels, timesteps: np.ndarray) -> Steps:
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if timesteps.ndim != 1 or len(timesteps) == 0 or np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"steps: the schedule gives no strictly decreasing timesteps ({timesteps.tolist()})")
    return Steps(timesteps, np.append(levels.alpha_bar(timesteps), 1.0), levels)


def _count(steps: int | str | Sequence[int], name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps: the {name!r} schedule takes a number of steps >= 1; got {steps!r}")
    return int(steps)


def linspace_steps(levels: NoiseLevels, steps: int | str | Sequence[int]) -> Steps:
    """The kept timesteps of :func:`~diffusion.process.schedules.space_timesteps` (any of its specs)."""
    kept = space_timesteps(levels.num_timesteps, steps)
    return _steps(levels, levels.timesteps[kept][::-1])


def trailing_steps(levels: NoiseLevels, steps: int | str | Sequence[int]) -> Steps:
    """diffusers' trailing spacing: indices round(T - k T/n) - 1, k = 0..n-1."""
    n, T = _count(steps, "trailing"), levels.num_timesteps
    if n > T:
        raise ValueError(f"steps: {n} is more than the {T} timesteps of the process")
    indices = np.round(np.arange(T, 0, -T / n)[:n]).astype(int) - 1
    return _steps(levels, levels.timesteps[indices])


def log_snr_steps(levels: NoiseLevels, steps: int | str | Sequence[int]) -> Steps:
    """n levels uniform in log σ (λ = -log σ: DPM-Solver's logSNR spacing), σ_max to σ_min."""
    n = _count(steps, "log-snr")
    sigma_min, sigma_max = levels.sigma_range()
    return _steps(levels, levels.t_of_sigma(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))))


def karras_steps(levels: NoiseLevels, steps: int | str | Sequence[int]) -> Steps:
    """EDM eq. 5 with ρ = 7 between σ_max and σ_min (a single step: σ_max)."""
    n = _count(steps, "karras")
    sigma_min, sigma_max = levels.sigma_range()
    ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    sigmas = (sigma_max ** (1 / KARRAS_RHO) + ramp * (sigma_min ** (1 / KARRAS_RHO) - sigma_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    return _steps(levels, levels.t_of_sigma(sigmas))


STEP_SCHEDULES: dict[str, Callable[[NoiseLevels, int | str | Sequence[int]], Steps]] = {
    "linspace": linspace_steps,
    "trailing": trailing_steps,
    "log-snr": log_snr_steps,
    "karras": karras_steps,
}


def make_steps(name: str, levels: NoiseLevels, steps: int | str | Sequence[int]) -> Steps:
    """The :class:`Steps` of the schedule ``name`` of :data:`STEP_SCHEDULES`."""
    if name not in STEP_SCHEDULES:
        raise ValueError(f"schedule: got {name!r}; allowed: {', '.join(STEP_SCHEDULES)}")
    return STEP_SCHEDULES[name](levels, steps)
