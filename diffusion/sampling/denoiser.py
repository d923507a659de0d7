"""The denoiser: the one interface between a network and every sampler.

As k-diffusion's and EDM's D(x; σ): a denoiser is called ``denoiser(x_t, t, y)`` with
x_t [B, C, H, W], t the model timesteps [B] (integer or real, :mod:`~diffusion.sampling.steps`)
and y the class labels [B] or None, and returns :class:`Denoised`: x̂_0 and ε̂ whatever the
network predicts (eps, x0 or v), and the variance where it is learned. Every denoiser has
``levels`` (its :class:`~diffusion.sampling.steps.NoiseLevels`), so a wrapper can convert
between x̂_0 and ε̂ at any t.

Wrappers compose: :class:`ModelDenoiser` (the network) -> guidance
(:mod:`diffusion.sampling.guidance`) -> :class:`ClippedDenoiser` (clip or threshold x̂_0)
-> a sampler. No sampler knows which network, parameterisation or guidance it calls.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from diffusion.process.gaussian import dynamic_threshold, x0_eps_from_prediction
from diffusion.process.options import Prediction, Variance, check_threshold, parse
from diffusion.sampling.steps import NoiseLevels
from diffusion.training.devices import autocast


@dataclass(frozen=True)
class Denoised:
    """What a denoiser says about x_t: the clean image, the noise, and the variance kind."""

    x0: torch.Tensor
    eps: torch.Tensor
    variance: Variance = Variance.FIXED_SMALL
    """How an ancestral step's variance is chosen (:meth:`log_variance`)."""
    var_values: torch.Tensor | None = None
    """``learned_range``: the network's interpolation v in [-1, 1] (improved DDPM eq. 15)."""

    def log_variance(self, beta: float, posterior_variance: float) -> torch.Tensor:
        """log Σ of the reverse step whose β is ``beta`` and whose posterior variance is
        β̃ = ``posterior_variance`` (both > 0): log β̃ (fixed_small), log β (fixed_large), or
        log Σ = ½(v+1) log β + ½(1-v) log β̃ (learned_range, improved DDPM eq. 15)."""
        if self.variance is Variance.FIXED_SMALL:
            return torch.full_like(self.x0, math.log(posterior_variance))
        if self.variance is Variance.FIXED_LARGE:
            return torch.full_like(self.x0, math.log(beta))
        frac = (self.var_values + 1) / 2
        return frac * math.log(beta) + (1 - frac) * math.log(posterior_variance)


class Denoiser(Protocol):
    levels: NoiseLevels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised: ...


