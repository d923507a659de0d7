"""The Gaussian process against independent float64 maths: Bayes' rule, the parameterisations,
the variational bound of an exact model (``exact_gaussian.GaussianData``), the training
losses and timestep sampling.
"""

import itertools
import math
import pickle

import mpmath
import numpy as np
import pytest
import torch

from device_copies import CrossDeviceOps
from exact_gaussian import GaussianData, alpha_bar_np
from torch import nn

from conftest import full_params, section
from diffusion.config import ConfigError, parse_params
from diffusion.process.gaussian import (
    GaussianDiffusion,
    Prediction,
    at_timesteps,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from diffusion.process.factory import make_diffusion
from diffusion.process.options import Loss, Variance, names
from diffusion.process.weighting import loss_weight
from diffusion.process.schedules import cosine_betas, linear_betas, make_betas
from diffusion.process.timestep_sampling import (
    TIMESTEP_SAMPLERS,
    LossAwareSampler,
    UniformSampler,
    make_timestep_sampler,
)

LN2 = math.log(2.0)

pytestmark = pytest.mark.usefixtures("single_thread")


def col(values, t, ndim):
    """values[t] as a float64 column broadcasting over ndim dims (the test's own at_timesteps)."""
    return torch.tensor(np.asarray(values)[t.numpy()], dtype=torch.float64).reshape(-1, *(1,) * (ndim - 1))


# --- forward process and posterior --------------------------------------------


def test_q_mean_variance_and_q_sample_closed_form():
    betas = linear_betas(1000)
    d = GaussianDiffusion(betas)
    x0, noise = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    ab = col(alpha_bar_np(betas), t, 4)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0, rtol=1e-12, atol=0)
    torch.testing.assert_close(var, (1 - ab).expand_as(x0), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_var, (1 - ab).log().expand_as(x0), rtol=1e-12, atol=0)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_posterior_is_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): multiply the two Gaussians in x_{t-1}."""
    betas = cosine_betas(1000)
    d = GaussianDiffusion(betas)
    t = torch.tensor([1, 2, 10, 500, 998, 999])
    x0 = torch.randn(6, 5, dtype=torch.float64)
    x_t = torch.randn(6, 5, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    for row, step in enumerate(t.tolist()):
        ab_prev = math.prod(1 - b for b in betas[:step])
        alpha = 1 - betas[step]
        # prior N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}); likelihood in x_{t-1}: N(x_t/√α, β/α)
        precision = 1 / (1 - ab_prev) + alpha / betas[step]
        want_var = 1 / precision
        weighted = math.sqrt(ab_prev) * x0[row] / (1 - ab_prev) + math.sqrt(alpha) * x_t[row] / betas[step]
        want_mean = want_var * weighted
        torch.testing.assert_close(mean[row], want_mean, rtol=1e-9, atol=1e-12)
        assert var[row].unique().tolist() == pytest.approx([want_var], rel=1e-9)
        assert log_var[row].unique().tolist() == pytest.approx([math.log(want_var)], rel=1e-9)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    d = GaussianDiffusion(linear_betas(1000))
    x0, x_t, t = torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)
    ab = alpha_bar_np(d.betas)
    beta_tilde_1 = d.betas[1] * (1 - ab[0]) / (1 - ab[1])
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(beta_tilde_1)))


def test_parameterisations_round_trip():
    betas = cosine_betas(1000)
    d = GaussianDiffusion(betas)
    t = torch.tensor([0, 1, 250, 998, 999])
    x0, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x_t = d.q_sample(x0, t, eps)
    ab = col(alpha_bar_np(betas), t, 4)
    v = d.process.target(Prediction.V, x0, t, eps)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=1e-12, atol=1e-12)
    close = {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, **close)
    for prediction, output in (("eps", eps), ("x0", x0), ("v", v)):
        pred_x0, pred_eps = GaussianDiffusion(betas, prediction=prediction).x0_eps_from_output(output, x_t, t)
        torch.testing.assert_close(pred_x0, x0, **close)
        torch.testing.assert_close(pred_eps, eps, **close)


# --- reverse process -----------------------------------------------------------


def constant_model(value, channels=None, var_value=None):
    """A model whose prediction is ``value`` everywhere (and ``var_value`` as its v channels)."""

    def model(x, t):
        out = torch.full_like(x, value)
        return out if var_value is None else torch.cat([out, torch.full_like(x, var_value)], dim=1)

    return model


def test_fixed_and_learned_variances():
    betas = linear_betas(1000)
    ab = alpha_bar_np(betas)
    ab_prev = np.append(1.0, ab[:-1])
    post = betas * (1 - ab_prev) / (1 - ab)
    x, t = torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([0, 1, 700])

    def p(variance, **kw):
        d = GaussianDiffusion(betas, variance=variance, loss="mse" if variance != "learned_range" else "hybrid")
        return d.p_mean_variance(constant_model(0.1, **kw), x, t)

    small, large = p("fixed_small"), p("fixed_large")
    want_small = [0.0, post[1], post[700]]
    want_large = [post[1], betas[1], betas[700]]
    assert small["variance"][:, 0, 0].tolist() == pytest.approx(want_small, rel=1e-12)
    assert small["log_variance"][:, 0, 0].tolist() == pytest.approx(np.log([post[1], post[1], post[700]]), rel=1e-12)
    assert large["variance"][:, 0, 0].tolist() == pytest.approx(want_large, rel=1e-12)
    assert large["log_variance"][:, 0, 0].tolist() == pytest.approx(np.log(want_large), rel=1e-12)
    clipped = np.log([post[1], post[1], post[700]])
    log_betas = np.log(betas[[0, 1, 700]])
    for v, want in ((1.0, log_betas), (-1.0, clipped), (0.0, (log_betas + clipped) / 2)):
        got = p("learned_range", var_value=v)
        assert got["log_variance"][:, 0, 0].tolist() == pytest.approx(want, rel=1e-12)
        torch.testing.assert_close(got["variance"], got["log_variance"].exp())


def test_clip_and_dynamic_threshold_then_eps_is_recomputed():
    betas = linear_betas(1000)
    d = GaussianDiffusion(betas, prediction="x0")
    t = torch.tensor([10, 400])
    x_t = torch.randn(2, 64, dtype=torch.float64)
    raw = torch.cat([torch.linspace(-3, 3, 64), torch.linspace(-0.5, 0.4, 64)]).reshape(2, 64).double()

    def model(x, t):
        return raw

    clipped = d.p_mean_variance(model, x_t, t, clip_denoised=True)
    torch.testing.assert_close(clipped["pred_x0"], raw.clamp(-1, 1))

    p = 0.9
    thresholded = d.p_mean_variance(model, x_t, t, threshold=p)
    s = np.maximum(np.percentile(raw.abs().numpy(), 100 * p, axis=1), 1.0)[:, None]
    want = np.clip(raw.numpy(), -s, s) / s
    assert s[0, 0] > 2 and s[1, 0] == 1.0  # one sample is rescaled, the other left alone
    torch.testing.assert_close(thresholded["pred_x0"], torch.from_numpy(want), rtol=1e-6, atol=1e-6)

    ab = col(alpha_bar_np(betas), t, 2)
    ab_prev = col(np.append(1.0, alpha_bar_np(betas)[:-1]), t, 2)
    beta = col(betas, t, 2)
    for out in (clipped, thresholded):
        # ε̂ is consistent with the clipped x̂_0, and the mean is the posterior mean of it (DDPM eq. 7)
        torch.testing.assert_close(out["pred_eps"], (x_t - ab.sqrt() * out["pred_x0"]) / (1 - ab).sqrt())
        want_mean = (beta * ab_prev.sqrt() * out["pred_x0"] + (1 - ab_prev) * (1 - beta).sqrt() * x_t) / (1 - ab)
        torch.testing.assert_close(out["mean"], want_mean)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variance": "learned_range", "loss": "mse"}, "loss: 'mse' does not train a learned variance"),
        ({"variance": "fixed_small", "loss": "hybrid"}, "loss: 'hybrid' trains a learned variance"),
        ({"variance": "fixed_large", "loss": "kl"}, "loss: 'kl' trains a learned variance"),
        ({"prediction": "noise"}, "prediction: got 'noise'; process 'ddpm' allows 'eps', 'x0', 'v'"),
        ({"variance": "learned"}, "variance: got 'learned'; allowed: 'fixed_small', 'fixed_large', 'learned_range'"),
        ({"loss": "l1"}, "loss: got 'l1'; allowed: 'mse', 'hybrid', 'kl'"),
    ],
)
def test_bad_combinations_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(linear_betas(100), **kwargs)


def test_other_errors():
    zero_snr = make_betas("cosine", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction: 'eps' cannot recover x0 when the last ᾱ is 0"):
        GaussianDiffusion(zero_snr)
    assert GaussianDiffusion(zero_snr, prediction="v").alphas_cumprod[-1] == 0
    for betas in ([], [0.0, 0.1], [0.5, 1.5]):
        with pytest.raises(ValueError, match="betas: need a non-empty 1-D array"):
            GaussianDiffusion(betas)
    d = GaussianDiffusion(linear_betas(100), variance="learned_range", loss="kl")
    x, t = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"model output: got shape \(2, 3, 4\); variance 'learned_range' needs \(2, 6"):
        d.p_mean_variance(constant_model(0.0), x, t)
    with pytest.raises(ValueError, match="threshold: got 0"):
        d.p_mean_variance(constant_model(0.0, var_value=0.0), x, t, threshold=0)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.6, 0.995, 1.0, 1.2])
def test_config_process_and_denoiser_accept_the_same_thresholds(p):
    """One rule (diffusion.process.options.check_threshold) behind params.yaml, the process and
    the samplers' denoiser: Imagen's percentile p with 0.5 < p <= 1, the same message for each."""
    from diffusion.sampling.denoiser import ClippedDenoiser, ModelDenoiser

    d = GaussianDiffusion(linear_betas(100))
    x, t = torch.randn(2, 3, 4), torch.tensor([1, 2])
    errors = []
    for check in (
        lambda: parse_params(full_params({"sample": {"threshold": p}})),
        lambda: d.p_mean_variance(constant_model(0.0), x, t, threshold=p),
        lambda: ClippedDenoiser(ModelDenoiser.for_process(constant_model(0.0), d), threshold=p),
    ):
        try:
            check()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err).removeprefix("params: ").removeprefix("sample."))
    want = None if 0.5 < p <= 1 else f"threshold: got {p!r}; allowed: a percentile p with 0.5 < p <= 1, or none"
    assert errors == [want] * 3


def test_config_and_process_accept_the_same_combinations():
    """One rule (diffusion.process.options.check_combination) behind both: every combination of
    prediction, variance, loss and zero terminal SNR is valid in params.yaml exactly when
    GaussianDiffusion accepts it, with the same message (params.yaml's keys under ``diffusion.``)."""
    accepted = 0
    for prediction, variance, loss, zero_snr in itertools.product(
        names(Prediction), names(Variance), names(Loss), (False, True)
    ):
        options = {"prediction": prediction, "variance": variance, "loss": loss}
        config_error = process_error = None
        try:
            parse_params(full_params({"diffusion": {**options, "zero_terminal_snr": zero_snr, "timesteps": 100}}))
        except ConfigError as err:
            config_error = str(err).removeprefix("params: ").replace("diffusion.", "")
        try:
            GaussianDiffusion(make_betas("cosine", 100, zero_terminal_snr=zero_snr), **options)
        except ValueError as err:
            process_error = str(err)
        assert config_error == process_error, (options, zero_snr)
        accepted += process_error is None
    # 4 (variance, loss) pairs (fixed with mse, learned_range with hybrid or kl) x 3 predictions,
    # and x 2 with zero terminal SNR (no eps)
    assert accepted == 4 * 3 + 4 * 2


def test_make_diffusion_builds_the_chain_params_yaml_names():
    """A diffusion section (params.yaml's, or a model file's) makes the chain it names; one
    without ``process`` (model files before there were others) is the discrete chain."""
    d = make_diffusion(dict(section("diffusion", schedule="linear", timesteps=200, prediction="v",
                                    variance="learned_range", loss="hybrid")))
    assert d.num_timesteps == 200 and d.prediction is Prediction.V and d.process.name == "ddpm"
    np.testing.assert_array_equal(d.betas, linear_betas(200))
    old = dict(section("diffusion", timesteps=50, zero_terminal_snr=True, prediction="x0"))
    old.pop("process")
    assert make_diffusion(old).alphas_cumprod[-1] == 0


# --- the schedule on the device ---------------------------------------------------


def test_at_timesteps_reads_float64_tables_and_casts_at_the_end():
    d = GaussianDiffusion(cosine_betas(1000))
    cpu = d.tables(torch.device("cpu"))
    assert d.tables(torch.device("cpu")) is cpu  # made once
    assert cpu.sqrt_alphas_cumprod.dtype == torch.float64
    np.testing.assert_array_equal(cpu.posterior_mean_coef2.numpy(), d.posterior_mean_coef2)
    t = torch.tensor([0, 17, 999])
    got = at_timesteps(cpu.sqrt_one_minus_alphas_cumprod, t, torch.zeros(3, 2, 5))
    assert got.dtype == torch.float32 and got.shape == (3, 2, 5)
    want = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod[[0, 17, 999]]).float()  # float64 math, one cast
    assert torch.equal(got[:, 0, 0], want) and torch.equal(got, want.reshape(3, 1, 1).expand(3, 2, 5))


