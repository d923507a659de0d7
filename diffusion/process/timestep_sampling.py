"""Which timesteps a training batch uses: uniform, or loss-aware importance sampling.

A sampler returns ``(t, weights)`` with weights w_t = 1/(T p_t), so the weighted loss
E_{t~p}[w_t L_t] equals the uniform average E_{t~U}[L_t] (improved DDPM §3.3, eq. 18).
Its state is tensors only, so a training checkpoint stores it and resumes bit for bit.
Draws are made on the generator's device (the CPU without one) and moved to ``device``.
"""

from __future__ import annotations

from typing import Any

import torch


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class UniformSampler:
    """t ~ U{0, ..., T-1}, every weight 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=_draw_device(generator))
        return t.to(device), torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Nothing to learn from the losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"timestep sampler state: got keys {sorted(state)}; the uniform sampler has none")


class LossAwareSampler:
    """Importance sampling p_t ∝ √E[L_t²] (improved DDPM §3.3, eq. 18).

    E[L_t²] is the mean over the last ``history_per_term`` losses seen at t. Until every t
    has a full history (or if every loss is 0) p is uniform; after that p is mixed with
    ``uniform_prob`` of the uniform distribution, as improved-diffusion does, so no p_t is 0.
    In distributed training every rank draws the whole batch's timesteps and trains on its
    slice; the loop gathers every rank's losses (:func:`diffusion.training.distributed.concat`)
    for :meth:`update`, so each rank learns from the whole batch and all draw from the same p.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 1e-3):
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        """p_t as a float64 tensor [T]."""
        uniform = torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        rms = self.history.pow(2).mean(dim=1).sqrt()
        if bool((self.counts < self.history.shape[1]).any()) or float(rms.sum()) == 0.0:
            return uniform
        return (1 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        p = self.probabilities().to(_draw_device(generator))
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each example's loss in the history of its t, dropping the oldest when full."""
        size = self.history.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[step] == size:
                self.history[step] = self.history[step].roll(-1)
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("history", "counts"):
            if key not in state or tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(
                    f"timestep sampler state: {key} must have shape {tuple(getattr(self, key).shape)}"
                )
        self.history.copy_(state["history"])
        self.counts.copy_(state["counts"])


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "loss-aware": LossAwareSampler}


def make_timestep_sampler(name: str, diffusion) -> UniformSampler | LossAwareSampler:
    """The sampler ``name`` of :data:`TIMESTEP_SAMPLERS` over ``diffusion.num_timesteps`` steps."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"timestep_sampler: got {name!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](diffusion.num_timesteps)
