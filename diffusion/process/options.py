"""The Gaussian process's options and the rules that combine them, without torch.

:mod:`diffusion.config` validates params.yaml against these (before torch loads) and
:class:`diffusion.process.gaussian.GaussianDiffusion` checks its arguments with the same
functions, so each rule and each allowed name is written once, here.
"""

from __future__ import annotations

import enum
from typing import Any


class Prediction(str, enum.Enum):
    """What the network outputs (its first C channels)."""

    EPS = "eps"  # the noise ε (DDPM eq. 11)
    X0 = "x0"  # the clean image x_0
    V = "v"  # v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022, §4)


class Variance(str, enum.Enum):
    """The reverse-process variance Σ_θ(x_t, t)."""

    FIXED_SMALL = "fixed_small"  # β̃_t, the posterior variance (DDPM §3.2)
    FIXED_LARGE = "fixed_large"  # β_t (DDPM §3.2)
    LEARNED_RANGE = "learned_range"  # exp(v log β_t + (1-v) log β̃_t) (improved DDPM eq. 15)


class Loss(str, enum.Enum):
    """The training objective."""

    MSE = "mse"  # L_simple (DDPM eq. 14), on the chosen prediction
    HYBRID = "hybrid"  # L_simple + λ L_vlb, the mean detached in L_vlb (improved DDPM §3.1)
    KL = "kl"  # L_vlb alone (improved DDPM eq. 4-5)


def names(kind: type[enum.Enum]) -> tuple[str, ...]:
    """The allowed values of an option, in declaration order (what params.yaml may say)."""
    return tuple(member.value for member in kind)


def parse(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """``kind(value)``, or a one-line ValueError naming ``name`` and the allowed values."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(v) for v in names(kind))
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}") from None


def check_threshold(percentile: float | None, key: str = "threshold") -> None:
    """A one-line ValueError naming ``key`` unless ``percentile`` is None (no thresholding) or
    a p with 0.5 < p <= 1, the percentile of dynamic thresholding (Saharia et al. 2022, §2.3;
    :func:`diffusion.process.gaussian.dynamic_threshold`).

    That method sets s to the p-th percentile of |x̂_0| (at least 1), clips x̂_0 to [-s, s]
    and divides by s: the values beyond the percentile, a fraction 1 - p of them, saturate at
    ±1, and the rest are scaled down instead of clipped. At p <= 0.5, s is at most the median
    |x̂_0|, so whenever s > 1 at least half the values saturate, the failure of static clipping
    the method is there to prevent; p = 1 (s = max |x̂_0|) saturates none and only rescales.
    diffusers' default is 0.995.
    """
    if percentile is not None and not 0.5 < percentile <= 1:
        raise ValueError(f"{key}: got {percentile!r}; allowed: a percentile p with 0.5 < p <= 1, or none")


def check_combination(prediction: str, variance: str, loss: str, *, zero_terminal_snr: bool, prefix: str = "") -> None:
    """Raise a one-line ValueError, its keys prefixed with ``prefix`` (``"diffusion."`` in
    params.yaml), for options that cannot train or sample together:

    * a learned variance is trained only by the variational bound (improved DDPM §3.1),
      so ``learned_range`` needs loss ``hybrid`` or ``kl``, and those losses need it;
    * with zero terminal SNR (Lin et al. 2024) the last ᾱ is 0 and x_0 = (x_t - √(1-ᾱ) ε)/√ᾱ
      is undefined there, so ``eps`` prediction cannot be used (§3.2: use ``v``).
    """
    prediction = parse(Prediction, prediction, f"{prefix}prediction")
    variance = parse(Variance, variance, f"{prefix}variance")
    loss = parse(Loss, loss, f"{prefix}loss")
    learned = variance is Variance.LEARNED_RANGE
    if learned and loss is Loss.MSE:
        raise ValueError(
            f"{prefix}variance: 'learned_range' needs {prefix}loss 'hybrid' or 'kl' "
            f"({prefix}loss: 'mse' does not train a learned variance)"
        )
    if not learned and loss is not Loss.MSE:
        raise ValueError(
            f"{prefix}loss: {loss.value!r} trains a learned variance; use {prefix}variance 'learned_range' "
            f"or {prefix}loss 'mse'"
        )
    if zero_terminal_snr and prediction is Prediction.EPS:
        raise ValueError(
            f"{prefix}prediction: 'eps' cannot recover x0 when the last ᾱ is 0 ({prefix}zero_terminal_snr); "
            "allowed 'v' or 'x0'"
        )
