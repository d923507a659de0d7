"""The noise process in continuous time: the interface every process implements, and the one output split.

A process says what x_t is given x_0 and ε ~ N(0, I) at a time t:

    x_t = α(t) x_0 + σ(t) ε,   λ(t) = log(α(t)/σ(t)),

and nothing else is needed to train or sample (Kingma et al. 2021, "Variational Diffusion
Models", §2; Karras et al. 2022, eq. 1 with s(t) = α(t), σ_EDM(t) = σ(t)/α(t)). Two equivalent
views of one state run through the code:

* the process's own x_t, what its network sees (after EDM's c_in);
* the variance-preserving view x_t / √(α² + σ²) = √ᾱ x_0 + √(1-ᾱ) ε with
  ᾱ = α²/(α² + σ²) = sigmoid(2λ), what every sampler walks (:mod:`diffusion.sampling`): its
  probability-flow ODE is the same curve in λ for every process, so a sampler written in
  ᾱ (DDIM, DPM-Solver++, UniPC, Heun in EDM's σ = e^{-λ}) runs on every process unchanged.

The network's output becomes x̂_0 and ε̂ in :meth:`NoiseProcess.x0_eps` (one place, for
training and every sampler), per what it predicts (:class:`~diffusion.process.options.Prediction`):

    eps:      x̂_0 = (x_t - σ ε̂)/α                      x0: ε̂ = (x_t - α x̂_0)/σ
    v:        x̂_0 = α x_t - σ v̂,  ε̂ = σ x_t + α v̂      (Salimans & Ho 2022 §4; α² + σ² = 1)
    velocity: u = dx_t/dt = α' x_0 + σ' ε, so with d = α σ' - σ α' (Lipman et al. 2023):
              x̂_0 = (σ' x_t - σ û)/d,  ε̂ = (α û - α' x_t)/d.

The reverse-time ODE and SDE of the process (Song et al. 2021, eqs. 6 and 13, in the
form of Kingma et al. 2021 appendix): with f = α'/α and g² = 2σσ' - 2fσ² = -2σ² λ',

    dx = f x dt + g dw                                        (forward SDE)
    dx = [f x - ½ g² ∇log p_t(x)] dt = (α' x̂_0 + σ' ε̂) dt   (probability-flow ODE)
    dx = [f x - g² ∇log p_t(x)] dt + g dw̄,  ∇log p_t(x) = -ε̂/σ  (reverse SDE)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusion.process.options import Prediction


def shaped(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` [B] as [B, 1, ..., 1] in ``like``'s dtype, to broadcast over ``like``."""
    return values.to(like.dtype).reshape(-1, *(1,) * (like.ndim - 1))


