"""Guidance as denoiser wrappers: classifier-free (Ho & Salimans 2022) and classifier (Dhariwal & Nichol 2021).

Each wraps a :mod:`~diffusion.sampling.denoiser` and is one itself, so every sampler is
guided without knowing it, and the two compose (classifier-free inside, the classifier's
gradient on top).

The scale convention, one for both samplers and params.yaml (``sample.guidance_scale``):
ε̃ = ε_u + w (ε_c - ε_u), so w = 1 is the conditional model (no guidance), w = 0 the
unconditional one and w > 1 guides. The CFG paper writes ε̃ = (1 + w') ε_c - w' ε_u: its
w' is our w - 1 (its w' = 0.3 is our 1.3). DiT and diffusers use our convention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.sampling.denoiser import Denoised, Denoiser, alpha_bar_at, x0_from_eps

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A noise-aware classifier: (x_t [B, C, H, W] in the sampler's variance-preserving view, the
process's ``network_time(t)`` [B]) -> logits [B, classes] (:mod:`diffusion.training.classifier`)."""


class ClassifierFreeGuidance:
    """ε̃ = ε_u + w (ε_c - ε_u) and x̂_0 likewise (x̂_0 is affine in ε̂ at fixed x_t, so the two
    stay consistent), the conditional and unconditional passes batched into one forward
    (DiT's ``forward_with_cfg``); the variance channels come from the conditional half.

    ``null_condition`` is the condition of the unconditional pass: the null class (the network's
    extra class) of a class-conditional model, the empty caption's token ids [L] of a
    text-conditional one (``diffusion.models.layers.null_condition``). With
    ``interval`` = (lo, hi), only steps with lo <= t <= hi (the process's times) are guided
    (Kynkäänniemi et al. 2024); the others run the conditional model alone (w = 1), as do
    all steps at w = 1; at w = 0 only the unconditional pass runs.
    """

    def __init__(
        self, inner: Denoiser, scale: float, null_condition: int | torch.Tensor, interval: Sequence[float] | None = None
    ):
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise ValueError(f"guidance_interval: got {interval!r}; allowed: [lo, hi] with lo <= hi, or null")
        self.inner, self.process = inner, inner.process
        self.scale, self.null_condition, self.interval = float(scale), null_condition, interval

    def _guided_at(self, t: torch.Tensor) -> bool:
        if self.interval is None:
            return True
        value = float(t[0])  # one timestep for the whole batch: one host read a step
        return self.interval[0] <= value <= self.interval[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        if y is None:
            raise ValueError("guidance_scale: classifier-free guidance needs a condition (class labels or a caption's tokens)")
        if self.scale == 1.0 or not self._guided_at(t):
            return self.inner(x, t, y)
        null = torch.as_tensor(self.null_condition, device=y.device).expand_as(y)
        if self.scale == 0.0:
            return self.inner(x, t, null)
        both = self.inner(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        batch = x.shape[0]
        x0_c, x0_u = both.x0[:batch], both.x0[batch:]
        eps_c, eps_u = both.eps[:batch], both.eps[batch:]
        var_values = None if both.var_values is None else both.var_values[:batch]
        return Denoised(
            x0_u + self.scale * (x0_c - x0_u), eps_u + self.scale * (eps_c - eps_u), both.variance, var_values
        )


def classifier_gradient(classifier: Classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_x log p_φ(y | x_t, t), each image's own label's log-softmax differentiated, in at
    least float32 (half-precision logits are upcast, float64 ones kept); ``t`` is what the
    classifier is told (the process's network time)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        picked = log_probs[torch.arange(len(y), device=y.device), y].sum()
        return torch.autograd.grad(picked, x_in)[0].to(x.dtype)


class ClassifierGuidance:
    """ε̃ = ε̂ - √(1-ᾱ) s ∇ log p_φ(y | x_t) (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14), x̂_0 from ε̃.

    In score form this is ∇ log p(x_t) + s ∇ log p(y | x_t), so it guides every sampler; at
    s = 1 with an unconditional ``inner`` and the exact classifier it is ∇ log p(x_t | y) (Bayes),
    the conditional model. For DDPM's ancestral step it moves the mean by (β_t/√α_t) s ∇ log
    p(y | x_t): Algorithm 1's s Σ ∇ log p(y | x_t) with Σ = β_t/√α_t, which differs from a fixed
    Σ = β_t only by 1/√α_t.

    The labels go to the classifier; ``inner`` gets them too only when ``conditional`` (a
    class-conditional model, or classifier-free guidance inside), so an unconditional
    model is guided as ADM guides its unconditional models.
    """

    def __init__(self, inner: Denoiser, classifier: Classifier, scale: float, *, conditional: bool):
        self.inner, self.process, self.classifier, self.scale = inner, inner.process, classifier, float(scale)
        self.conditional = conditional

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        if y is None:
            raise ValueError("classifier_scale: classifier guidance needs class labels to guide towards")
        out = self.inner(x, t, y if self.conditional else None)
        if self.scale == 0.0:
            return out
        grad = classifier_gradient(self.classifier, x, self.process.network_time(t), y)
        alpha_bar = alpha_bar_at(self.process, t, x)
        eps = out.eps - (1 - alpha_bar).sqrt().to(x.dtype) * self.scale * grad
        # where ᾱ = 0 (pure noise: the flow's t = 1, zero terminal SNR) x̂_0 = (x - ε̃)/√ᾱ has no
        # guided value, and the model's x̂_0 stays
        x0 = torch.where(alpha_bar > 0, x0_from_eps(self.process, x, t, eps), out.x0)
        return Denoised(x0, eps, out.variance, out.var_values)


def guidance(
    *,
    scale: float = 1.0,
    null_condition: int | torch.Tensor | None = None,
    interval: Sequence[float] | None = None,
    classifier: Classifier | None = None,
    classifier_scale: float = 0.0,
) -> Callable[[Denoiser], Denoiser] | None:
    """The wrapper :func:`diffusion.sampling.sample.sample` takes as ``guidance``, or None when
    nothing guides: classifier-free at ``scale`` (needs the model's ``null_condition``) and, with a
    ``classifier``, its gradient at ``classifier_scale`` on top. A model without a null condition
    is unconditional: the classifier alone sees the labels."""
    if scale != 1.0 and null_condition is None:
        raise ValueError(f"guidance_scale: {scale} needs a conditional model (one with a null condition); use 1")
    if classifier is not None and classifier_scale == 0.0:
        classifier = None
    if scale == 1.0 and classifier is None:
        return None

    def wrap(denoiser: Denoiser) -> Denoiser:
        if scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, scale, null_condition, interval)
        if classifier is not None:
            denoiser = ClassifierGuidance(denoiser, classifier, classifier_scale, conditional=null_condition is not None)
        return denoiser

    return wrap
