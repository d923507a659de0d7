"""EMA chosen after training: EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sec. 3 and App. C).

During training a few power function EMAs of the weights are tracked (:class:`PowerEMA`; EDM2
keeps relative lengths σ_rel 0.05 and 0.10: ``train.ema_lengths``) and each is copied into a
snapshot every ``train.ema_snapshot_every`` steps and at the last step (:class:`PosthocEMA`).
After training, the EMA of any length σ_rel is the combination of the snapshots whose averaging
profile is closest, in least squares, to that EMA's profile (:func:`solve`, EDM2 Algorithm 3),
applied to their weights (:func:`reconstruct`).

The power function EMA after optimiser step t = 1, 2, ... (EDM2 Eq. 127, a step being one batch):

    θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t,    β_t = (1 - 1/t)^(γ+1),

so β_1 = 0 (the initial weights get no weight), and the weight of step τ's weights in θ̂_t is
the telescoping product of the later β_s = ((s-1)/s)^(γ+1):

    w_γ(τ; t) = (1 - β_τ) Π_{s=τ+1..t} β_s = (1 - β_τ) (τ/t)^(γ+1),    1 <= τ <= t,

which sums to one over τ. Its relative standard deviation is σ_rel (EDM2 Eq. 123, in the limit of
many steps; :func:`gamma_to_sigma_rel`), and :func:`sigma_rel_to_gamma` inverts it (Eq. 126,
Algorithm 2).

The least squares runs on these exact discrete profiles rather than on EDM2's continuous-time
inner products (Eq. 151), so that snapshots of every step reconstruct any σ_rel to float
precision (tests/test_posthoc_ema.py). The inner product of two profiles is

    <w_γ(·; t), w_γ'(·; t')> = t^-(γ+1) t'^-(γ'+1) Σ_{τ <= min(t, t')} (1 - β_τ)(1 - β'_τ) τ^(γ+γ'+2),

a running sum over τ for each pair of exponents, accumulated in log space a chunk of τ at a time
(:func:`_log_running_sums`): its memory is bounded, and its time grows with the steps, not with
their product with the number of snapshots.

Our own code rather than the ``ema-pytorch`` package's ``PostHocEMA``: the snapshots live in this
project's atomic, CRC-checked, resumable training checkpoints and in a DVC output
(``models/ema_snapshots.pt``), where ema-pytorch writes files of its own, non-atomically, and
keeps its own step count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion.config import MAX_EMA_LENGTH
from diffusion.training.ema import EMA

CHUNK = 2**16
"""Steps τ whose terms :func:`_log_running_sums` holds at once."""


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (EDM2 Eq. 123); at γ = 0 it is ``MAX_EMA_LENGTH``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of ``sigma_rel`` (EDM2 Eq. 126, Algorithm 2): the largest real root of
    γ³ + 7γ² + (16 - σ_rel⁻²)γ + 12 - σ_rel⁻² = 0, its one positive root (Descartes' rule: one
    sign change; the other two have real parts below zero, their sum being -7 minus it). One
    line (ValueError) outside 0 < σ_rel < :data:`~diffusion.config.MAX_EMA_LENGTH`, where γ > 0."""
    if not 0 < sigma_rel < MAX_EMA_LENGTH:
        raise ValueError(f"sigma_rel: got {sigma_rel}; allowed 0 < sigma_rel < {MAX_EMA_LENGTH:.4f} (gamma > 0, EDM2 Eq. 123)")
    inverse_square = sigma_rel**-2
    return float(np.roots([1, 7, 16 - inverse_square, 12 - inverse_square]).real.max())


def power_beta(gamma: float, step: int) -> float:
    """β_t = (1 - 1/t)^(γ+1), the decay of the update after optimiser step t >= 1 (EDM2 Eq. 127)."""
    return (1 - 1 / step) ** (gamma + 1)


class PowerEMA(EMA):
    """The power function EMA of ``model``'s weights of length ``sigma_rel`` (module doc): an
    :class:`~diffusion.training.ema.EMA` whose decay before its t-th update is β_t."""

    def __init__(self, model: nn.Module, sigma_rel: float) -> None:
        super().__init__(model)
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel)

    def current_decay(self) -> float:
        """β_t of the next update, the t-th (EDM2 Eq. 127)."""
        return power_beta(self.gamma, self.num_updates + 1)


