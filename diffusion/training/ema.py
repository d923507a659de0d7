"""Exponential moving average (EMA) of model weights.

Diffusion models are sampled from an EMA of their weights rather than the raw
weights (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B;
Nichol & Dhariwal 2021, "Improved DDPM"). After each optimiser step

    theta_ema <- decay_t * theta_ema + (1 - decay_t) * theta,

done here as one multi-tensor ``torch._foreach_lerp_`` over all parameters.
Buffers (e.g. normalisation statistics) are copied, not averaged.

With ``warmup=True`` the decay grows with the number of updates n done so far,

    decay_t = min(decay, (1 + n) / (10 + n)),

the ``num_updates`` rule of TensorFlow's ``tf.train.ExponentialMovingAverage``
(also ``LitEma`` in CompVis latent-diffusion), so the EMA is not dominated by the
random initialisation early in training.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """An eval-mode, gradient-free copy of ``model`` that tracks its weights.

    ``ema.model`` is the averaged network (use it to sample); ``ema.update(model)``
    is called once after every optimiser step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema: decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (the warm-up rule in the module doc)."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA weights towards ``model``'s and copy its buffers."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(
                f"ema: model has {len(params)} parameters, the EMA copy {len(ema_params)}"
            )
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
