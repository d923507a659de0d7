"""Noise schedules β_0..β_{T-1} and timestep respacing, as float64 numpy arrays.

Index ``t`` runs over 0..T-1 (DDPM's t = 1..T). ᾱ_t = ∏_{s<=t} (1 - β_s).

* :func:`linear_betas`, :func:`cosine_betas`, :func:`sigmoid_betas`: named schedules,
  in :data:`BETA_SCHEDULES` and built by :func:`make_betas`.
* :func:`rescale_zero_terminal_snr`: Lin et al. 2024, Algorithm 1.
* :func:`space_timesteps`: the timesteps a sampler keeps of the chain's T (improved DDPM
  §4's respacing, DDIM §4.2), the discrete chain's ``linspace`` step schedule.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# Named schedules
# ---------------------------------------------------------------------------


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: got {num_timesteps!r}; allowed: an int >= 1")
    return int(num_timesteps)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. 2020 §4): β from 1e-4 to 0.02 over T=1000 steps.

    For other T both ends are scaled by 1000/T so the process keeps about the same
    ᾱ_T (improved DDPM, Nichol & Dhariwal 2021, ``get_named_beta_schedule``). The last β
    is then 20/T, so T must be at least 20.
    """
    if _check_num_timesteps(num_timesteps) < 20:
        raise ValueError(f"num_timesteps: got {num_timesteps}; the linear schedule needs T >= 20 (last beta 20/T)")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int, max_beta: float):
    """β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), max_beta) for a continuous ᾱ(τ), τ in [0, 1].

    Improved DDPM eq. 17 and the text after it: clipping β at ``max_beta`` avoids the
    singularity at τ = 1, where ᾱ reaches 0.
    """
    tau = np.arange(_check_num_timesteps(num_timesteps) + 1, dtype=np.float64) / num_timesteps
    a = alpha_bar(tau)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM eq. 17: ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ + s)/(1 + s) · π/2).

    f(0) cancels in the ratio ᾱ_t/ᾱ_{t-1}; β_t = min(1 - ᾱ_t/ᾱ_{t-1}, max_beta).
    """
    return _betas_from_alpha_bar(lambda tau: np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2, num_timesteps, max_beta)


def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> np.ndarray:
    """Chen 2023, "On the importance of noise scheduling for diffusion models", Algorithm 1
    (``sigmoid_schedule``): ᾱ(τ) = (σ(end/tau) - σ((τ(end - start) + start)/tau)) /
    (σ(end/tau) - σ(start/tau)), with σ the logistic function; ᾱ(0) = 1, ᾱ(1) = 0.

    β is clipped at ``max_beta`` like :func:`cosine_betas` (this replaces Chen's
    clip of ᾱ at 1e-9, which only matters at the last step).
    """

    def logistic(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = logistic(start / tau), logistic(end / tau)

    def alpha_bar(t):
        return (v_end - logistic((t * (end - start) + start) / tau)) / (v_end - v_start)

    return _betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T-1} = 0 and √ᾱ_0 is unchanged.

    The last β becomes exactly 1 (x_T is pure noise); use ``v`` or ``x0`` prediction.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.append(alpha_bar[0], alpha_bar[1:] / alpha_bar[:-1])
    return 1.0 - alphas


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def make_betas(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> np.ndarray:
    """β for the schedule ``name`` of :data:`BETA_SCHEDULES`, optionally rescaled to zero terminal SNR."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"schedule: got {name!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    betas = BETA_SCHEDULES[name](num_timesteps)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


# ---------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------


def _evenly_spaced_sections(num_timesteps: int, counts: Sequence[int]) -> list[int]:
    """Split 0..T-1 into len(counts) near-equal sections (the first T mod n one longer)
    and take counts[i] evenly spaced steps from section i, both of its ends included."""
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        length = size + (i < extra)
        if not 1 <= count <= length:
            raise ValueError(
                f"spec: cannot take {count} steps from a section of {length} timesteps "
                f"(num_timesteps={num_timesteps}); allowed 1..{length}"
            )
        steps += np.round(np.linspace(start, start + length - 1, count)).astype(int).tolist()
        start += length
    return steps


def _ddim_stride(num_timesteps: int, count: int) -> list[int]:
    """range(0, T, stride) for the smallest stride giving exactly ``count`` steps (DDIM's
    uniform skip, as improved-diffusion's ``ddimN`` spec)."""
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"spec: no stride takes exactly {count} of {num_timesteps} timesteps")


def space_timesteps(num_timesteps: int, spec: int | str | Sequence[int]) -> list[int]:
    """The timesteps to keep, sorted and unique, in [0, T).

    ``spec`` is one of: an int n (n evenly spaced steps, 0 and T-1 included);
    ``"ddimN"`` (every stride-th step from 0, the stride giving exactly N steps);
    ``"a,b,c"`` (split 0..T-1 into equal sections and take a, b, c evenly spaced steps
    from them, improved DDPM's ``space_timesteps``); or an explicit sequence of ints.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if isinstance(spec, bool):
        raise ValueError(f"spec: got {spec!r}; allowed: an int, 'ddimN', 'a,b,...' or a sequence of ints")
    if isinstance(spec, int | np.integer):
        return _evenly_spaced_sections(num_timesteps, [int(spec)])
    if isinstance(spec, str):
        counts = spec.removeprefix("ddim").split(",")
        is_ddim = spec.startswith("ddim")
        if not all(c.strip().isdigit() for c in counts) or (is_ddim and len(counts) > 1):
            raise ValueError(f"spec: got {spec!r}; allowed: an int, 'ddimN' or comma-separated ints like '10,10,5'")
        if is_ddim:
            return _ddim_stride(num_timesteps, int(counts[0]))
        return _evenly_spaced_sections(num_timesteps, [int(c) for c in counts])
    try:
        steps = sorted({operator.index(t) for t in spec})
    except TypeError:
        raise ValueError(f"spec: got {spec!r}; allowed: an int, 'ddimN', 'a,b,...' or a sequence of ints") from None
    if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(f"spec: timesteps {spec!r} must be a non-empty sequence in [0, {num_timesteps})")
    return steps