class PosthocEMA:
    """The tracks of ``sigma_rels`` and their snapshots: each track's state dict (on the CPU) at
    every multiple of ``every`` steps and at the step :meth:`update` is told is the last."""

    def __init__(self, model: nn.Module, sigma_rels: list[float], every: int) -> None:
        self.tracks = [PowerEMA(model, sigma_rel) for sigma_rel in sigma_rels]
        self.every = every
        self.snapshots: list[dict[str, Any]] = []
        """``{"sigma_rel", "step", "state_dict"}`` of each snapshot, in the order taken."""

    def update(self, model: nn.Module, *, last: bool) -> None:
        """Update every track after an optimiser step; snapshot them at a multiple of ``every`` or ``last``."""
        for track in self.tracks:
            track.update(model)
            if track.num_updates % self.every == 0 or last:
                state = {key: value.detach().to("cpu", copy=True) for key, value in track.model.state_dict().items()}
                self.snapshots.append({"sigma_rel": track.sigma_rel, "step": track.num_updates, "state_dict": state})

    def state_dict(self) -> dict[str, Any]:
        return {"tracks": [track.state_dict() for track in self.tracks], "snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for track, saved in zip(self.tracks, state["tracks"], strict=True):
            track.load_state_dict(saved)
        self.snapshots = list(state["snapshots"])


def _log_one_minus_beta(gamma: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """log(1 - β_τ) = log(-expm1((γ + 1) log1p(-1/τ))), accurate for large τ; 0 at τ = 1."""
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf: β_1 = 0
        return np.log(-np.expm1((gamma + 1) * np.log1p(-1 / tau)))


def _log_running_sums(pairs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """log Σ_{τ <= m} (1 - β_τ)(1 - β'_τ) τ^(γ+γ'+2) for each pair (γ, γ') of ``pairs`` [P, 2] and each
    m of ``steps`` (sorted, distinct, >= 1): [P, len(steps)], summed :data:`CHUNK` steps at a time."""
    g, h = pairs[:, :1], pairs[:, 1:]
    out = np.empty((len(pairs), len(steps)))
    carried = np.full(len(pairs), -np.inf)  # the log of the sum over the chunks before
    for first in range(1, int(steps[-1]) + 1, CHUNK):
        tau = np.arange(first, min(first + CHUNK, int(steps[-1]) + 1), dtype=np.float64)
        terms = _log_one_minus_beta(g, tau) + _log_one_minus_beta(h, tau) + (g + h + 2) * np.log(tau)
        running = np.logaddexp.accumulate(np.concatenate([carried[:, None], terms], axis=1), axis=1)[:, 1:]
        inside = (steps >= first) & (steps < first + len(tau))
        out[:, inside] = running[:, steps[inside] - first]
        carried = running[:, -1]
    return out


def _gram(gammas: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The inner products of the profiles w_γ(·; t) of (``gammas[i]``, ``steps[i]``) (module doc)."""
    distinct_g, g_index = np.unique(gammas, return_inverse=True)
    distinct_t, t_index = np.unique(steps, return_inverse=True)
    pairs = np.array([(a, b) for a in distinct_g for b in distinct_g])
    sums = _log_running_sums(pairs, distinct_t).reshape(len(distinct_g), len(distinct_g), len(distinct_t))
    first = np.minimum(t_index[:, None], t_index[None, :])  # min(t_i, t_j), as an index of distinct_t
    scale = (gammas + 1) * np.log(steps.astype(np.float64))
    return np.exp(sums[g_index[:, None], g_index[None, :], first] - scale[:, None] - scale[None, :])


def solve(sources: list[tuple[float, int]], sigma_rel: float) -> np.ndarray:
    """The weights x of the snapshots ``sources`` (σ_rel, step) whose combination Σ x_i w_i has the
    profile closest, in least squares over the steps, to the power function EMA of ``sigma_rel``
    at the last snapshot's step, normalised to sum to one (EDM2 Algorithm 3, on the exact
    discrete profiles of the module doc). Snapshots that repeat a profile share its weight (the
    minimum-norm solution)."""
    steps = np.array([s for _, s in sources] + [max(s for _, s in sources)], dtype=np.int64)
    gammas = np.array([sigma_rel_to_gamma(s) for s, _ in sources] + [sigma_rel_to_gamma(sigma_rel)])
    gram = _gram(gammas, steps)
    weights = np.linalg.lstsq(gram[:-1, :-1], gram[:-1, -1], rcond=None)[0]
    return weights / weights.sum()


def reconstruct(snapshots: list[dict[str, Any]], sigma_rel: float) -> dict[str, torch.Tensor]:
    """The state dict of the power function EMA of length ``sigma_rel`` at the last snapshot's
    step, combined from :attr:`PosthocEMA.snapshots` with the weights of :func:`solve`,
    in float64 and returned in the snapshots' dtypes; a tensor that is not floating is the newest
    snapshot's."""
    if not snapshots:
        raise ValueError("posthoc_ema: no snapshots to reconstruct from")
    weights = solve([(s["sigma_rel"], s["step"]) for s in snapshots], sigma_rel)
    newest = max(snapshots, key=lambda s: s["step"])["state_dict"]
    state = {}
    for key, value in newest.items():
        if not value.is_floating_point():
            state[key] = value.clone()
            continue
        total = sum(w * s["state_dict"][key].double() for w, s in zip(weights.tolist(), snapshots, strict=True))
        state[key] = total.to(value.dtype)
    return state
