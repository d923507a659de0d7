"""The Gaussian process's options and the rules that combine them, without torch.

:mod:`diffusion.config` validates params.yaml against these (before torch loads) and
:class:`diffusion.process.gaussian.GaussianDiffusion` checks its arguments with the same
functions, so each rule and each allowed name is written once, here.
"""

from __future__ import annotations

import enum
from typing import Any


class Process(str, enum.Enum):
    """The noise process x_t = α(t) x_0 + σ(t) ε (:mod:`diffusion.process.base`)."""

    DDPM = "ddpm"  # the discrete chain over diffusion.timesteps (Ho et al. 2020; Nichol & Dhariwal 2021)
    VP = "vp"  # the continuous VP SDE (Song et al. 2021)
    EDM = "edm"  # σ(t) = t with Table 1's preconditioning (Karras et al. 2022)
    FLOW = "flow"  # the linear interpolant (1 - t) x_0 + t ε (rectified flow, flow matching)


class Prediction(str, enum.Enum):
    """What the network outputs (its first C channels)."""

    EPS = "eps"  # the noise ε (DDPM eq. 11)
    X0 = "x0"  # the clean image x_0 (EDM: through its preconditioning)
    V = "v"  # v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022, §4)
    VELOCITY = "velocity"  # u = dx_t/dt = α' x_0 + σ' ε (flow matching; ε - x_0 on the linear path)


PROCESS_OPTIONS: dict[Process, dict[str, tuple[str, ...]]] = {
    Process.DDPM: {
        "prediction": ("eps", "x0", "v"),
        "schedule": ("linear", "cosine", "sigmoid"),
        "timestep_sampler": ("uniform", "loss-aware"),
        "loss_weighting": ("simple", "min-snr", "edm"),
    },
    Process.VP: {
        "prediction": ("eps", "x0", "v"),
        "schedule": ("linear", "cosine"),
        "timestep_sampler": ("uniform", "log-normal", "logit-normal"),
        "loss_weighting": ("simple", "min-snr", "edm", "flow"),
    },
    Process.EDM: {
        "prediction": ("x0",),
        "schedule": (),
        "timestep_sampler": ("log-normal", "uniform", "logit-normal"),
        "loss_weighting": ("edm", "simple", "min-snr", "flow"),
    },
    Process.FLOW: {
        "prediction": ("velocity", "x0"),
        "schedule": (),
        "timestep_sampler": ("logit-normal", "uniform", "log-normal"),
        "loss_weighting": ("flow", "simple", "min-snr", "edm"),
    },
}
"""What each process allows of the options it shares (the first of each: its default when
params.yaml says null). The discrete chain has no time derivative (no velocity, no flow
weighting) and the continuous processes no timestep table (no loss-aware sampling); EDM's
network predicts x_0 through its preconditioning; ε cannot recover x_0 where α reaches 0
(the flow at t = 1); EDM and the flow have one σ(t) each, so no β schedule."""


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


CONTINUOUS_TIME_MAX = {Process.VP: 1.0, Process.EDM: 80.0, Process.FLOW: 1.0}
"""The largest time of each continuous process (EDM's σ_max; the unit interval's end), where
sampling starts; the discrete chain's is its last timestep, T - 1."""


def time_max(process: str, timesteps: int) -> float:
    """The largest time of ``process`` (with ``timesteps``, the chain's T)."""
    name = parse(Process, process, "process")
    return float(timesteps - 1) if name is Process.DDPM else CONTINUOUS_TIME_MAX[name]


def process_identity(section: dict[str, Any]) -> dict[str, Any]:
    """What fixes x_t at each time and the time a network is told, of a diffusion section of
    params.yaml (or a model file's copy, where no ``process`` is ``ddpm``): the process, its
    schedule (resolved, where it has one) and, for the discrete chain, T and zero terminal SNR.
    A noise-aware classifier trained on one is valid for every model of the same."""
    name = section.get("process") or Process.DDPM.value
    identity: dict[str, Any] = {"process": name}
    if PROCESS_OPTIONS[parse(Process, name, "process")]["schedule"]:
        identity["schedule"] = process_option(name, "schedule", section.get("schedule"), "diffusion.")
    if name == Process.DDPM.value:
        identity |= {"timesteps": section["timesteps"], "zero_terminal_snr": section.get("zero_terminal_snr", False)}
    return identity


def process_option(process: str, key: str, value: str | None, prefix: str = "") -> str:
    """``value`` of option ``key`` on ``process`` (its default when None), or a one-line
    ValueError naming ``prefix + key`` and what the process allows."""
    allowed = PROCESS_OPTIONS[parse(Process, process, f"{prefix}process")][key]
    if value is None:
        if not allowed:
            raise ValueError(f"{prefix}{key}: process {process!r} has none")
        return allowed[0]
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed) if allowed else "none (null)"
        raise ValueError(f"{prefix}{key}: got {value!r}; process {process!r} allows {listed}")
    return value


def loss_weighting_name(process: str, weighting: str | None, min_snr_gamma: float | None, prefix: str = "") -> str:
    """The loss weighting that trains: ``weighting``, or with null ``min-snr`` where
    ``min_snr_gamma`` is set and else the process's own; a one-line ValueError where the
    process does not allow it, or where min-snr and its γ do not come together."""
    if weighting is None and min_snr_gamma is not None:
        weighting = "min-snr"
    name = process_option(process, "loss_weighting", weighting, prefix)
    if (name == "min-snr") != (min_snr_gamma is not None):
        raise ValueError(
            f"{prefix}min_snr_gamma: got {min_snr_gamma!r} with loss_weighting {name!r}; "
            "min-snr needs its γ (e.g. 5) and the other weightings none (null)"
        )
    return name


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
