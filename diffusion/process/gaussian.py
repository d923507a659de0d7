"""The Gaussian diffusion process: forward q, reverse p, training losses and the variational bound.

One class, :class:`GaussianDiffusion`, holds the schedule in float64 numpy (computed
once) and every formula of DDPM (Ho et al. 2020) and improved DDPM (Nichol &
Dhariwal 2021) that acts on it. The schedule becomes float64 tensors once per device
(:meth:`GaussianDiffusion.tables`), and :func:`at_timesteps` is the one place a per-timestep
quantity is read from them: an index and a cast on the device, never a host copy.
Timestep index ``t`` runs over 0..T-1 (the papers' 1..T).

The options (:class:`Prediction`, :class:`Variance`, :class:`Loss`) and the rules that
combine them live in :mod:`diffusion.process.options`, shared with the config.

The model is called as ``model(x_t, t, **model_kwargs)``; samplers read the chain as a
:class:`~diffusion.process.discrete.DiscreteChain` (:attr:`GaussianDiffusion.process`), whose
step schedules pick the timesteps they evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from diffusion.process.discrete import DiscreteChain
from diffusion.process.options import Loss, Prediction, Variance, check_combination, check_threshold, parse, process_option

Model = Callable[..., torch.Tensor]

HYBRID_LAMBDA = 1e-3
"""λ of L_hybrid = L_simple + λ L_vlb (improved DDPM §3.1)."""


# ---------------------------------------------------------------------------
# Small functions
# ---------------------------------------------------------------------------


def at_timesteps(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` of a float64 schedule tensor on ``t``'s device (one of
    :meth:`GaussianDiffusion.tables`), indexed in float64 and cast to ``like``'s dtype at
    the end, broadcast from [B, 1, ..., 1] to ``like``'s shape: a pure device op."""
    out = values[t].to(like.dtype)
    return out.reshape(-1, *(1,) * (like.ndim - 1)).expand(like.shape)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:
    ½(-1 + logvar2 - logvar1 + e^(logvar1-logvar2) + (mean1-mean2)² e^-logvar2)
    (the Gaussian KL that DDPM eq. 5 is made of)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor):
    """log p(x) of data on the 256-level grid of [-1, 1] under N(means, e^(2 log_scales))
    integrated over each bin, in nats: DDPM eq. 13 (§3.3).

    A bin is [x - 1/255, x + 1/255]; the edge bins extend to -∞ (x = -1) and +∞ (x = 1).
    log(Φ(b) - Φ(a)) is computed in log space from ``log_ndtr`` on the side of 0 where
    both tails are small, so it stays accurate when the bin is far in a tail.
    """
    inv_scale = torch.exp(-log_scales)
    lower = torch.where(x < -0.999, -math.inf, (x - means - 1.0 / 255) * inv_scale)
    upper = torch.where(x > 0.999, math.inf, (x - means + 1.0 / 255) * inv_scale)
    # Φ(b) - Φ(a) = Φ(-a) - Φ(-b): use the mirror image when the bin lies right of the mean.
    mirror = lower + upper > 0
    a = torch.where(mirror, -upper, lower)
    b = torch.where(mirror, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample,
    s = max(percentile_p(|x0|), 1); clip x0 to [-s, s] and divide by s. Which p are valid, and
    why: :func:`~diffusion.process.options.check_threshold`."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), percentile, dim=1)
    s = s.clamp(min=1.0).to(x0.dtype).reshape(-1, *(1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward process q(x_t | x_0) and reverse process p_θ(x_{t-1} | x_t) over a β schedule.

    ``prediction`` (:class:`Prediction`), ``variance`` (:class:`Variance`) and ``loss``
    (:class:`Loss`) are checked by :func:`~diffusion.process.options.check_combination`,
    the rule params.yaml is validated with.
    """

    # The float64 arrays per timestep that tables(device) holds as tensors for at_timesteps().
    _TABLES = (
        "log_betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "one_minus_alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_large_variance",
        "fixed_large_log_variance",
    )
    # fixed variance -> (variance, log variance) of p_θ(x_{t-1} | x_t), from a device's tables
    _FIXED_VARIANCE = {
        Variance.FIXED_SMALL: lambda s: (s.posterior_variance, s.posterior_log_variance_clipped),
        Variance.FIXED_LARGE: lambda s: (s.fixed_large_variance, s.fixed_large_log_variance),
    }

    # loss -> per-example loss from {"mse", "vb"}; T·vb is the one-sample estimate of
    # L_vlb = Σ_t L_t under uniform t (as improved-diffusion's rescaled losses)
    _LOSSES = {
        Loss.MSE: lambda d, terms: terms["mse"],
        Loss.HYBRID: lambda d, terms: terms["mse"] + HYBRID_LAMBDA * d.num_timesteps * terms["vb"],
        Loss.KL: lambda d, terms: d.num_timesteps * terms["vb"],
    }

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss: str = "mse",
    ):
        self.prediction = parse(Prediction, process_option("ddpm", "prediction", getattr(prediction, "value", prediction)), "prediction")
        self.variance = parse(Variance, variance, "variance")
        self.loss = parse(Loss, loss, "loss")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas: need a non-empty 1-D array with 0 < β <= 1")
        self.betas = betas
        self.num_timesteps = T = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        check_combination(self.prediction, self.variance, self.loss, zero_terminal_snr=self.alphas_cumprod[-1] == 0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        self.log_betas = np.log(betas)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t)  (DDPM eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / self.one_minus_alphas_cumprod
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / self.one_minus_alphas_cumprod
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / self.one_minus_alphas_cumprod
        # β̃_0 = 0: like improved-diffusion, use β̃_1 in its place where a log is taken (β_0 if T = 1)
        floor = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(floor, self.posterior_variance[1:]))
        self.fixed_large_variance = np.append(floor, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._tables: dict[torch.device, SimpleNamespace] = {}
        self._process: DiscreteChain | None = None

    def tables(self, device: torch.device) -> SimpleNamespace:
        """The schedule on ``device`` (a tensor's device): each array of ``_TABLES`` as a
        float64 tensor. Made on the first call for a device and the same objects after, so no
        step of sampling or training copies from the host."""
        if device not in self._tables:
            self._tables[device] = SimpleNamespace(
                **{name: torch.from_numpy(getattr(self, name)).to(device) for name in self._TABLES},
            )
        return self._tables[device]

    _STATE = ("betas", "prediction", "variance", "loss")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (inside the MLflow model, a deepcopy) as its constructor's arguments: no
        device tables, which are made again on the loader's devices."""
        return {name: getattr(self, name) for name in self._STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuilt from the constructor's arguments; a whole ``__dict__`` pickled by an older
        version holds them too (and an identity ``timestep_map``, ignored), so models logged
        before still load."""
        self.__init__(state["betas"], prediction=state["prediction"], variance=state["variance"], loss=state["loss"])

    @property
    def process(self) -> DiscreteChain:
        """The chain at its model timesteps as a :class:`~diffusion.process.base.NoiseProcess`
        (what samplers and step schedules read), made once."""
        if self._process is None:
            self._process = DiscreteChain(self.alphas_cumprod)
        return self._process

    # -- forward process ----------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) (DDPM eq. 4): (mean, variance, log_variance)."""
        s = self.tables(t.device)
        mean = at_timesteps(s.sqrt_alphas_cumprod, t, x0) * x0
        variance = at_timesteps(s.one_minus_alphas_cumprod, t, x0)
        return mean, variance, at_timesteps(s.log_one_minus_alphas_cumprod, t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. 4)."""
        s = self.tables(t.device)
        sqrt_ab = at_timesteps(s.sqrt_alphas_cumprod, t, x0)
        sqrt_one_minus_ab = at_timesteps(s.sqrt_one_minus_alphas_cumprod, t, x0)
        return sqrt_ab * x0 + sqrt_one_minus_ab * noise

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """μ̃_t(x_t, x_0) = β_t √ᾱ_{t-1}/(1-ᾱ_t) x_0 + (1-ᾱ_{t-1}) √α_t/(1-ᾱ_t) x_t (DDPM eq. 7)."""
        s = self.tables(t.device)
        return at_timesteps(s.posterior_mean_coef1, t, x_t) * x0 + at_timesteps(s.posterior_mean_coef2, t, x_t) * x_t

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I), β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t (DDPM eq. 6-7):
        (mean, variance, log_variance_clipped), the log using β̃_1 at t = 0."""
        s = self.tables(t.device)
        return (
            self.q_posterior_mean(x0, x_t, t),
            at_timesteps(s.posterior_variance, t, x_t),
            at_timesteps(s.posterior_log_variance_clipped, t, x_t),
        )

    # -- parameterisations (Salimans & Ho 2022, §4) ---------------------------

    def predict_eps_from_x0(self, x_t, t, x0):
        """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)."""
        s = self.tables(t.device)
        sqrt_ab = at_timesteps(s.sqrt_alphas_cumprod, t, x_t)
        sqrt_one_minus_ab = at_timesteps(s.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (x_t - sqrt_ab * x0) / sqrt_one_minus_ab

    def x0_eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(pred_x0, pred_eps) from the model's first C channels, per ``prediction``: the
        process's one output split (:meth:`~diffusion.process.base.NoiseProcess.x0_eps`) at
        the model timestep of index t."""
        return self.process.x0_eps(self.prediction, output, x_t, t)

    # -- reverse process ----------------------------------------------------

    def _split_output(self, output: torch.Tensor, x_t: torch.Tensor):
        """(the prediction, the variance values v or None) from a model output."""
        channels = x_t.shape[1]
        learned = self.variance is Variance.LEARNED_RANGE
        expected = (x_t.shape[0], 2 * channels if learned else channels, *x_t.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"model output: got shape {tuple(output.shape)}; variance {self.variance.value!r} needs {expected}"
            )
        return tuple(output.split(channels, dim=1)) if learned else (output, None)

    def _model_variance(self, var_values: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor):
        """(variance, log_variance) of p_θ(x_{t-1} | x_t): fixed (β̃_t or β_t, β̃_1 at t = 0) or, for
        ``learned_range``, log Σ = ½(v+1) log β_t + ½(1-v) log β̃_t (improved DDPM eq. 15)."""
        s = self.tables(t.device)
        if var_values is None:
            variance, log_variance = self._FIXED_VARIANCE[self.variance](s)
            return at_timesteps(variance, t, x_t), at_timesteps(log_variance, t, x_t)
        frac = (var_values + 1) / 2
        max_log, min_log = at_timesteps(s.log_betas, t, x_t), at_timesteps(s.posterior_log_variance_clipped, t, x_t)
        log_variance = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_variance), log_variance

    def _p_from_output(self, output, x_t, t, *, clip_denoised=False, threshold=None) -> dict[str, torch.Tensor]:
        prediction, var_values = self._split_output(output, x_t)
        variance, log_variance = self._model_variance(var_values, x_t, t)
        pred_x0, pred_eps = self.x0_eps_from_output(prediction, x_t, t)
        if threshold is not None or clip_denoised:
            pred_x0 = dynamic_threshold(pred_x0, threshold) if threshold is not None else pred_x0.clamp(-1, 1)
            pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        return {
            "mean": self.q_posterior_mean(pred_x0, x_t, t),
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def p_mean_variance(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = False,
        threshold: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t-1} | x_t) = N(μ̃_t(x̂_0, x_t), Σ_θ) (DDPM eq. 1, improved DDPM eq. 15):
        dict(mean, variance, log_variance, pred_x0, pred_eps).

        ``clip_denoised`` clamps x̂_0 to [-1, 1]; ``threshold=p`` applies
        :func:`dynamic_threshold` instead. Either way ε̂ is recomputed from the clipped x̂_0.
        """
        check_threshold(threshold)
        output = model(x_t, t, **(model_kwargs or {}))
        return self._p_from_output(output, x_t, t, clip_denoised=clip_denoised, threshold=threshold)

    # -- losses and the variational bound ------------------------------------

    def _vb_bpd(self, p: dict[str, torch.Tensor], x0, x_t, t) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for t > 0 and the decoder
        L_0 = -log p_θ(x_0|x_1) at t = 0 (DDPM eq. 5 and §3.3), in bits/dim, per example."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def vb_terms_bpd(self, model: Model, x0, x_t, t, *, model_kwargs=None, clip_denoised=False):
        """The term of the variational bound at t, in bits/dim: dict(output [B], pred_x0)."""
        p = self.p_mean_variance(model, x_t, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
        return {"output": self._vb_bpd(p, x0, x_t, t), "pred_x0": p["pred_x0"]}

    def training_losses(
        self, model: Model, x0, t, *, model_kwargs=None, noise=None, mse_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-example training terms [B]: ``mse`` (L_simple, DDPM eq. 14, on the target of
        ``prediction``), ``vb`` (L_t in bits/dim, when the variance is learned) and ``loss``,
        in which L_simple is multiplied by ``mse_weight`` [B] if given (:mod:`~diffusion.process.weighting`;
        ``mse`` itself is reported unweighted):

        * mse: L_simple;
        * hybrid: L_simple + λ T L_t, λ = 1e-3, with the mean detached in L_t so the
          bound trains only the variance (improved DDPM §3.1);
        * kl: T L_t, the unbiased estimate of L_vlb (improved DDPM eq. 4-5).

        T L_t is the one-sample estimate of Σ_t L_t under uniform t (improved-diffusion's
        rescaled losses); ``vb`` itself is reported unscaled.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t, **(model_kwargs or {}))
        prediction, var_values = self._split_output(output, x_t)
        target = self.process.target(self.prediction, x0, t, noise)
        terms = {"mse": mean_flat((target - prediction) ** 2)}
        weighted = terms if mse_weight is None else {"mse": terms["mse"] * mse_weight}
        if var_values is not None:
            mean_part = prediction.detach() if self.loss is Loss.HYBRID else prediction
            p = self._p_from_output(torch.cat([mean_part, var_values], dim=1), x_t, t)
            terms["vb"] = weighted["vb"] = self._vb_bpd(p, x0, x_t, t)
        terms["loss"] = self._LOSSES[self.loss](self, weighted)
        return terms

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (DDPM eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        zero = torch.zeros_like(mean)
        return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        *,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The whole variational bound L_T + Σ_t L_{t-1} + L_0 (DDPM eq. 5) in bits/dim, one
        x_t sample per term: dict(total_bpd [B], prior_bpd [B], vb [B, T], mse [B, T]).

        Column t of ``vb`` is the term at index t (the decoder at t = 0); ``mse`` is the
        ε-prediction error there. Noise is drawn from ``generator``.
        """
        batch = x0.shape[0]
        vb, mse = [], []
        for step in tqdm(range(self.num_timesteps), disable=not progress, desc="bpd"):
            t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            out = self.vb_terms_bpd(model, x0, x_t, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
            vb.append(out["output"])
            mse.append(mean_flat((self.predict_eps_from_x0(x_t, t, out["pred_x0"]) - noise) ** 2))
        vb_terms = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x0)
        return {
            "total_bpd": vb_terms.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_terms,
            "mse": torch.stack(mse, dim=1),
        }
