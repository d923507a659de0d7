"""Step schedules fitted to a model: where a few-step solver's steps should go.

A solver's error at 5 to 10 network evaluations is mostly where its steps go (Sabour et al.
2024, "Align Your Steps"; the optimal-stepsize methods). :func:`fit_timesteps` fits the n - 1
times after the first of a :class:`~diffusion.sampling.steps.Steps` to one solver, one step
count and one model by minimising, on a calibration batch of fixed x_T, the mean Euclidean
distance between the n-step solution and a reference (a many-step solution of the same ODE,
or the exact one where it is known):

    min over σ_1 > ... > σ_{n-1} >= σ_min of  E_{x_T} ‖solve_σ(x_T) - x_ref(x_T)‖₂,

σ_0 fixed (x_T is a draw at t_max). The levels are written in u = log σ (EDM's σ, so a fit
reads the same on every process) as fractions of the way left to σ_min,
u_i = u_{i-1} + w_i (log σ_min - u_{i-1}), w in (0, 1]^(n-1), so that every w is a decreasing
schedule, and w is found by Powell's method (scipy's, bounded): derivative-free, it needs
only solves. The fit keeps the best schedule it saw and never returns one worse on the
calibration batch than the schedule it starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.sampling.steps import Steps, steps_at

SMALLEST_FRACTION = 1e-4
"""The smallest w_i: two levels closer than this share of the way left are one."""


class _Spent(Exception):
    """``max_solves`` reached (Powell's maxfev is checked between its line searches only)."""


@dataclass(frozen=True)
class FittedSchedule:
    """The fit's result, and what it cost."""

    steps: Steps
    """The fitted schedule (its first time the start's)."""
    start_distance: float
    """The start schedule's mean distance from the reference on the calibration batch."""
    distance: float
    """The fitted schedule's (at most ``start_distance``)."""
    solves: int
    """n-step solves of the calibration batch the fit ran (the start's included)."""


def mean_distance(x: torch.Tensor, reference: torch.Tensor) -> float:
    """E ‖x - x_ref‖₂ over the batch (each row flattened), in float64."""
    return float((x.double() - reference.double()).flatten(1).norm(dim=1).mean())


def fit_timesteps(
    solve: Callable[[Steps], torch.Tensor],
    reference: torch.Tensor,
    start: Steps,
    *,
    max_solves: int = 200,
) -> FittedSchedule:
    """Fit ``start``'s times after the first (module doc): ``solve(steps)`` is the solver's
    answer on the calibration batch, ``reference`` the answer it should give; at most
    ``max_solves`` solves."""
    from scipy.optimize import minimize

    process = start.process
    sigma_min, sigma_max = process.sigma_range()
    low = math.log(sigma_min)
    with np.errstate(divide="ignore"):
        u = 0.5 * (np.log1p(-start.alpha_bar[:-1]) - np.log(start.alpha_bar[:-1]))
    u[0] = min(u[0], math.log(sigma_max))  # σ_0 = ∞ where α reaches 0 (flow): the largest finite level
    if len(u) > 1 and u[-1] < low - 1e-9:
        raise ValueError(f"schedule: its last level σ = {math.exp(u[-1]):.3g} is below the process's σ_min {sigma_min:.3g}")

    def schedule(w: np.ndarray) -> Steps:
        levels = [u[0]]
        for fraction in np.clip(w, SMALLEST_FRACTION, 1):
            levels.append(levels[-1] + fraction * (low - levels[-1]))
        return steps_at(process, np.concatenate([start.timesteps[:1], process.t_of_sigma(np.exp(levels[1:]))]))

    best: dict[str, object] = {"distance": math.inf, "steps": start}
    solves = 0

    def distance(w: np.ndarray) -> float:
        nonlocal solves
        if solves >= max_solves:
            raise _Spent
        try:
            steps = schedule(w)
        except ValueError:  # two levels merged: not a schedule
            return math.inf
        solves += 1
        value = mean_distance(solve(steps), reference)
        if not math.isfinite(value):  # the solver diverged on these levels
            return math.inf
        if value < best["distance"]:
            best.update(distance=value, steps=steps)
        return value

    start_distance = mean_distance(solve(start), reference)
    solves += 1
    w0 = np.clip([(u[i] - u[i - 1]) / (low - u[i - 1]) for i in range(1, len(u))], SMALLEST_FRACTION, 1)
    try:
        if len(w0):
            minimize(distance, w0, method="Powell", bounds=[(SMALLEST_FRACTION, 1)] * len(w0),
                     options={"maxfev": max_solves, "xtol": 1e-2, "ftol": 1e-6})
    except _Spent:
        pass
    if best["distance"] >= start_distance:
        return FittedSchedule(start, start_distance, start_distance, solves)
    return FittedSchedule(best["steps"], start_distance, best["distance"], solves)
