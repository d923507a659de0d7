"""Gaussian mixtures whose denoiser is exact and not linear: the few-step solvers' test problems.

Data x_0 ~ Σ_k π_k N(μ_k, s_k² I) in D dimensions. In the samplers' variance-preserving view
x = √ᾱ x_0 + √(1-ᾱ) ε (a = √ᾱ, b² = 1 - ᾱ, v_k = a² s_k² + b²), x | k ~ N(a μ_k, v_k I), so

    E[x_0 | x, k] = μ_k + a s_k²/v_k (x - a μ_k)
    p(k | x)      = softmax_k(log π_k - D/2 log v_k - ‖x - a μ_k‖²/(2 v_k))
    E[x_0 | x]    = Σ_k p(k | x) E[x_0 | x, k],

a denoiser that is not affine in x (on one Gaussian it is, and the probability-flow ODE map
with it: every solver's error is then an affine coefficient, errors cancel, and a step
schedule can look good by luck). :func:`exact_ode_solution` is the ODE's answer in λ = log(α/σ),
dx/dλ = α (x̂_0 - α x), integrated by scipy's DOP853 to rtol 1e-11 from the start's λ to
λ = 20 (σ = 2e-9, where x̂_0 = x to 1e-17) and denoised there: independent of every sampler.

:data:`MIXTURES` are the problems the tests and ``benchmarks/bench_few_step.py`` share:
different dimensions, numbers of components, widths and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffusion.process.base import NoiseProcess
from diffusion.sampling.denoiser import Denoised, alpha_bar_at

END_LAMBDA = 20.0


@dataclass(frozen=True)
class GaussianMixture:
    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def x0(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x] at ᾱ (``alpha_bar`` [B] or a scalar), float64, x [B, D]."""
        mu = torch.tensor(self.means, dtype=torch.float64)  # [K, D]
        s2 = torch.tensor(self.stds, dtype=torch.float64) ** 2  # [K]
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1)  # [B or 1, 1]
        a, v = ab.sqrt(), ab * s2 + (1 - ab)  # [B, K]
        diff = x.double()[:, None, :] - a[..., None] * mu  # [B, K, D]
        log_joint = torch.tensor(self.weights, dtype=torch.float64).log() - 0.5 * self.dim * v.log() - (diff**2).sum(-1) / (2 * v)
        component = mu + (a * s2 / v)[..., None] * diff
        return (torch.softmax(log_joint, dim=1)[..., None] * component).sum(1)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` draws of x_0, float64."""
        k = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), count, replacement=True, generator=generator)
        noise = torch.randn((count, self.dim), generator=generator, dtype=torch.float64)
        return torch.tensor(self.means, dtype=torch.float64)[k] + torch.tensor(self.stds, dtype=torch.float64)[k, None] * noise


class MixtureDenoiser:
    """``mixture``'s exact denoiser on ``process``, as a :class:`~diffusion.sampling.denoiser.Denoiser`
    of x [B, D]; it counts the network evaluations (per image) in ``evaluations``."""

    def __init__(self, process: NoiseProcess, mixture: GaussianMixture):
        self.process, self.mixture, self.evaluations = process, mixture, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        self.evaluations += 1
        ab = alpha_bar_at(self.process, t, x)
        x0 = self.mixture.x0(x, ab.reshape(-1))
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        return Denoised(x0.to(x.dtype), eps.to(x.dtype))


def exact_ode_solution(mixture: GaussianMixture, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Where the probability-flow ODE takes x (the variance-preserving view at ᾱ = ``alpha_bar``)
    at σ = 0 (module doc), float64."""
    lam = 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        a = math.sqrt(1 / (1 + math.exp(-2 * lam)))
        xt = torch.from_numpy(y).reshape(x.shape)
        return (a * (mixture.x0(xt, a * a) - a * xt)).reshape(-1).numpy()

    solution = solve_ivp(rhs, (lam, END_LAMBDA), x.double().reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-12)
    assert solution.success, solution.message
    end = torch.from_numpy(solution.y[:, -1]).reshape(x.shape)
    return mixture.x0(end, 1 / (1 + math.exp(-2 * END_LAMBDA)))


MIXTURES = {
    # two dimensions, three components of unequal widths and weights (the problem)
    "2d-3": GaussianMixture((0.5, 0.3, 0.2), ((-1.0, 0.0), (1.0, 0.5), (0.2, -1.2)), (0.1, 0.3, 0.05)),
    # eight dimensions, five components, widths over a decade
    "8d-5": GaussianMixture(
        (0.3, 0.25, 0.2, 0.15, 0.1),
        tuple(tuple(float(v) for v in row) for row in np.random.default_rng(8).uniform(-1, 1, (5, 8)).round(2)),
        (0.05, 0.1, 0.2, 0.3, 0.5),
    ),
    # 64 dimensions (an 8 x 8 image), ten narrow components: data far from Gaussian
    "64d-10": GaussianMixture(
        tuple([0.1] * 10),
        tuple(tuple(float(v) for v in row) for row in np.random.default_rng(64).choice([-0.8, 0.8], (10, 64))),
        tuple(float(v) for v in np.linspace(0.02, 0.2, 10).round(3)),
    ),
}