def test_no_host_copy_per_call_after_the_tables_are_made():
    """On a device other than the host ('meta' stands in for CUDA, no GPU needed) the first call
    copies each schedule table once; every later training loss and p_mean_variance copies nothing."""
    d = GaussianDiffusion(cosine_betas(100), variance="learned_range", loss="hybrid")
    meta = torch.device("meta")
    x0, t = torch.zeros(4, 3, 8, 8, device=meta), torch.zeros(4, dtype=torch.long, device=meta)

    def model(x, t):
        return torch.cat([x, x], dim=1)

    copies = []
    for _ in range(3):
        with CrossDeviceOps() as ops:
            d.training_losses(model, x0, t, noise=torch.zeros_like(x0))
            d.p_mean_variance(model, x0, t, clip_denoised=True)
        copies.append(len(ops.ops))
    # once: 13 float64 schedule arrays and the noise levels (timesteps, ᾱ, log σ) that the one
    # output split reads (diffusion.process.discrete.DiscreteChain)
    assert copies == [16, 0, 0]
    assert d.tables(meta) is d.tables(meta) and d.tables(meta).log_betas.device == meta
    # the MLflow model pickles the process: as its constructor's arguments, no device tables
    clone = pickle.loads(pickle.dumps(d))
    assert clone._tables == {} and clone._process is None
    np.testing.assert_array_equal(clone.posterior_mean_coef1, d.posterior_mean_coef1)
    old = GaussianDiffusion.__new__(GaussianDiffusion)  # a whole __dict__, as older versions pickled it
    old.__setstate__({**vars(d), "_fixed_variance": None, "timestep_map": torch.arange(100)})
    assert (old.variance, old.loss) == (Variance.LEARNED_RANGE, Loss.HYBRID) and old.tables(meta) is not d.tables(meta)


