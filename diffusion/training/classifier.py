"""Training the noise-aware classifier of classifier guidance, and its accuracy against t.

Dhariwal & Nichol 2021, §4.1: the classifier p_φ(y | x_t, t) is trained on images noised by
the diffusion model's own forward process, at every t, so that its gradient guides every
step of sampling. One step:

1. a batch x_0 of the uint8 images (scaled to [-1, 1]), or of the latents of a latent
   model (:func:`~diffusion.training.loop.model_input`), and their labels, indices drawn with
   replacement;
2. t uniform over the diffusion model's process's times (:func:`uniform_times`: the discrete
   chain's T model timesteps, or uniform on [t_min, t_max] of a continuous process) and the
   sampler's view of x_t, x = √ᾱ(t) x_0 + √(1-ᾱ(t)) ε (DDPM eq. 4; :func:`noised`), the x a
   sampler's denoiser and so the guidance see (:mod:`diffusion.process.base`); the classifier
   is told ``process.network_time(t)``, as the diffusion network is (the model timestep itself
   on the chain);
3. AdamW (Loshchilov & Hutter 2019) on the cross-entropy -log p_φ(y | x_t, t).

Batch indices, times and noise come from one CPU generator seeded with
``guidance.classifier_seed`` (the stage builds the network under
:func:`~diffusion.training.loop.seeded_init` of the same seed), so a run draws the same
numbers on every device.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion.models.classifier import NoiseAwareClassifier
from diffusion.process.base import NoiseProcess, shaped
from diffusion.process.discrete import DiscreteChain
from diffusion.training.devices import batch_memory
from diffusion.training.loop import model_input

if TYPE_CHECKING:
    from diffusion.config import GuidanceParams
    from diffusion.process.continuous import ContinuousDiffusion
    from diffusion.process.gaussian import GaussianDiffusion

LogFn = Callable[[int, dict[str, float]], None]


def uniform_times(process: NoiseProcess, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` times drawn uniformly over ``process``'s noise levels: one of the discrete
    chain's model timesteps each (long), or on a continuous process uniform in λ = -log σ over
    its σ range (float64), so EDM's σ in [0.002, 80] is not 99% above σ = 1 as uniform t would be."""
    if isinstance(process, DiscreteChain):
        index = torch.randint(process.num_timesteps, (count,), generator=generator)
        return torch.from_numpy(process.timesteps).long()[index]
    low, high = (math.log(sigma) for sigma in process.sigma_range())
    log_sigma = low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)
    return torch.from_numpy(process.t_of_sigma(log_sigma.exp().numpy()))


def noised(process: NoiseProcess, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The sampler's view of x_t: √ᾱ(t) x_0 + √(1-ᾱ(t)) ε, ᾱ in float64 cast to x_0's dtype."""
    alpha_bar = process.alpha_bar_tensor(t)
    return shaped(alpha_bar.sqrt(), x0) * x0 + shaped((1 - alpha_bar).sqrt(), x0) * noise


def train_classifier(
    net: NoiseAwareClassifier,
    diffusion: GaussianDiffusion | ContinuousDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: GuidanceParams,
    *,
    device: torch.device,
    log: LogFn | None = None,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Train ``net`` in place on ``device`` for ``cfg.classifier_steps`` steps (the module doc's
    step) on the process of ``diffusion`` (the diffusion model's) and uint8 ``images`` [N, C, H, W] (or latents) and their ``labels`` [N]. Returns the loss curve,
    (step, mean cross-entropy of the steps since the last point), one point every
    ``cfg.classifier_log_every`` steps and at the last; ``log(step, {"loss": ...})`` gets each."""
    if len(labels) != len(images) or not 0 <= int(labels.min()) <= int(labels.max()) < net.num_classes:
        raise ValueError(f"labels: need one label in 0..{net.num_classes - 1} per image; got {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(cfg.classifier_seed)
    process = diffusion.process
    net.to(device).train()
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.classifier_lr, weight_decay=cfg.classifier_weight_decay)
    batch, curve, window = cfg.classifier_batch_size, [], []
    for step in tqdm(range(1, cfg.classifier_steps + 1), desc="train_classifier", unit="step", disable=not progress):
        idx = torch.randint(len(images), (batch,), generator=generator)
        t = uniform_times(process, batch, generator)
        noise = torch.randn((batch, *images.shape[1:]), generator=generator)
        idx, t, noise = idx.to(device), t.to(device), noise.to(device)
        with batch_memory("guidance.classifier_batch_size", batch, device):
            x_t = noised(process, model_input(images[idx]), t, noise)
            loss = F.cross_entropy(net(x_t, process.network_time(t)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        window.append(loss.detach())
        if step % cfg.classifier_log_every == 0 or step == cfg.classifier_steps:
            curve.append((step, torch.stack(window).mean().item()))
            window = []
            if log is not None:
                log(step, {"loss": curve[-1][1]})
    return curve


@torch.no_grad()
def accuracy_by_t(
    net: NoiseAwareClassifier,
    diffusion: GaussianDiffusion | ContinuousDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    bins: int,
    batch_size: int,
    seed: int,
) -> list[tuple[int, int, float]] | list[tuple[float, float, float]]:
    """(t_lo, t_hi, accuracy) for ``bins`` equal ranges t_lo <= t <= t_hi of the times of
    ``diffusion``'s process (the discrete chain's timestep indices 0..T-1, or [t_min, t_max] of a continuous
    process): each of the uint8 ``images`` (or latents) noised once in each range, at a t drawn
    uniformly in it (x_t and t from a generator seeded with ``seed``), and the fraction whose
    most probable class is its label. Accuracy falls from the clean-image accuracy at t = 0
    towards chance (the largest class's share) where x_t is nearly pure noise."""
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    process = diffusion.process
    if isinstance(process, DiscreteChain):
        edges = np.linspace(0, process.num_timesteps, bins + 1).round().astype(int)
        ranges = [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        timesteps = torch.from_numpy(process.timesteps).long()

        def draw(lo, hi, count):
            return timesteps[torch.randint(lo, hi + 1, (count,), generator=generator)]
    else:
        edges = np.linspace(process.t_min, process.t_max, bins + 1)
        ranges = [(float(lo), float(hi)) for lo, hi in zip(edges[:-1], edges[1:])]

        def draw(lo, hi, count):
            return lo + (hi - lo) * torch.rand(count, generator=generator, dtype=torch.float64)
    was_training = net.training
    net.eval()
    rows = []
    for lo, hi in ranges:
        correct = 0
        for start in range(0, len(images), batch_size):
            x0, y = images[start : start + batch_size], labels[start : start + batch_size]
            t = draw(lo, hi, len(x0))
            noise = torch.randn(x0.shape, generator=generator)
            x0, y, t, noise = x0.to(device), y.to(device), t.to(device), noise.to(device)
            logits = net(noised(process, model_input(x0), t, noise), process.network_time(t))
            correct += int((logits.argmax(1) == y).sum())
        rows.append((lo, hi, correct / len(images)))
    net.train(was_training)
    return rows