class NoiseProcess:
    """x_t = α(t) x_0 + σ(t) ε for t in [t_min, t_max]; clean data at t = 0 (σ = 0).

    A subclass gives :meth:`alpha_sigma` (and, for a continuous process,
    :meth:`alpha_sigma_derivatives` and :meth:`t_of_sigma`); the rest follows. Times are
    float64 tensors (the discrete chain's may be integer model timesteps).
    """

    name: str
    t_min: float
    """The smallest time a sampler evaluates the network at (the last step goes on to t = 0)."""
    t_max: float
    """The time sampling starts from."""
    variance_preserving = False
    """α² + σ² = 1 at every t: the process's x_t is already the sampler's."""
    sigma_data = 0.5
    """The data's standard deviation that EDM's loss weighting assumes (EDM's process sets its own)."""

    # ------------------------------------------------------------ the schedule

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) as float64 tensors of t's shape."""
        raise NotImplementedError

    def alpha_sigma_derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α'(t), σ'(t)) as float64 tensors."""
        raise NotImplementedError(f"process {self.name!r}: no time derivative (a discrete chain)")

    def t_of_sigma(self, sigma: np.ndarray | float) -> np.ndarray:
        """The time at EDM's noise level σ = σ(t)/α(t) = e^{-λ}, the inverse of :meth:`alpha_bar`
        (clamped to [t_min, t_max])."""
        raise NotImplementedError

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given as its time input at t."""
        return t

    def network_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is given as its image input at x_t (EDM's c_in x; else x)."""
        return x

    def network_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction the network's raw output stands for (EDM's c_skip x + c_out F; else itself)."""
        return output

    # ------------------------------------------------------------ derived

    def alpha_bar_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) = α²/(α² + σ²) in float64: the level of the sampler's variance-preserving view."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / (alpha**2 + sigma**2)

    def alpha_bar(self, t: np.ndarray | float) -> np.ndarray:
        """:meth:`alpha_bar_tensor` on host values: what step schedules and samplers read."""
        return self.alpha_bar_tensor(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): EDM's σ at t_min and t_max (the largest finite one where α reaches 0)."""
        ab = self.alpha_bar(np.array([self.t_min, self.t_max]))
        return float(math.sqrt((1 - ab[0]) / ab[0])), self._largest_sigma(float(ab[1]))

    def _largest_sigma(self, alpha_bar_max: float) -> float:
        return math.sqrt((1 - alpha_bar_max) / alpha_bar_max) if alpha_bar_max > 0 else float(MAX_SIGMA)

    def time_tensor(self, t: float, batch: int, device: torch.device) -> torch.Tensor:
        """t for a batch, float64."""
        return torch.full((batch,), float(t), dtype=torch.float64, device=device)

    def linspace_times(self, steps: int) -> np.ndarray:
        """``steps`` times evenly spaced from t_max towards 0, the first at t_max and the last
        step landing on t = 0 (Euler's rectified-flow schedule): t_max (1 - i/n)."""
        return self.t_max * (1 - np.arange(steps) / steps)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """√(α² + σ²): the process's x_t over the sampler's."""
        alpha, sigma = self.alpha_sigma(t)
        return (alpha**2 + sigma**2).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = α(t) x_0 + σ(t) ε."""
        alpha, sigma = self.alpha_sigma(t)
        return shaped(alpha, x0) * x0 + shaped(sigma, x0) * noise

    def velocity_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """u = dx_t/dt = α'(t) x_0 + σ'(t) ε, the flow-matching target."""
        d_alpha, d_sigma = self.alpha_sigma_derivatives(t)
        return shaped(d_alpha, x0) * x0 + shaped(d_sigma, x0) * noise

    def target(self, prediction: Prediction, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What a network predicting ``prediction`` regresses on: ε, x_0, v = α ε - σ x_0 or u."""
        if prediction is Prediction.EPS:
            return noise
        if prediction is Prediction.X0:
            return x0
        if prediction is Prediction.V:
            alpha, sigma = self.alpha_sigma(t)
            return shaped(alpha, x0) * noise - shaped(sigma, x0) * x0
        return self.velocity_target(x0, t, noise)

    def x0_eps(
        self, prediction: Prediction, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) at the process's x_t = ``x`` from a prediction (after :meth:`network_output`),
        per the module doc's table; float64 coefficients cast to x's dtype."""
        alpha, sigma = self.alpha_sigma(t)
        a, s = shaped(alpha, x), shaped(sigma, x)
        if prediction is Prediction.EPS:
            return (x - s * output) / a, output
        if prediction is Prediction.X0:
            return output, (x - a * output) / s
        if prediction is Prediction.V:
            return a * x - s * output, s * x + a * output
        d_alpha, d_sigma = self.alpha_sigma_derivatives(t)
        det = alpha * d_sigma - sigma * d_alpha
        da, ds, d = shaped(d_alpha, x), shaped(d_sigma, x), shaped(det, x)
        return (ds * x - s * output) / d, (a * output - da * x) / d

    def ode_velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's dx/dt = α' x̂_0 + σ' ε̂ at the process's x_t (module doc)."""
        d_alpha, d_sigma = self.alpha_sigma_derivatives(t)
        return shaped(d_alpha, x0) * x0 + shaped(d_sigma, x0) * eps

    def sde_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)²) of the forward SDE dx = f x dt + g dw (module doc), float64."""
        alpha, sigma = self.alpha_sigma(t)
        d_alpha, d_sigma = self.alpha_sigma_derivatives(t)
        f = d_alpha / alpha
        return f, 2 * sigma * d_sigma - 2 * f * sigma**2


MAX_SIGMA = 80.0
"""EDM's σ_max (Karras et al. 2022, Table 1): where step schedules in σ start on a process
whose α reaches 0 (σ = ∞ there)."""