# --- likelihood pieces -----------------------------------------------------------


def test_normal_kl_closed_form():
    # KL(N(1, 1) || N(0, 4)) = log 2 + (1 + 1)/8 - 1/2
    got = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert got.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    assert normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0)).item() == 0


def reference_bin_log_prob(k, mean, scale):
    """log P(bin k) for N(mean, scale²) with 60-digit mpmath (no underflow in either tail)."""
    mpmath.mp.dps = 60
    lo = -mpmath.inf if k == 0 else mpmath.mpf(k - 0.5) / 127.5 - 1
    hi = mpmath.inf if k == 255 else mpmath.mpf(k + 0.5) / 127.5 - 1
    a, b = (lo - mean) / scale, (hi - mean) / scale
    if a + b > 0:  # right of the mean, where Φ is near 1: P = Φ(-a) - Φ(-b)
        a, b = -b, -a
    return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.5), (0.97, 0.05), (-1.2, 0.3), (0.2, 0.002)])
def test_discretized_likelihood_sums_to_one_and_matches_erfc(mean, scale):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(
        grid, means=torch.full_like(grid, mean), log_scales=torch.full_like(grid, math.log(scale))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    for k in (0, 1, 100, 127, 128, 200, 254, 255):
        assert log_p[k].item() == pytest.approx(reference_bin_log_prob(k, mean, scale), rel=1e-6, abs=1e-9)


def test_discretized_likelihood_far_tail_and_finite_gradients():
    # a bin 20 standard deviations from the mean: log P ≈ -202, far below any 1e-12 clamp
    x = torch.tensor([191, 0, 255]) / 127.5 - 1
    means = torch.tensor([-0.5, 0.9, -0.9], requires_grad=True)
    log_scales = torch.full((3,), math.log(0.05), requires_grad=True)
    log_p = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    want = [reference_bin_log_prob(round((v + 1) * 127.5), m, 0.05) for v, m in zip(x.tolist(), means.tolist())]
    assert want[0] < -190
    assert log_p.tolist() == pytest.approx(want, rel=1e-4)
    log_p.sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


def test_prior_bpd_closed_form():
    d = GaussianDiffusion(linear_betas(1000))
    x0 = torch.rand(3, 2, 5, dtype=torch.float64) * 2 - 1
    ab = alpha_bar_np(d.betas)[-1]
    want = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2).mean(dim=(1, 2)) / LN2
    torch.testing.assert_close(d.prior_bpd(x0), want)


