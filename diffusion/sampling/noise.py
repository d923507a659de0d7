"""One random stream per image, so image k of a seed is the same whatever the batching.

As EDM's ``generate.py`` (Karras et al. 2022, ``StackedRandomGenerator``): image k of a
run with seed s draws x_T and every later noise from its own ``torch.Generator``, seeded
by :func:`image_seed`. Which batch (or which GPU) holds the image then changes nothing;
the kind of device does (CPU and CUDA generators draw different numbers from one seed).
Samplers draw all their noise through :func:`randn`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image ``index`` of a run with ``seed``: numpy's
    ``SeedSequence(seed, spawn_key=(index,))``, so no two (seed, index) pairs share a
    stream (seeds s and s+1 share no image, unlike ``s + index``)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


class StackedRandomGenerator:
    """One ``torch.Generator`` on ``device`` per image of a batch: the images ``indices`` of
    the run with ``seed`` (``range(first, first + batch)``)."""

    def __init__(self, seed: int, indices: Sequence[int], device: str | torch.device = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(image_seed(seed, k)) for k in indices]

    def randn(self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """N(0, I) of ``shape`` [B, ...]: row k from the k-th image's generator."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise: got a batch of {shape[0]}; the generator holds {len(self.generators)} images")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in self.generators])


NoiseSource = StackedRandomGenerator | torch.Generator | None
"""Where a sampler's noise comes from: one generator per image, one for the batch, or torch's global one."""


def randn(
    shape: Sequence[int],
    generator: NoiseSource,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, I) of ``shape`` on ``device``: per image from a :class:`StackedRandomGenerator`,
    else from one generator for the whole batch (torch's global one if None)."""
    if isinstance(generator, StackedRandomGenerator):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
