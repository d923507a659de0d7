"""The :func:`sample` front door, and :data:`SAMPLER_FUNCTIONS`: each sampler name's function.

Every sampler is called as (k-diffusion style)::

    fn(denoiser, x_T, steps, *, y=None, eta=0.0, generator=None, callback=None, progress=False, **options) -> x_0

with a :mod:`~diffusion.sampling.denoiser` (guidance and clipping already wrapped
around it) and a :class:`~diffusion.sampling.steps.Steps` from a step schedule by name.
It draws all noise from ``generator`` through :func:`diffusion.sampling.noise.randn` (a
:class:`~diffusion.sampling.noise.StackedRandomGenerator` gives each image its own stream)
and reports each network step to ``callback`` (:mod:`diffusion.sampling.walk`). Adding a
sampler is one function in this package and one row of :data:`diffusion.sampling.specs.SAMPLER_SPECS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffusion.process.continuous import ContinuousDiffusion
from diffusion.process.gaussian import GaussianDiffusion
# the modules specs.SAMPLER_SPECS names, imported by name so that each stage's import closure
# (dvc.yaml's deps, tests/test_dvc_deps.py) holds them; _resolve then finds them loaded
from diffusion.sampling import ancestral, dpm_solver, euler, heun, ipndm, unipc  # noqa: F401
from diffusion.sampling import specs as sampler_specs
from diffusion.sampling.denoiser import ClippedDenoiser, Denoiser, ModelDenoiser
from diffusion.sampling.noise import NoiseSource, StackedRandomGenerator, randn
from diffusion.sampling.steps import make_steps
from diffusion.training.devices import resolve_precision


def _resolve(path: str) -> Callable[..., torch.Tensor]:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(f"diffusion.sampling.{module}"), name)


# name -> the function sampler_specs names for it (the names and costs live there, torch-free)
SAMPLER_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    name: _resolve(spec.function) for name, spec in sampler_specs.SAMPLER_SPECS.items()
}

@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion | ContinuousDiffusion,
    model,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | str | Sequence[int] | None = None,
    schedule: str = "linspace",
    timesteps: Sequence[float] | None = None,
    eta: float = 0.0,
    labels: torch.Tensor | None = None,
    guidance: Callable[[Denoiser], Denoiser] | None = None,
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
    precision: str = "fp32",
    **options: Any,
):
    """Draw samples of ``shape`` from the network ``model`` trained on ``diffusion``, with the
    sampler ``sampler`` of :data:`SAMPLER_FUNCTIONS` on ``steps`` steps of the step schedule
    ``schedule`` (:data:`~diffusion.sampling.steps.STEP_SCHEDULES`, or ``fitted`` with its
    ``timesteps``; ``steps`` None: every timestep of the discrete chain).

    ``labels`` are the class labels of a class-conditional model; ``guidance`` wraps its
    denoiser (:mod:`diffusion.sampling.guidance`); x̂_0 is then clipped to [-1, 1]
    (``clip_denoised``) or dynamically thresholded (``threshold``). ``options`` go to the
    sampler (e.g. Heun's churn). With ``seed``, row k of the batch is image
    ``first_index + k`` of the run with that seed: its x_T and all its later noise come from
    its own generator on ``device`` (:class:`~diffusion.sampling.noise.StackedRandomGenerator`),
    so a run's images do not depend on how it is split into batches. Instead of a seed,
    ``generator`` may be such a stacked generator or one ``torch.Generator`` for the whole
    batch. x_T is ``noise`` if given. ``precision`` bf16 runs the
    network under bf16 autocast (faster on a CPU with avx512_bf16, BENCHMARKS.md; the
    sampler's own arithmetic stays in float32). Returns the samples, or ``(samples, [x̂_0 of
    each network step])`` with ``return_intermediates``.
    """
    if sampler not in SAMPLER_FUNCTIONS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(SAMPLER_FUNCTIONS)}")
    churn = {key: value for key, value in options.items() if key in sampler_specs.CHURN_OPTIONS}
    if why := sampler_specs.options_refused(sampler, churn, diffusion.process.name):
        raise ValueError(f"sampler: {why}")
    if seed is not None and generator is not None:
        raise ValueError("seed: give a seed or a generator, not both")
    if first_index < 0:
        raise ValueError(f"first_index: got {first_index!r}; allowed: an int >= 0")
    dtype = resolve_precision(precision, torch.device(device))
    denoiser: Denoiser = ModelDenoiser.for_process(model, diffusion, model_kwargs, dtype=dtype)
    if steps is None and not hasattr(diffusion, "num_timesteps"):
        raise ValueError("steps: a continuous process has no timestep count to default to; give a number of steps")
    walk_steps = make_steps(schedule, denoiser.process, diffusion.num_timesteps if steps is None else steps, timesteps)
    if guidance is not None:
        denoiser = guidance(denoiser)
    denoiser = ClippedDenoiser(denoiser, clip=clip_denoised, threshold=threshold)
    if seed is not None:
        generator = StackedRandomGenerator(seed, range(first_index, first_index + shape[0]), device)
    if noise is None:
        x_T = randn(shape, generator, device=torch.device(device))
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: got shape {tuple(noise.shape)}; need {tuple(shape)}")
    else:
        x_T = noise.to(device)
    if labels is not None:
        labels = labels.to(x_T.device)
    intermediates: list[torch.Tensor] = []
    samples = SAMPLER_FUNCTIONS[sampler](
        denoiser,
        x_T,
        walk_steps,
        y=labels,
        eta=eta,
        generator=generator,
        progress=progress,
        callback=(lambda info: intermediates.append(info["pred_x0"])) if return_intermediates else None,
        **options,
    )
    return (samples, intermediates) if return_intermediates else samples