def quantised_gaussian(mu, s, shape, generator):
    """Data x_0 ~ N(mu, s²) rounded to the 256-level grid of [-1, 1] (edges clipped), and its
    exact -log2 P(x_0) per dimension: P(bin) from the Gaussian CDF in float64."""
    k = torch.round((mu + s * torch.randn(shape, generator=generator, dtype=torch.float64) + 1) * 127.5).clamp(0, 255)
    lo = torch.where(k == 0, -math.inf, (k - 0.5) / 127.5 - 1)
    hi = torch.where(k == 255, math.inf, (k + 0.5) / 127.5 - 1)
    prob = torch.special.ndtr((hi - mu) / s) - torch.special.ndtr((lo - mu) / s)
    return (k / 127.5 - 1).float(), -prob.log().mean(dim=1) / LN2


def test_vlb_of_the_exact_model_is_close_to_the_true_nll():
    """The variational bound (DDPM eq. 5) upper-bounds -log p(x_0). For the exact model with the exact
    reverse variance it is nearly tight. Measured (seed 0, 64 x 64 dims): true NLL 7.036 bits/dim
    (≈ ½log2(2πe s²) + log2(127.5) = 7.041), bound 7.065 learned, 7.150 fixed_large, 7.719 fixed_small
    (a too-small reverse variance costs ~10%). Slack: 4 standard errors of the per-image gap."""
    mu, s = 0.1, 0.25  # 3.6 σ from the edges: clipping to [-1, 1] is negligible
    betas = cosine_betas(1000)
    x0, true_nll = quantised_gaussian(mu, s, (64, 64), torch.Generator().manual_seed(0))
    entropy_approx = (0.5 * math.log(2 * math.pi * math.e * s**2) + math.log(127.5)) / LN2
    assert true_nll.mean().item() == pytest.approx(entropy_approx, abs=0.03)

    bounds = {}
    for variance, loss in (("learned_range", "kl"), ("fixed_large", "mse"), ("fixed_small", "mse")):
        d = GaussianDiffusion(betas, variance=variance, loss=loss)
        model = GaussianData(betas, mu, s, learned=variance == "learned_range")
        out = d.calc_bpd_loop(model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(1))
        assert out["vb"].shape == (64, 1000) and out["mse"].shape == (64, 1000)
        torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
        gap = out["total_bpd"].double() - true_nll
        slack = 4 * gap.std().item() / math.sqrt(len(gap))
        assert gap.mean().item() >= -slack, variance
        bounds[variance] = out["total_bpd"].mean().item()
        # ε̂ = E[ε|x_t] of the exact model misses by Var[ε|x_t] = ᾱ s²/(ᾱ s² + 1-ᾱ) (4096 draws per t)
        ab = torch.from_numpy(alpha_bar_np(betas))
        np.testing.assert_allclose(out["mse"].double().mean(0), ab * s**2 / (ab * s**2 + 1 - ab), rtol=0.15, atol=1e-6)
    nll = true_nll.mean().item()
    assert bounds["learned_range"] <= 1.01 * nll
    assert bounds["fixed_large"] <= 1.04 * nll
    assert bounds["learned_range"] < bounds["fixed_large"] < bounds["fixed_small"] <= 1.15 * nll


