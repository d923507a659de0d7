"""The samplers params.yaml may name, without torch: name -> implementation and cost.

:mod:`diffusion.config` validates ``sample.sampler`` against this table (no torch
import), :mod:`diffusion.sampling.sample` resolves each name to its function, and the sweep's
``sampling_cost`` objective is :func:`network_evaluations`: what a sampler costs per
image, whatever its step count means (a second-order solver evaluates the network
twice a step, guidance may double it again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSpec:
    function: str
    """The sampler's function as ``module.name`` in the :mod:`diffusion.sampling` package."""
    nfe: Callable[[int], int]
    """Network evaluations per image for ``steps`` sampler steps."""


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("ancestral.ddpm_sample", nfe=lambda steps: steps),  # one evaluation a step
    "ddim": SamplerSpec("ancestral.ddim_sample", nfe=lambda steps: steps),
}


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations per image of ``sampler`` at ``steps`` steps (the NFE of the papers)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler].nfe(steps)
