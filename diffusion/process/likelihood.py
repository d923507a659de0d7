"""The exact log-likelihood of a continuous process's probability-flow ODE, and bits/dim.

The probability-flow ODE dx/dt = v(x, t) = α' x̂_0 + σ' ε̂ (:meth:`~diffusion.process.base.
NoiseProcess.ode_velocity`, x̂_0 and ε̂ from the network by :meth:`~diffusion.process.base.
NoiseProcess.x0_eps`) carries p_{t_min} to p_{t_max} through a deterministic map, so by the
instantaneous change of variables (Chen et al. 2018, Theorem 1; Song et al. 2021, "Score-Based
Generative Modeling through SDEs", appendix D.2, eq. 39)

    log p_{t_min}(x(t_min)) = log p_T(x(T)) + ∫_{t_min}^{T} ∇·v(x(t), t) dt,

integrated forward from the data, x(t_min) = x_0, together with x (one system, solved by
``scipy.integrate.solve_ivp``; RK45 with rtol = atol = 1e-5 by default, as score-SDE's
``likelihood.py``). The divergence is the exact trace of ∂v/∂x (one backward pass per
dimension: for low dimension) or Hutchinson's estimate εᵀ(∂v/∂x)ε with one probe ε per
integration (Rademacher or Gaussian, E[εεᵀ] = I; Grathwohl et al. 2019, "FFJORD", eq. 7),
which leaves the estimate of log p unbiased.

The prior p_T is the Gaussian with the moments of the process's marginal at T for data of
mean 0 and per-dimension variance σ_d² (the process's ``sigma_data``):

    p_T = N(0, (α(T)² σ_d² + σ(T)²) I).

It is exact for flow (α(1) = 0: N(0, I)) and tends to score-SDE's priors where α(T) is
small: its VP SDE's N(0, I) (α(1)² ≈ 4e-5 for the linear schedule) and its VE SDE's
N(0, σ_max² I) for EDM (80² + 0.25 against 80²).

Bits/dim of uint8 images (:func:`ode_bpd`): the network sees y = k/127.5 - 1
(:func:`~diffusion.training.loop.to_model_range`), a grid of spacing Δ = 1/127.5. Uniform
dequantization y = (k + u - ½)/127.5 - 1, u ~ U[0, 1)^D, puts the bins [y_k - Δ/2, y_k + Δ/2]
around the training points, the bins of DDPM's discretized decoder (Ho et al. 2020, eq. 13),
and by Jensen's inequality (Theis et al. 2016; Ho et al. 2019, "Flow++", eq. 3)

    log P(k) = log ∫_bin p(y) dy ≥ E_u[log p(y)] + D log Δ,

so bpd = -log p(y)/(D ln 2) + log₂ 127.5 (≈ 6.994) bounds the discrete model's bits/dim
from above. Score-SDE adds 7 = log₂(256/2): its data are (k + u)/256 scaled to [-1, 1].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffusion.process.continuous import ContinuousDiffusion

BIN_WIDTH = 1 / 127.5
"""The spacing of uint8 images in the network's range (k/127.5 - 1)."""

BPD_OFFSET = math.log2(127.5)
"""-log₂ of the dequantization bin's width, added per dimension to -log p/(D ln 2) (module doc)."""


