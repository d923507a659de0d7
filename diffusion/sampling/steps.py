"""The step schedules samplers walk, by name: each reads the process (numpy only).

A step schedule (:data:`STEP_SCHEDULES`) turns a number of steps into :class:`Steps`: n
times t_0 > ... > t_{n-1} of the process (:class:`~diffusion.process.base.NoiseProcess`)
where the network is evaluated, and n + 1 values ᾱ, the last 1 (clean data, t = 0):
step i goes from ᾱ[i] to ᾱ[i+1]. Every schedule starts at the process's t_max (but the
discrete chain's single linspace step: ``space_timesteps(T, 1)`` is [0]); they differ in
where the rest go:

* ``linspace``: on the discrete chain, today's respacing (improved DDPM's
  ``space_timesteps``: n evenly spaced integer timesteps, 0 and T-1 included; also any of
  its specs such as ``"ddim25"``); on a continuous process, t_max (1 - i/n), the last step
  landing on t = 0 (rectified flow's Euler grid);
* ``trailing``: diffusers' ``timestep_spacing="trailing"``, round(T - k T/n) - 1 (Lin et
  al. 2024, Table 2): the last evaluation at T/n - 1, not 0; on a continuous process the
  same grid as linspace;
* ``log-snr``: uniform in λ = log(α/σ) from σ_max to σ_min (DPM-Solver's ``logSNR`` skip type);
* ``karras``: EDM eq. 5, σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7.

log-snr and karras are written in EDM's σ = e^{-λ}, so they place the same levels on every
process with the same σ range. ``fitted`` is none of these formulas: its times were fitted to
one model, solver and step count (:mod:`diffusion.sampling.fitted`) and come with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffusion.process.base import NoiseProcess
from diffusion.process.discrete import DiscreteChain
from diffusion.sampling.specs import FITTED, SCHEDULE_NAMES, STEP_SCHEDULE_NAMES

KARRAS_RHO = 7.0
"""ρ of EDM eq. 5 (Karras et al. 2022, Table 1)."""


@dataclass(frozen=True)
class Steps:
    """Where a sampler evaluates the network and which noise levels it walks."""

    timesteps: np.ndarray
    """n times of the process, decreasing: the network is evaluated at t_i on step i."""
    alpha_bar: np.ndarray
    """n + 1 values of ᾱ, ᾱ[i] at timesteps[i] and the last 1: step i goes from ᾱ[i] to ᾱ[i + 1]."""
    process: NoiseProcess
    """The process, for samplers that leave the schedule (EDM's churn) or step in its own time (Euler, the SDE)."""

    def __len__(self) -> int:
        return len(self.timesteps)


def steps_at(process: NoiseProcess, timesteps: np.ndarray) -> Steps:
    """The :class:`Steps` of ``timesteps`` of ``process``: n strictly decreasing times (a
    fitted schedule, :mod:`diffusion.sampling.fitted`)."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if timesteps.ndim != 1 or len(timesteps) == 0 or np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"steps: the schedule gives no strictly decreasing timesteps ({timesteps.tolist()})")
    return Steps(timesteps, np.append(process.alpha_bar(timesteps), 1.0), process)


def _count(steps: int | str | Sequence[int], name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps: the {name!r} schedule takes a number of steps >= 1; got {steps!r}")
    return int(steps)


def linspace_steps(process: NoiseProcess, steps: int | str | Sequence[int]) -> Steps:
    """The process's :meth:`~diffusion.process.base.NoiseProcess.linspace_times` (on the discrete
    chain any spec of :func:`~diffusion.process.schedules.space_timesteps`)."""
    if not isinstance(process, DiscreteChain):
        steps = _count(steps, "linspace")
    return steps_at(process, process.linspace_times(steps))


def trailing_steps(process: NoiseProcess, steps: int | str | Sequence[int]) -> Steps:
    """diffusers' trailing spacing: indices round(T - k T/n) - 1, k = 0..n-1 (a continuous
    process: its linspace grid)."""
    n = _count(steps, "trailing")
    if not isinstance(process, DiscreteChain):
        return steps_at(process, process.linspace_times(n))
    T = process.num_timesteps
    if n > T:
        raise ValueError(f"steps: {n} is more than the {T} timesteps of the process")
    indices = np.round(np.arange(T, 0, -T / n)[:n]).astype(int) - 1
    return steps_at(process, process.timesteps[indices])


def log_snr_steps(process: NoiseProcess, steps: int | str | Sequence[int]) -> Steps:
    """n levels uniform in log σ (λ = -log σ: DPM-Solver's logSNR spacing), σ_max to σ_min."""
    n = _count(steps, "log-snr")
    sigma_min, sigma_max = process.sigma_range()
    return steps_at(process, process.t_of_sigma(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))))


def karras_steps(process: NoiseProcess, steps: int | str | Sequence[int]) -> Steps:
    """EDM eq. 5 with ρ = 7 between σ_max and σ_min (a single step: σ_max)."""
    n = _count(steps, "karras")
    sigma_min, sigma_max = process.sigma_range()
    ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    sigmas = (sigma_max ** (1 / KARRAS_RHO) + ramp * (sigma_min ** (1 / KARRAS_RHO) - sigma_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    return steps_at(process, process.t_of_sigma(sigmas))


STEP_SCHEDULES: dict[str, Callable[[NoiseProcess, int | str | Sequence[int]], Steps]] = dict(
    zip(STEP_SCHEDULE_NAMES, (linspace_steps, trailing_steps, log_snr_steps, karras_steps), strict=True)
)


def fitted_steps(process: NoiseProcess, steps: int | str | Sequence[int], timesteps: Sequence[float] | None) -> Steps:
    """The :class:`Steps` of a fitted schedule's ``timesteps`` (:mod:`diffusion.sampling.fitted`):
    ``steps`` of them, decreasing, within the process's [t_min, t_max]."""
    n = _count(steps, FITTED)
    if timesteps is None:
        raise ValueError(
            "schedule: 'fitted' needs the fitted times (the fit_schedule stage's models/schedule.json, or a "
            "model whose sampling carries them); none given"
        )
    times = np.asarray(timesteps, dtype=np.float64)
    if len(times) != n:
        raise ValueError(f"schedule: the fitted schedule has {len(times)} steps, not {n}: fit it again for {n} steps")
    slack = 1e-9 * process.t_max
    if times[0] > process.t_max + slack or times[-1] < process.t_min - slack:
        raise ValueError(
            f"schedule: the fitted times run from {times[0]:g} to {times[-1]:g}; process {process.name!r} has them "
            f"from t_max {process.t_max:g} to t_min {process.t_min:g}: fit it again for this model"
        )
    return steps_at(process, times)


def make_steps(
    name: str, process: NoiseProcess, steps: int | str | Sequence[int], timesteps: Sequence[float] | None = None
) -> Steps:
    """The :class:`Steps` of the schedule ``name`` of :data:`STEP_SCHEDULES` on ``process``, or
    of ``timesteps`` for ``fitted`` (:func:`fitted_steps`)."""
    if name == FITTED:
        return fitted_steps(process, steps, timesteps)
    if name not in STEP_SCHEDULES:
        raise ValueError(f"schedule: got {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
    return STEP_SCHEDULES[name](process, steps)