# --- training losses -------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_mse_of_the_true_target_is_zero(prediction):
    betas = linear_betas(1000)
    d = GaussianDiffusion(betas, prediction=prediction)
    x0, noise = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    t = torch.tensor([0, 3, 600, 999])
    ab = col(alpha_bar_np(betas), t, 3)
    target = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    losses = d.training_losses(lambda x, t: target, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse"}
    assert losses["mse"].shape == (4,) and losses["mse"].max().item() < 1e-20
    wrong = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=noise)
    torch.testing.assert_close(wrong["loss"], (target**2).mean(dim=(1, 2)))


class TinyLearned(nn.Module):
    """Mean channels a·x_t, variance channels b: one parameter for each half."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t):
        return torch.cat([self.a * x, self.b * torch.ones_like(x)], dim=1)


def test_hybrid_vb_trains_only_the_variance_and_kl_trains_both():
    betas = cosine_betas(100)
    x0 = (torch.randint(0, 256, (4, 2, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1).float()
    x0[0, 0, :2] = torch.tensor([-1.0, 1.0])  # edge bins in the decoder term
    t, noise = torch.tensor([0, 1, 50, 99]), torch.randn(4, 2, 8)

    hybrid = GaussianDiffusion(betas, variance="learned_range", loss="hybrid")
    model = TinyLearned()
    losses = hybrid.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    torch.testing.assert_close(losses["loss"], losses["mse"] + 1e-3 * 100 * losses["vb"])
    vb_alone = hybrid.vb_terms_bpd(model, x0, hybrid.q_sample(x0, t, noise), t)["output"]
    torch.testing.assert_close(losses["vb"], vb_alone)
    losses["vb"].sum().backward()
    assert (model.a.grad is None or model.a.grad.item() == 0) and model.b.grad.abs().item() > 1e-3
    model.zero_grad()
    losses = hybrid.training_losses(model, x0, t, noise=noise)
    losses["loss"].sum().backward()
    grad_a = model.a.grad.clone()
    model.zero_grad()
    hybrid.training_losses(model, x0, t, noise=noise)["mse"].sum().backward()
    torch.testing.assert_close(grad_a, model.a.grad)  # the mean learns from L_simple alone

    kl = GaussianDiffusion(betas, variance="learned_range", loss="kl")
    model = TinyLearned()
    losses = kl.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(losses["loss"], 100 * losses["vb"])
    losses["loss"].sum().backward()
    assert model.a.grad.abs().item() > 1e-3 and model.b.grad.abs().item() > 1e-3
    assert torch.isfinite(model.a.grad) and torch.isfinite(model.b.grad)


# --- timestep sampling ---------------------------------------------------------------


def test_uniform_sampler():
    sampler = make_timestep_sampler("uniform", GaussianDiffusion(linear_betas(50)))
    assert isinstance(sampler, UniformSampler) and set(TIMESTEP_SAMPLERS) == {"uniform", "loss-aware"}
    t, w = sampler.sample(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and w.dtype == torch.float32 and torch.all(w == 1)
    counts = torch.bincount(t, minlength=50).double()
    assert t.min() >= 0 and t.max() < 50 and (counts - 400).abs().max() < 5 * math.sqrt(400)
    t2, _ = sampler.sample(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and sampler.state_dict() == {}
    with pytest.raises(ValueError, match="timestep_sampler: got 'importance'; allowed: uniform, loss-aware"):
        make_timestep_sampler("importance", GaussianDiffusion(linear_betas(50)))


def test_loss_aware_sampler_follows_root_mean_square_loss():
    T = 5
    sampler = make_timestep_sampler("loss-aware", GaussianDiffusion(cosine_betas(20)[:5]))
    assert isinstance(sampler, LossAwareSampler) and sampler.num_timesteps == T
    rng = np.random.default_rng(0)
    history = rng.uniform(0.1, 2.0, size=(T, 11))
    for j in range(10):
        assert torch.allclose(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
        sampler.update(torch.arange(T), torch.from_numpy(history[:, j]).float())
    # an 11th loss at t=0 pushes out the oldest one
    sampler.update(torch.tensor([0]), torch.tensor([history[0, 10]]).float())
    kept = history[:, :10].astype(np.float32).astype(np.float64)
    kept[0] = np.append(kept[0, 1:], np.float32(history[0, 10]))
    rms = np.sqrt((kept**2).mean(axis=1))
    want = (1 - 1e-3) * rms / rms.sum() + 1e-3 / T
    np.testing.assert_allclose(sampler.probabilities().numpy(), want, rtol=1e-12)

    t, w = sampler.sample(50_000, "cpu", generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(w.numpy(), 1 / (T * want[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / len(t)
    assert np.abs(freq - want).max() < 5 * math.sqrt(0.25 / len(t))


def test_loss_aware_state_round_trip_resumes_identically():
    a = LossAwareSampler(4, history_per_term=2)
    a.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 2]), torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9]))
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    b = LossAwareSampler(4, history_per_term=2)
    b.load_state_dict(state)
    a.update(torch.tensor([3]), torch.tensor([100.0]))  # the saved state is a copy
    b.update(torch.tensor([3]), torch.tensor([100.0]))
    ta, wa = a.sample(64, "cpu", generator=torch.Generator().manual_seed(2))
    tb, wb = b.sample(64, "cpu", generator=torch.Generator().manual_seed(2))
    assert torch.equal(ta, tb) and torch.equal(wa, wb) and not torch.all(wa == 1)
    with pytest.raises(ValueError, match=r"timestep sampler state: history must have shape \(5, 10\)"):
        LossAwareSampler(5).load_state_dict(state)
    with pytest.raises(ValueError, match="the uniform sampler has none"):
        UniformSampler(4).load_state_dict(state)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weighted_loss_is_the_clamped_snr_times_the_x0_error(prediction):
    """Min-SNR-γ (Hang et al. 2023): whatever the parameterisation, the weighted L_simple of a
    network whose output means the estimate x̂_0 is min(SNR_t, γ) |x̂_0 - x_0|² (per pixel),
    and ``mse`` stays the unweighted target MSE: SNR_t, SNR_t + 1 or 1 times the x_0-MSE."""
    gamma = 5.0
    d = GaussianDiffusion(cosine_betas(1000), prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 50, 200, 400, 700, 999])  # SNR from ~1e4 down to ~2e-5: both sides of gamma
    ab = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    output = {"eps": eps_hat, "x0": x0_hat, "v": ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat}[prediction]

    terms = d.training_losses(lambda x, s: output, x0, t, noise=noise, mse_weight=loss_weight("min-snr", d.process, d.prediction, t, gamma=gamma))
    snr = (ab / (1 - ab)).flatten()
    x0_mse = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"], snr.clamp(max=gamma) * x0_mse, rtol=1e-9, atol=0)
    target_factor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    assert torch.allclose(terms["mse"], target_factor * x0_mse, rtol=1e-9, atol=0)
    assert (snr > gamma).any() and (snr < gamma).any()