def _rademacher(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


def _gaussian(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


PROBES = {"rademacher": _rademacher, "gaussian": _gaussian}
"""Hutchinson's probe distributions by name, E[εεᵀ] = I (FFJORD, §2.2)."""


def prior_log_prob(diffusion: ContinuousDiffusion, x_t: torch.Tensor) -> torch.Tensor:
    """log N(x_T; 0, (α(T)² σ_d² + σ(T)²) I) per example [B], float64 (module doc)."""
    p = diffusion.process
    alpha, sigma = p.alpha_sigma(torch.tensor(p.t_max, dtype=torch.float64))
    var = float(alpha**2 * p.sigma_data**2 + sigma**2)
    x = x_t.reshape(len(x_t), -1).to(torch.float64)
    return -0.5 * (x.shape[1] * math.log(2 * math.pi * var) + (x**2).sum(1) / var)


def _divergence_exact(v: torch.Tensor, x: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    """tr(∂v/∂x) per example: Σ_i ∂v_i/∂x_i, one backward pass per dimension."""
    flat_v = v.reshape(len(v), -1)
    div = torch.zeros(len(v), dtype=v.dtype, device=v.device)
    for i in range(flat_v.shape[1]):
        (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True)
        div = div + grad.reshape(len(v), -1)[:, i]
    return div


def _divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """εᵀ(∂v/∂x)ε per example (FFJORD, eq. 7): one vector-Jacobian product."""
    (grad,) = torch.autograd.grad((v * probe).sum(), x)
    return (grad * probe).reshape(len(v), -1).sum(1)


def ode_log_likelihood(
    model,
    diffusion: ContinuousDiffusion,
    x0: torch.Tensor,
    *,
    exact_trace: bool = False,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, int]:
    """(log p(x0) [B] in nats, float64; the number of network evaluations) under the
    probability-flow ODE of ``diffusion`` (module doc, eq. 39 of Song et al. 2021).

    ``x0`` is in the network's range and dtype (the network is called in it); the ODE runs
    from ``t_min`` (None: the process's) to its t_max with x(t_min) = ``x0``, so log p is that of
    the marginal p_{t_min} (the data blurred by σ(t_min): score-SDE's ε). ``exact_trace``: the divergence as the
    trace of the Jacobian (D backward passes per evaluation), else Hutchinson's estimate with
    one ``probe`` ("rademacher" or "gaussian") drawn from ``generator`` for the whole
    integration. The model's train/eval mode is left as it is.
    """
    from scipy.integrate import solve_ivp  # scipy only here: ``import diffusion`` loads torch alone

    process = diffusion.process
    shape, batch, device, dtype = x0.shape, x0.shape[0], x0.device, x0.dtype
    size = x0.numel()
    divergence = _divergence_exact if exact_trace else _divergence_hutchinson
    if probe not in PROBES:
        raise ValueError(f"probe: got {probe!r}; allowed: {', '.join(map(repr, PROBES))}")
    noise = None if exact_trace else PROBES[probe](x0, generator)
    evaluations = 0

    def field(t: float, state: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        x = torch.from_numpy(state[:size].copy()).to(device=device, dtype=dtype).reshape(shape)
        time = process.time_tensor(t, batch, device)
        with torch.enable_grad():
            x.requires_grad_(True)
            output = diffusion.predict(model, x, time, model_kwargs)
            x0_hat, eps_hat = process.x0_eps(diffusion.prediction, output, x, time)
            v = process.ode_velocity(x0_hat, eps_hat, time)
            div = divergence(v, x, noise)
        return np.concatenate([v.detach().reshape(-1).double().cpu().numpy(), div.detach().double().cpu().numpy()])

    start = np.concatenate([x0.detach().reshape(-1).double().cpu().numpy(), np.zeros(batch)])
    t0 = process.t_min if t_min is None else float(t_min)
    solution = solve_ivp(field, (t0, process.t_max), start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1].copy())
    x_t = end[:size].reshape(shape)
    return prior_log_prob(diffusion, x_t) + end[size:], evaluations


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images as y = (k + u - ½)/127.5 - 1, u ~ U[0, 1) from ``generator``, float32 (module doc)."""
    u = torch.rand(images.shape, generator=generator, device=images.device)
    return (images.float() + u - 0.5) * BIN_WIDTH - 1.0


def ode_bpd(
    model,
    diffusion: ContinuousDiffusion,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> tuple[torch.Tensor, int]:
    """(bits/dim [B] of uint8 ``images``, float64; the network evaluations): -log p(y)/(D ln 2)
    + log₂ 127.5 of the dequantized y (:func:`dequantize`, module doc), log p by
    :func:`ode_log_likelihood` (``options`` passed on), the dequantization noise and then
    the probe drawn from ``generator``."""
    y = dequantize(images, generator)
    log_p, evaluations = ode_log_likelihood(model, diffusion, y, generator=generator, **options)
    dims = images[0].numel()
    return -log_p / (dims * math.log(2)) + BPD_OFFSET, evaluations
