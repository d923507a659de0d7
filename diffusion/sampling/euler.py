"""Samplers in the process's own time: Euler on the probability-flow ODE, Euler–Maruyama on the reverse SDE.

Both step between the times of :class:`~diffusion.sampling.steps.Steps` on the process's own
x_t = α x_0 + σ ε (the sampler's variance-preserving x times √(α² + σ²)), with the
drifts of :mod:`diffusion.process.base`, so they need a continuous process (the discrete
chain has no time derivative). From t to t' < t, h = t' - t:

* :func:`euler_sample`, rectified flow's sampler (Liu et al. 2023, §2.2; SiT's ODE sampler
  at first order): x' = x + h (α' x̂_0 + σ' ε̂). On the linear path this is DDIM's step,
  x' = (1 - t') x̂_0 + t' ε̂. Its last step (to t = 0) returns x̂_0, the end of the ODE's
  path: on the linear path and EDM's that is Euler's step itself, but where σ(t) ~ √t near 0
  (the VP processes) σ' is infinite at t = 0 and an Euler step there would leave noise
  σ(t_min) - t_min σ'(t_min) ≈ σ_min/2 in the sample, an error no number of steps removes.
* :func:`sde_sample`, Euler–Maruyama on the reverse SDE (Song et al. 2021, eq. 6 and the
  "Euler–Maruyama" predictor of their §4.2; SiT's SDE sampler):
  x' = x + h (f x + g² ε̂/σ) + g √(-h) z, z ~ N(0, I), with f = α'/α, g² = 2σσ' - 2fσ².
  As score-SDE's sampler with noise removal, the last evaluation returns x̂_0 (Tweedie's
  denoised estimate) instead of a step with noise; a step from α = 0 (where f is infinite,
  the flow at t = 1) is DDIM's, x' = α' x̂_0 + σ' ε̂ at t'.
"""

from __future__ import annotations

import torch

from diffusion.process.base import shaped
from diffusion.sampling.denoiser import Denoiser
from diffusion.sampling.noise import NoiseSource, randn
from diffusion.sampling.steps import Steps
from diffusion.sampling.walk import Callback, check_deterministic, report, walk


def _next_time(steps: Steps, i: int, like: torch.Tensor) -> torch.Tensor:
    """t_{i+1} for the batch (both samplers return x̂_0 at the last evaluation, so i + 1 < n)."""
    return steps.process.time_tensor(float(steps.timesteps[i + 1]), like.shape[0], like.device)


def euler_sample(
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
    """Euler's method on dx/dt = α' x̂_0 + σ' ε̂ in the process's time (module doc)."""
    check_deterministic(eta, "euler")
    process = steps.process
    for i, t, _, _ in walk(steps, x, progress):
        out = denoiser(x, t, y)
        report(callback, steps, i, x, out)
        if i == len(steps) - 1:  # to t = 0: the ODE's end is x̂_0 (module doc)
            return out.x0
        t_next = _next_time(steps, i, x)
        x_own = shaped(process.scale(t), x) * x
        h = shaped(t_next.to(torch.float64) - t.to(torch.float64), x)
        x = (x_own + h * process.ode_velocity(out.x0, out.eps, t)) / shaped(process.scale(t_next), x)
    return x


def sde_sample(
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
    """Euler–Maruyama on the reverse SDE in the process's time, x̂_0 at the last evaluation (module doc)."""
    check_deterministic(eta, "sde")
    process = steps.process
    for i, t, ab, ab_next in walk(steps, x, progress):
        out = denoiser(x, t, y)
        report(callback, steps, i, x, out)
        if i == len(steps) - 1:
            return out.x0
        if ab == 0:  # α = 0: DDIM's step (f is infinite there)
            x = ab_next**0.5 * out.x0 + (1 - ab_next) ** 0.5 * out.eps
            continue
        t_next = _next_time(steps, i, x)
        _, sigma = process.alpha_sigma(t)
        f, g2 = process.sde_coefficients(t)
        h = t_next.to(torch.float64) - t.to(torch.float64)
        x_own = shaped(process.scale(t), x) * x
        drift = shaped(f, x) * x_own + shaped(g2 / sigma, x) * out.eps
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x_own = x_own + shaped(h, x) * drift + shaped((g2 * -h).sqrt(), x) * noise
        x = x_own / shaped(process.scale(t_next), x)
    return x
