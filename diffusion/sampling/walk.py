"""What every sampler shares: the walk over a step schedule, the progress bar and the callback.

:func:`walk` yields, for step i of :class:`~diffusion.sampling.steps.Steps`, the model
timestep tensor for the batch and the step's ᾱ (from, to) as floats, so a sampler's
per-step coefficients are host scalars (no device copy) and its body is the paper's update.
The callback (if given) is called once per step, before the update, with dict(i, t, x,
pred_x0): the step number, the model timestep, x_t and the denoiser's x̂_0 (its first
evaluation of the step, for a solver that evaluates more than once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from diffusion.sampling.denoiser import Denoised
from diffusion.sampling.steps import Steps

Callback = Callable[[dict[str, Any]], None]


def walk(steps: Steps, x: torch.Tensor, progress: bool) -> Iterator[tuple[int, torch.Tensor, float, float]]:
    """(i, t [B], ᾱ_i, ᾱ_{i+1}) for each step, ᾱ_n = 1 after the last (t as the process's
    :meth:`~diffusion.process.base.NoiseProcess.time_tensor`)."""
    for i in tqdm(range(len(steps)), disable=not progress, desc="sampling"):
        t = steps.process.time_tensor(steps.timesteps[i], x.shape[0], x.device)
        yield i, t, float(steps.alpha_bar[i]), float(steps.alpha_bar[i + 1])


def report(callback: Callback | None, steps: Steps, i: int, x: torch.Tensor, out: Denoised) -> None:
    """The callback of step i (its model timestep an int when it is one)."""
    if callback is not None:
        t = float(steps.timesteps[i])
        callback({"i": i, "t": int(t) if t.is_integer() else t, "x": x, "pred_x0": out.x0})


def half_log_snr(alpha_bar: float) -> float:
    """λ = log(α/σ) = ½ log(ᾱ/(1-ᾱ)), DPM-Solver's time variable: -∞ at ᾱ = 0 (zero terminal
    SNR), +∞ at ᾱ = 1 (clean data)."""
    if alpha_bar <= 0:
        return -math.inf
    if alpha_bar >= 1:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def check_deterministic(eta: float, sampler: str) -> None:
    """ODE solvers take ``eta`` for the common signature only: anything but 0 is a mistake."""
    if eta != 0:
        raise ValueError(f"eta: got {eta!r}; {sampler} solves the probability-flow ODE (eta applies to ddpm and ddim)")
