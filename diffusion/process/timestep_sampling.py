"""Which noise levels a training batch uses: a named distribution over the process's times.

On the discrete chain: uniform timesteps, or loss-aware importance sampling, whose weights
w_t = 1/(T p_t) make the weighted loss E_{t~p}[w_t L_t] the uniform average E_{t~U}[L_t]
(improved DDPM §3.3, eq. 18). On a continuous process (:class:`NoiseLevelSampler`): t
uniform on [t_min, t_max]; EDM's log-normal, ln σ ~ N(P_mean, P_std²) with σ = e^{-λ}
mapped to its time (Karras et al. 2022, §5, P_mean = -1.2, P_std = 1.2); or SD3's
logit-normal, t = t_min + (t_max - t_min) sigmoid(u), u ~ N(m, s²) (Esser et al. 2024, §3.1,
m = 0, s = 1). These weigh every draw 1: the distribution is part of the objective.
Its state is tensors only, so a training checkpoint stores it and resumes bit for bit.
Draws are made on the generator's device (the CPU without one) and moved to ``device``.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusion.process.discrete import DiscreteChain


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class _Stateless:
    """A sampler that learns nothing from the losses: no state to checkpoint."""

    name = "the uniform sampler"

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Nothing to learn from the losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"timestep sampler state: got keys {sorted(state)}; {self.name} has none")


class UniformSampler(_Stateless):
    """t ~ U{0, ..., T-1}, every weight 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=_draw_device(generator))
        return t.to(device), torch.ones(batch_size, device=device)



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


class NoiseLevelSampler(_Stateless):
    """t from a continuous distribution over ``process``'s times (module doc), in float64."""

    DEFAULTS = {"uniform": (None, None), "log-normal": (-1.2, 1.2), "logit-normal": (0.0, 1.0)}
    """name -> (mean, std) of its paper, used where params.yaml gives null."""

    def __init__(self, name: str, process, mean: float | None = None, std: float | None = None):
        self.name, self.process = name, process
        default_mean, default_std = self.DEFAULTS[name]
        self.mean = default_mean if mean is None else float(mean)
        self.std = default_std if std is None else float(std)

    def times(self, u: torch.Tensor) -> torch.Tensor:
        """The time of each standard draw ``u`` (uniform on [0, 1) or N(0, 1) per the distribution)."""
        p = self.process
        if self.name == "uniform":
            return p.t_min + (p.t_max - p.t_min) * u
        if self.name == "logit-normal":
            return p.t_min + (p.t_max - p.t_min) * torch.sigmoid(self.mean + self.std * u)
        sigma = torch.exp(self.mean + self.std * u)
        return torch.from_numpy(p.t_of_sigma(sigma.numpy())).to(u.dtype)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        draw = torch.rand if self.name == "uniform" else torch.randn
        u = draw((batch_size,), generator=generator, dtype=torch.float64)
        return self.times(u).to(device), torch.ones(batch_size, device=device)


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "loss-aware": LossAwareSampler}
"""The discrete chain's samplers."""


def make_timestep_sampler(
    name: str, diffusion, mean: float | None = None, std: float | None = None
) -> UniformSampler | LossAwareSampler | NoiseLevelSampler:
    """The sampler ``name`` for ``diffusion``: over its timesteps on the discrete chain
    (:data:`TIMESTEP_SAMPLERS`), else a :class:`NoiseLevelSampler` of its process with
    ``mean`` and ``std`` (None: the distribution's own)."""
    continuous = not isinstance(diffusion.process, DiscreteChain)
    allowed = NoiseLevelSampler.DEFAULTS if continuous else TIMESTEP_SAMPLERS
    if name not in allowed:
        raise ValueError(f"timestep_sampler: got {name!r}; allowed: {', '.join(allowed)}")
    if continuous:
        return NoiseLevelSampler(name, diffusion.process, mean, std)
    return TIMESTEP_SAMPLERS[name](diffusion.num_timesteps)
