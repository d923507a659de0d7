"""Loss weightings by name: w(t) on the x_0 error, written on the MSE of what the network predicts.

Every objective of the papers is a weighted x_0 error E[w(λ) |x̂_0 - x_0|²] (Kingma & Gao
2023, "Understanding Diffusion Objectives", §2): with SNR = α²/σ² = ᾱ/(1-ᾱ) and x_t fixed,
the MSE of each prediction is the x_0 error times

    eps: SNR      x0: 1      v: SNR + 1 (α² + σ² = 1)      velocity: (α' - σ' α/σ)²

so a weighting w on the x_0 error is ``mse_weight`` = w / factor on the prediction's MSE.
The weightings (:data:`LOSS_WEIGHTINGS`):

* ``simple``: w = the prediction's own factor, L_simple on its target (Ho et al. 2020 eq. 14);
* ``min-snr``: w = min(SNR, γ) (Hang et al. 2023, §3.4);
* ``edm``: w = λ(σ) = (σ² + σ_d²)/(σ σ_d)², σ = e^{-λ}, σ_d the process's ``sigma_data``
  (Karras et al. 2022, Table 1);
* ``flow``: w = the velocity's factor, the flow-matching objective |û - u|² (Lipman et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.process.base import NoiseProcess
from diffusion.process.options import Prediction


def prediction_factor(prediction: Prediction, process: NoiseProcess, t: torch.Tensor) -> torch.Tensor:
    """The MSE of ``prediction`` over the x_0 error at the same x_t (module doc), float64 [B]."""
    ab = process.alpha_bar_tensor(t)
    snr = ab / (1 - ab)
    if prediction is Prediction.EPS:
        return snr
    if prediction is Prediction.X0:
        return torch.ones_like(snr)
    if prediction is Prediction.V:  # a variance-preserving process's (α² + σ² = 1)
        return snr + 1
    alpha, sigma = process.alpha_sigma(t)
    d_alpha, d_sigma = process.alpha_sigma_derivatives(t)
    return (d_alpha - d_sigma * alpha / sigma) ** 2


def _min_snr(process, prediction, t, gamma):
    ab = process.alpha_bar_tensor(t)
    return (ab / (1 - ab)).clamp(max=gamma)


def _edm(process, prediction, t, gamma):
    ab = process.alpha_bar_tensor(t)
    sigma2, sd2 = (1 - ab) / ab, process.sigma_data**2
    return (sigma2 + sd2) / (sigma2 * sd2)


LOSS_WEIGHTINGS: dict[str, Callable[..., torch.Tensor] | None] = {
    "simple": None,
    "min-snr": _min_snr,
    "edm": _edm,
    "flow": lambda process, prediction, t, gamma: prediction_factor(Prediction.VELOCITY, process, t),
}
"""name -> w(process, prediction, t, γ) on the x_0 error; None: the prediction's own (no weight)."""


def loss_weight(
    name: str, process: NoiseProcess, prediction: Prediction, t: torch.Tensor, *, gamma: float | None = None
) -> torch.Tensor | None:
    """``mse_weight`` [B] (float64) of the weighting ``name`` for a network predicting
    ``prediction``, or None for ``simple``."""
    weight = LOSS_WEIGHTINGS[name]
    if weight is None:
        return None
    return weight(process, prediction, t, gamma) / prediction_factor(prediction, process, t)
