"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC) in data prediction.

Both work in DPM-Solver++'s λ = log(α/σ) (:mod:`~diffusion.sampling.dpm_solver`) on the
same exact solution x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x̂_0 dλ, with the paper's B(h) = e^h - 1
variant (``bh2``), taken at hh = -h for data prediction. From s = t_i to t = t_{i+1}, with the
model values m_k of the last evaluations at λ_{s_k}, r_k = (λ_{s_k} - λ_s)/h and
D_k = (m_k - m_0)/r_k:

    x_t = (σ_t/σ_s) x_s - α_t (e^{hh} - 1) m_0 - α_t B(h) Σ_k ρ_k D_k,

where ρ solves R ρ = g/B(h), R_{jk} = r_k^(j-1) (r = 1 last) and g_j = j! hh φ_{j+1}(hh)
(φ_{k+1} = (φ_k - 1/k!)/hh, φ_1 = (e^{hh} - 1)/hh): UniP-p uses the p - 1 past values
(p = 2: ρ = 1/2, the authors' simplification); UniC-p, once m at x_t is known, adds it as
D = m_t - m_0 and solves the full system (p = 1: ρ = 1/2), raising the order to p + 1 at no
extra evaluation: the next step's predictor starts from the corrected x_t with the m
evaluated before the correction. As diffusers' ``UniPCMultistepScheduler``: warm-up orders
on the first steps, order min(p, n - i) on the last ones (the last step returns x̂_0), no
correction after the last evaluation. Under zero terminal SNR the step from ᾱ = 0 (h = ∞)
is DDIM's and the history (and the corrector) start after it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusion.sampling.denoiser import Denoiser
from diffusion.sampling.dpm_solver import step_order
from diffusion.sampling.noise import NoiseSource
from diffusion.sampling.steps import Steps
from diffusion.sampling.walk import Callback, check_deterministic, half_log_snr, report, walk


def _rhos(rks: list[float], h: float, corrector: bool) -> list[float]:
    """ρ of UniP (one per past value r_k) or UniC (one more, for m_t), B(h) = e^h - 1."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    rs = [*rks, 1.0]
    p = len(rs)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    R, g = [], []
    for k in range(1, p + 1):
        R.append([r ** (k - 1) for r in rs])
        g.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        return [0.5] if p == 1 else np.linalg.solve(np.array(R), np.array(g)).tolist()
    if p <= 2:
        return [0.5] * (p - 1)
    return np.linalg.solve(np.array(R)[:-1, :-1], np.array(g)[:-1]).tolist()


def _update(
    x: torch.Tensor, ab_s: float, ab_t: float, lambdas: list[float], ms: list[torch.Tensor],
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP from λ_s = lambdas[-1] (the past values before it), or UniC with m_t given."""
    h = half_log_snr(ab_t) - lambdas[-1]
    alpha_t, h_phi_1 = math.sqrt(ab_t), math.expm1(-h)
    x_t = math.sqrt((1 - ab_t) / (1 - ab_s)) * x - alpha_t * h_phi_1 * ms[-1]
    rks = [(lam - lambdas[-1]) / h for lam in reversed(lambdas[:-1])]
    diffs = [(m - ms[-1]) / r for m, r in zip(reversed(ms[:-1]), rks, strict=True)]
    if m_t is not None:
        diffs.append(m_t - ms[-1])
    rhos = _rhos(rks, h, corrector=m_t is not None)
    for rho, d in zip(rhos, diffs, strict=True):
        x_t = x_t - alpha_t * h_phi_1 * rho * d  # B(h) = e^{hh} - 1 = h φ_1
    return x_t


def _unipc(
    order: int, denoiser: Denoiser, x: torch.Tensor, steps: Steps, y, callback: Callback | None, progress: bool
) -> torch.Tensor:
    lambdas: list[float] = []
    ms: list[torch.Tensor] = []
    last = None  # (x_s, ᾱ_s, order) of the previous predictor, for the corrector
    for i, t, ab, ab_next in walk(steps, x, progress):
        out = denoiser(x, t, y)
        if last is not None and steps.alpha_bar[i - 1] > 0:
            x_s, ab_s, p_prev = last
            x = _update(x_s, ab_s, ab, lambdas[-p_prev:], ms[-p_prev:], m_t=out.x0)  # UniC-p_prev
        report(callback, steps, i, x, out)
        lambdas, ms = [*lambdas, half_log_snr(ab)][-order:], [*ms, out.x0][-order:]
        p = step_order(order, i, steps, lower_order_final_below=None)
        last = (x, ab, p)
        x = _update(x, ab, ab_next, lambdas[-p:], ms[-p:])  # UniP-p
    return x


def unipc_sample(
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
    """UniPC-2 (bh2): UniP-2 and UniC-2, one evaluation a step (diffusers' default order)."""
    check_deterministic(eta, "unipc")
    return _unipc(2, denoiser, x, steps, y, callback, progress)


def unipc3_sample(
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
    """UniPC-3 (bh2): UniP-3 and UniC-3, one evaluation a step."""
    check_deterministic(eta, "unipc3")
    return _unipc(3, denoiser, x, steps, y, callback, progress)