_DEVICE_TABLES: weakref.WeakKeyDictionary[NoiseLevels, dict[torch.device, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _tables(levels: NoiseLevels, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(timesteps, ᾱ, log σ) of ``levels`` as float64 tensors on ``device``, made once per device."""
    per_device = _DEVICE_TABLES.setdefault(levels, {})
    if device not in per_device:
        per_device[device] = tuple(
            torch.from_numpy(a).to(device) for a in (levels.timesteps, levels.alphas_cumprod, levels.log_sigmas)
        )
    return per_device[device]


_LEVELS: weakref.WeakKeyDictionary[Any, NoiseLevels] = weakref.WeakKeyDictionary()


def noise_levels(diffusion) -> NoiseLevels:
    """The noise levels of the process ``diffusion`` (a
    :class:`~diffusion.process.gaussian.GaussianDiffusion`) at its model timesteps, made once
    per process (so their device tables are too)."""
    if diffusion not in _LEVELS:
        _LEVELS[diffusion] = NoiseLevels(diffusion.alphas_cumprod, diffusion.timestep_map.numpy())
    return _LEVELS[diffusion]


def alpha_bar_at(levels: NoiseLevels, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) of ``levels`` (:meth:`~diffusion.sampling.steps.NoiseLevels.alpha_bar`: exact on a
    timestep, log σ interpolated between), computed in float64 on t's device from tables made
    once per device, shaped [B, 1, ..., 1] to broadcast over ``like``."""
    timesteps, alphas_cumprod, log_sigmas = _tables(levels, t.device)
    t = t.to(torch.float64)
    low = (torch.searchsorted(timesteps, t, right=True) - 1).clamp(0, len(timesteps) - 2)
    w = ((t - timesteps[low]) / (timesteps[low + 1] - timesteps[low])).clamp(0, 1)
    between = torch.sigmoid(-2 * ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]))  # 1/(1 + σ²)
    values = torch.where(w == 0, alphas_cumprod[low], torch.where(w == 1, alphas_cumprod[low + 1], between))
    return values.reshape(-1, *(1,) * (like.ndim - 1))


def eps_from_x0(levels: NoiseLevels, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t - √ᾱ x̂_0)/√(1-ᾱ), the noise that x̂_0 implies."""
    ab = alpha_bar_at(levels, t, x)
    return (x - ab.sqrt().to(x.dtype) * x0) / (1 - ab).sqrt().to(x.dtype)


def x0_from_eps(levels: NoiseLevels, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ, the clean image that ε̂ implies."""
    ab = alpha_bar_at(levels, t, x)
    return (x - (1 - ab).sqrt().to(x.dtype) * eps) / ab.sqrt().to(x.dtype)


def timestep_tensor(t: float, batch: int, device: torch.device) -> torch.Tensor:
    """t for a batch: a long tensor on an integer timestep (what the network was trained
    on), float32 between timesteps."""
    if float(t).is_integer():
        return torch.full((batch,), int(t), dtype=torch.long, device=device)
    return torch.full((batch,), float(t), dtype=torch.float32, device=device)


class ModelDenoiser:
    """A network as a denoiser: ``net(x_t, t, y=y)`` (``y`` only when given, extra keyword
    arguments ``model_kwargs`` always) turned into x̂_0 and ε̂ per ``prediction``
    (:func:`~diffusion.process.gaussian.x0_eps_from_prediction`), the variance channels
    split off for ``learned_range``. With ``dtype`` bf16 the network runs under autocast
    (its convolutions and matmuls in bf16) and its output is cast back to x_t's dtype, so the
    sampler's arithmetic keeps its precision."""

    def __init__(
        self, net, levels: NoiseLevels, *, prediction: str | Prediction = "eps",
        variance: str | Variance = "fixed_small", model_kwargs: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.net, self.levels, self.dtype = net, levels, dtype
        self.prediction = parse(Prediction, getattr(prediction, "value", prediction), "prediction")
        self.variance = parse(Variance, getattr(variance, "value", variance), "variance")
        self.model_kwargs = dict(model_kwargs or {})

    @classmethod
    def for_process(
        cls, net, diffusion, model_kwargs: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> ModelDenoiser:
        """The denoiser of ``net`` trained on the process ``diffusion`` (a
        :class:`~diffusion.process.gaussian.GaussianDiffusion`, respaced or not), on its
        :func:`noise_levels`."""
        return cls(
            net, noise_levels(diffusion), prediction=diffusion.prediction, variance=diffusion.variance,
            model_kwargs=model_kwargs, dtype=dtype,
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        kwargs = self.model_kwargs if y is None else {**self.model_kwargs, "y": y}
        with autocast(x.device, self.dtype):
            output = self.net(x, t, **kwargs).to(x.dtype)
        channels = x.shape[1]
        learned = self.variance is Variance.LEARNED_RANGE
        expected = (x.shape[0], 2 * channels if learned else channels, *x.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"model output: got shape {tuple(output.shape)}; variance {self.variance.value!r} needs {expected}"
            )
        prediction, var_values = output.split(channels, dim=1) if learned else (output, None)
        ab = alpha_bar_at(self.levels, t, x)
        x0, eps = x0_eps_from_prediction(self.prediction, prediction, x, ab.sqrt().to(x.dtype), (1 - ab).sqrt().to(x.dtype))
        return Denoised(x0, eps, self.variance, var_values)


class ClippedDenoiser:
    """x̂_0 clamped to [-1, 1] (``clip``) or dynamically thresholded (``threshold`` = p,
    :func:`~diffusion.process.gaussian.dynamic_threshold`), and ε̂ recomputed from it."""

    def __init__(self, inner: Denoiser, *, clip: bool = True, threshold: float | None = None):
        check_threshold(threshold)
        self.inner, self.levels, self.clip, self.threshold = inner, inner.levels, clip, threshold

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        out = self.inner(x, t, y)
        if self.threshold is None and not self.clip:
            return out
        x0 = dynamic_threshold(out.x0, self.threshold) if self.threshold is not None else out.x0.clamp(-1, 1)
        return replace(out, x0=x0, eps=eps_from_x0(self.levels, x, t, x0))
