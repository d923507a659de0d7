"""Samplers of the reverse process, all with one signature, and the :func:`sample` front door.

Every sampler in :data:`SAMPLERS` is (k-diffusion style)::

    fn(diffusion, model, x_T, *, model_kwargs=None, eta=0.0, clip_denoised=True,
       threshold=None, generator=None, progress=False, callback=None) -> x_0

It walks ``diffusion``'s timesteps from the last to 0 (respace the diffusion for fewer
steps), draws all noise from ``generator`` through :func:`diffusion.sampling.noise.randn`
(a :class:`~diffusion.sampling.noise.StackedRandomGenerator` gives each image its own
stream), and calls ``callback`` (if given) once per step, before the update, with
dict(i, t, x, pred_x0): the step number, the model's timestep, the current x_t and the
model's x̂_0. Adding a sampler is one function here and one row of
:data:`diffusion.sampling.table.SAMPLERS` (its name, this function's name, its network
evaluations); a guided model is a model wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from diffusion.sampling import table as sampler_table
from diffusion.process.gaussian import GaussianDiffusion, gather
from diffusion.sampling.noise import NoiseSource, StackedRandomGenerator, randn
from diffusion.process.schedules import space_timesteps

Callback = Callable[[dict[str, Any]], None]


def _steps(diffusion: GaussianDiffusion, x: torch.Tensor, progress: bool):
    """(i, index, t) from the last timestep to 0, t a [B] long tensor of the index."""
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    for i, index in enumerate(tqdm(indices, disable=not progress, desc="sampling")):
        yield i, index, torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


def _report(callback: Callback | None, diffusion: GaussianDiffusion, i: int, index: int, x, pred_x0) -> None:
    if callback is not None:
        callback({"i": i, "t": int(diffusion.timestep_map[index]), "x": x, "pred_x0": pred_x0})


def ddpm_sample(
    diffusion: GaussianDiffusion,
    model,
    x_T: torch.Tensor,
    *,
    model_kwargs: dict[str, Any] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: NoiseSource = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I),
    and no noise at the last step.

    σ_t² is the diffusion's variance: β̃_t (fixed_small), β_t (fixed_large) or the learned
    interpolation (improved DDPM eq. 15). ``eta`` is accepted for the common signature
    and ignored (DDPM is DDIM with η = 1 and fixed_small; see :func:`ddim_sample`).
    """
    x = x_T
    for i, index, t in _steps(diffusion, x, progress):
        out = diffusion.p_mean_variance(
            model, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised, threshold=threshold
        )
        _report(callback, diffusion, i, index, x, out["pred_x0"])
        x = out["mean"]
        if index > 0:
            z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = x + torch.exp(0.5 * out["log_variance"]) * z
    return x


def ddim_sample(
    diffusion: GaussianDiffusion,
    model,
    x_T: torch.Tensor,
    *,
    model_kwargs: dict[str, Any] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: NoiseSource = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12, on the diffusion's (respaced) timesteps:

        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 - ᾱ_{t-1})/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1})      (eq. 16),

    where t-1 is the previous kept step and ᾱ before the first one is 1 (so the last
    step returns x̂_0). η = 0 is deterministic; η = 1 is DDPM with fixed_small variance.
    The model's variance, if learned, is not used.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: got {eta!r}; allowed: 0 <= eta <= 1")
    x = x_T
    tables = diffusion.tables(x.device)
    for i, index, t in _steps(diffusion, x, progress):
        out = diffusion.p_mean_variance(
            model, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised, threshold=threshold
        )
        _report(callback, diffusion, i, index, x, out["pred_x0"])
        alpha_bar = gather(tables.alphas_cumprod, t, x)
        alpha_bar_prev = gather(tables.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        direction = torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * out["pred_eps"]
        x = torch.sqrt(alpha_bar_prev) * out["pred_x0"] + direction
        if eta > 0 and index > 0:
            x = x + sigma * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x


# name -> the function sampler_table names for it (the names and costs live there, torch-free)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    name: globals()[spec.function] for name, spec in sampler_table.SAMPLERS.items()
}


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | str | Sequence[int] | None = None,
    eta: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    threshold: float | None = None,
    seed: int | None = None,
    first_index: int = 0,
    generator: NoiseSource = None,
    device: str | torch.device = "cpu",
    noise: torch.Tensor | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
):
    """Draw samples of ``shape`` with the sampler ``sampler`` of :data:`SAMPLERS`.

    ``diffusion`` is respaced to ``steps`` (any :func:`~diffusion.process.schedules.space_timesteps`
    spec; None keeps all T). With ``seed``, row k of the batch is image ``first_index + k``
    of the run with that seed: its x_T and all its later noise come from its own generator
    on ``device`` (:class:`~diffusion.sampling.noise.StackedRandomGenerator`), so a run's images
    do not depend on how it is split into batches. Instead of a seed, ``generator`` may be
    such a stacked generator or one ``torch.Generator`` for the whole batch. x_T is
    ``noise`` if given. Returns the samples, or ``(samples, [pred_x0 of each step])`` with
    ``return_intermediates``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if seed is not None and generator is not None:
        raise ValueError("seed: give a seed or a generator, not both")
    if first_index < 0:
        raise ValueError(f"first_index: got {first_index!r}; allowed: an int >= 0")
    if seed is not None:
        generator = StackedRandomGenerator(seed, range(first_index, first_index + shape[0]), device)
    if steps is not None:
        diffusion = diffusion.respace(space_timesteps(diffusion.num_timesteps, steps))
    if noise is None:
        x_T = randn(shape, generator, device=torch.device(device))
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: got shape {tuple(noise.shape)}; need {tuple(shape)}")
    else:
        x_T = noise.to(device)
    intermediates: list[torch.Tensor] = []
    samples = SAMPLERS[sampler](
        diffusion,
        model,
        x_T,
        model_kwargs=model_kwargs,
        eta=eta,
        clip_denoised=clip_denoised,
        threshold=threshold,
        generator=generator,
        progress=progress,
        callback=(lambda info: intermediates.append(info["pred_x0"])) if return_intermediates else None,
    )
    return (samples, intermediates) if return_intermediates else samples
