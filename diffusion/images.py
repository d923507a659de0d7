"""uint8 images from a trained model, shared by the sample stage and ``diffusion generate``:
the labels they are drawn for, the batches, the refusal of non-finite images, the grid.

The callers hand over the settings and the names of the options that set them
(``sample.batch_size`` for the stage, ``--batch-size`` for the command), which the
one-line errors quote. Neither MLflow nor the config is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffusion.data.sizes import check_labels
from diffusion.errors import UserError
from diffusion.packaged import PackagedDiffusion, balanced_labels
from diffusion.training.devices import batch_memory

if TYPE_CHECKING:
    from diffusion.sampling.guidance import Classifier


class NonFiniteSamplesError(UserError, RuntimeError):
    """Samples with NaN or inf; the message is one line saying how many, under which sampler settings."""


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255], the inverse of the data scaling x/127.5 - 1."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sampling_labels(
    given: list[int] | None, count: int, num_classes: int | None, key: str = "sample.labels"
) -> torch.Tensor:
    """``count`` labels: ``given`` cycled, else the model's :func:`~diffusion.packaged.balanced_labels`;
    zeros for an unconditional model. A label outside the model's classes is one line naming ``key``."""
    if not num_classes:
        return torch.zeros(count, dtype=torch.long)
    if given is None:
        return balanced_labels(count, num_classes)
    check_labels(given, num_classes, key)  # validate's rule for sample.labels on the source's classes
    return torch.tensor(given, dtype=torch.long)[torch.arange(count) % len(given)]


def cycled_prompts(prompts: list[str], count: int) -> list[str]:
    """The prompt of each of ``count`` images: ``prompts`` cycled (image k draws prompt k mod P),
    so every prompt gets ``count / P`` images and the grid's columns repeat them."""
    return [prompts[k % len(prompts)] for k in range(count)]


def generate_images(
    packaged: PackagedDiffusion,
    sampling: Mapping[str, Any],
    *,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    name: Callable[[str], str],
    classifier: Classifier | None = None,
    classifier_scale: float = 0.0,
    first_index: int = 0,
) -> torch.Tensor:
    """``len(labels)`` uint8 images ``[N, C, H, W]`` sampled with ``sampling`` (the keys of
    :data:`diffusion.packaged.DEFAULT_SAMPLER`) in batches of ``batch_size``. Image k is image
    ``first_index + k`` of ``seed`` (its own generator, :mod:`diffusion.sampling.noise`), so the
    images depend neither on the batch size nor on which process draws them (a rank's shard
    starts at its ``first_index``); a class-conditional model draws image k for ``labels[k]``, and so
    does a ``classifier`` guiding at ``classifier_scale`` (:mod:`diffusion.sampling.guidance`).

    ``name(key)`` is the option that set ``key`` (``batch_size``, ``sampler``, ``steps``):
    :class:`NonFiniteSamplesError` if any image holds NaN or inf, and a batch too large for
    the device's memory, are one line naming those options.
    """
    conditional = packaged.conditioning != "none" or classifier is not None
    total = len(labels)
    batches, non_finite = [], 0
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        batch_labels = labels[start : start + count].to(device) if conditional else None
        with batch_memory(name("batch_size"), batch_size, device):
            x = packaged.sample(
                count, **sampling, labels=batch_labels, classifier=classifier, classifier_scale=classifier_scale,
                seed=seed, first_index=first_index + start, device=device, progress=True,
            )
        non_finite += int((~torch.isfinite(x)).flatten(1).any(1).sum())
        batches.append(to_uint8(x).cpu())
    if non_finite:
        raise NonFiniteSamplesError(
            f"{non_finite} of {total} images hold NaN or inf with {name('sampler')} {sampling['sampler']!r} and "
            f"{name('steps')} {sampling['steps']} (the model or these settings diverge); nothing written"
        )
    return torch.cat(batches)


def image_grid(images: torch.Tensor, columns: int, padding: int = 2) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> one uint8 image, ``[rows, cols]`` for C = 1, else ``[rows, cols, 3]``.

    ``columns`` images a row with ``padding`` white pixels around each: the layout of
    ``torchvision.utils.make_grid(images, nrow=columns, padding=padding, pad_value=1)``,
    without importing torchvision, whose import every trial's sample stage would pay (BENCHMARKS.md).
    """
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((padding + rows * (h + padding), padding + columns * (w + padding), c), 255, dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid
