"""The denoiser: the one interface between a network and every sampler.

As k-diffusion's and EDM's D(x; σ): a denoiser is called ``denoiser(x_t, t, y)`` with
x_t [B, C, H, W] in the variance-preserving view (:mod:`diffusion.process.base`), t the
process's times [B] (the discrete chain's model timesteps, integer or real) and y the class
labels [B] or None, and returns :class:`Denoised`: x̂_0 and ε̂ whatever the process and
whatever the network predicts, and the variance where it is learned. Every denoiser has its
``process``, so a wrapper can convert between x̂_0 and ε̂ at any t.

Wrappers compose: :class:`ModelDenoiser` (the network) -> guidance
(:mod:`diffusion.sampling.guidance`) -> :class:`ClippedDenoiser` (clip or threshold x̂_0)
-> a sampler. No sampler knows which network, parameterisation or guidance it calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from diffusion.process.base import NoiseProcess, shaped
from diffusion.process.gaussian import dynamic_threshold
from diffusion.process.options import Prediction, Variance, check_threshold, parse
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
    process: NoiseProcess

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised: ...


def alpha_bar_at(process: NoiseProcess, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) of ``process`` in float64 on t's device, shaped [B, 1, ..., 1] to broadcast over ``like``."""
    return process.alpha_bar_tensor(t).reshape(-1, *(1,) * (like.ndim - 1))


def eps_from_x0(process: NoiseProcess, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t - √ᾱ x̂_0)/√(1-ᾱ), the noise that x̂_0 implies."""
    ab = alpha_bar_at(process, t, x)
    return (x - ab.sqrt().to(x.dtype) * x0) / (1 - ab).sqrt().to(x.dtype)


def x0_from_eps(process: NoiseProcess, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ, the clean image that ε̂ implies."""
    ab = alpha_bar_at(process, t, x)
    return (x - (1 - ab).sqrt().to(x.dtype) * eps) / ab.sqrt().to(x.dtype)


class ModelDenoiser:
    """A network as a denoiser: the sampler's x_t becomes the process's (times √(α² + σ²)),
    the network is called as ``net(network_input(x), network_time(t), y=y)`` (``y`` only when
    given, extra keyword arguments ``model_kwargs`` always) and its output becomes x̂_0 and ε̂
    per ``prediction`` (:meth:`~diffusion.process.base.NoiseProcess.x0_eps`), the variance
    channels split off for ``learned_range``. With ``dtype`` bf16 the network runs under
    autocast (its convolutions and matmuls in bf16) and its output is cast back to x_t's
    dtype, so the sampler's arithmetic keeps its precision."""

    def __init__(
        self, net, process: NoiseProcess, *, prediction: str | Prediction = "eps",
        variance: str | Variance = "fixed_small", model_kwargs: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.net, self.process, self.dtype = net, process, dtype
        self.prediction = parse(Prediction, getattr(prediction, "value", prediction), "prediction")
        self.variance = parse(Variance, getattr(variance, "value", variance), "variance")
        self.model_kwargs = dict(model_kwargs or {})

    @classmethod
    def for_process(
        cls, net, diffusion, model_kwargs: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> ModelDenoiser:
        """The denoiser of ``net`` trained on ``diffusion`` (a
        :class:`~diffusion.process.gaussian.GaussianDiffusion` or a
        :class:`~diffusion.process.continuous.ContinuousDiffusion`), on its process."""
        return cls(
            net, diffusion.process, prediction=diffusion.prediction, variance=diffusion.variance,
            model_kwargs=model_kwargs, dtype=dtype,
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        kwargs = self.model_kwargs if y is None else {**self.model_kwargs, "y": y}
        p = self.process
        x = x if p.variance_preserving else shaped(p.scale(t), x) * x
        with autocast(x.device, self.dtype):
            output = self.net(p.network_input(x, t), p.network_time(t), **kwargs).to(x.dtype)
        channels = x.shape[1]
        learned = self.variance is Variance.LEARNED_RANGE
        expected = (x.shape[0], 2 * channels if learned else channels, *x.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"model output: got shape {tuple(output.shape)}; variance {self.variance.value!r} needs {expected}"
            )
        prediction, var_values = output.split(channels, dim=1) if learned else (output, None)
        x0, eps = p.x0_eps(self.prediction, p.network_output(prediction, x, t), x, t)
        return Denoised(x0, eps, self.variance, var_values)


class ClippedDenoiser:
    """x̂_0 clamped to [-1, 1] (``clip``) or dynamically thresholded (``threshold`` = p,
    :func:`~diffusion.process.gaussian.dynamic_threshold`), and ε̂ recomputed from it."""

    def __init__(self, inner: Denoiser, *, clip: bool = True, threshold: float | None = None):
        check_threshold(threshold)
        self.inner, self.process, self.clip, self.threshold = inner, inner.process, clip, threshold

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        out = self.inner(x, t, y)
        if self.threshold is None and not self.clip:
            return out
        x0 = dynamic_threshold(out.x0, self.threshold) if self.threshold is not None else out.x0.clamp(-1, 1)
        return replace(out, x0=x0, eps=eps_from_x0(self.process, x, t, x0))
