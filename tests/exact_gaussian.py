"""The exact denoiser of Gaussian data, the reference that test_gaussian.py and
test_samplers.py check the library against.

For data x_0 ~ N(mu, s² I), x_t = √ᾱ x_0 + √(1-ᾱ) ε is jointly Gaussian with x_0, so
E[x_0|x_t] = mu + √ᾱ s²/(ᾱ s² + 1-ᾱ) (x_t - √ᾱ mu) and Var[x_0|x_t] = s²(1-ᾱ)/(ᾱ s² + 1-ᾱ).
"""

import math

import numpy as np
import torch


class GaussianData:
    """The exact model for x_0 ~ N(mu, s² I) under the schedule ``betas`` (the model's own,
    full-length schedule: it is called with original timesteps).

    Returns the exact ε, x_0 or v; with ``learned=True`` it appends the v of improved DDPM
    eq. 15 that gives the exact reverse variance Var[x_{t-1}|x_t] = β̃_t + c1_t² Var[x_0|x_t]
    (c1_t = β_t √ᾱ_{t-1}/(1-ᾱ_t)), which makes the 1-step reverse kernel exact.
    """

    def __init__(self, betas, mu, s, prediction="eps", learned=False):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alpha_bar = np.cumprod(1.0 - self.betas)
        self.alpha_bar_prev = np.append(1.0, self.alpha_bar[:-1])
        self.mu, self.s, self.prediction, self.learned = mu, s, prediction, learned
        self.calls = []

    def _at(self, values, t, x):
        return torch.from_numpy(values)[t.cpu()].reshape(-1, *(1,) * (x.ndim - 1))

    def __call__(self, x, t):
        self.calls.append(t.clone())
        xd, s2 = x.double(), self.s**2
        ab = self._at(self.alpha_bar, t, x)
        x0 = self.mu + ab.sqrt() * s2 / (ab * s2 + 1 - ab) * (xd - ab.sqrt() * self.mu)
        eps = (xd - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        if self.learned:
            beta, ab_prev = self._at(self.betas, t, x), self._at(self.alpha_bar_prev, t, x)
            post = beta * (1 - ab_prev) / (1 - ab)
            c1 = beta * ab_prev.sqrt() / (1 - ab)
            var = post + c1**2 * s2 * (1 - ab) / (ab * s2 + 1 - ab)
            first_post = self.betas[1] * (1 - self.alpha_bar[0]) / (1 - self.alpha_bar[1])
            min_log = torch.where(ab_prev == 1, math.log(first_post), post.log())
            frac = (var.log() - min_log) / (beta.log() - min_log)
            out = torch.cat([out, (2 * frac - 1).expand_as(out)], dim=1)
        return out.to(x.dtype)


def alpha_bar_np(betas):
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
