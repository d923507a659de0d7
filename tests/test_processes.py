"""The noise processes (ddpm, vp linear and cosine, edm, flow) against closed forms and known laws.

Data whose answers are known exactly: one Gaussian N(mu, s² I) and the two-class mixture of
:mod:`exact_mixture` (classes N(mu_k, s² I), equal weights). In the process's own coordinates
x_t = α x_0 + σ ε, class k gives x_t ~ N(α mu_k, v I), v = α² s² + σ², so

    p(k | x_t)   = softmax_k(-|x_t - α mu_k|²/(2v))
    E[x_0 | x_t] = Σ_k p(k | x_t) (mu_k + α s²/v (x_t - α mu_k))         (the exact denoiser)
    ∇log p_t     = -Σ_k p(k | x_t) (x_t - α mu_k)/v,   ε̂ = -σ ∇log p_t     (Tweedie)

and the probability-flow ODE's velocity is f x - ½ g² ∇log p_t (Song et al. 2021, eq. 13).

Tolerances: float64 identities to 1e-10 relative (each formula is a few operations on values
of order 1, conditioning well under 1e3: rounding stays below 1e-13); sample moments within 5
standard errors (a fixed seed, and a 6e-7 chance per check of failing under another seed);
distribution tests at p > 1e-3; orders of convergence within ±0.3 of the theory (the fitted
slopes over NFE 40..160 sit within 0.25 of it: the next-order term still bends them at NFE 40,
while a solver one order off is a whole unit away).
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import full_params
from exact_mixture import MixtureDenoiser
from scipy import stats
from scipy.integrate import solve_ivp
from tiny_unet import tiny_unet

from diffusion.config import ConfigError, parse_params
from diffusion.process.continuous import ContinuousDiffusion, EDMProcess, FlowProcess, VPProcess
from diffusion.process.discrete import DiscreteChain
from diffusion.process.factory import make_diffusion
from diffusion.process.options import PROCESS_OPTIONS, Prediction, Process
from diffusion.process.schedules import make_betas
from diffusion.process.timestep_sampling import NoiseLevelSampler
from diffusion.process.weighting import loss_weight
from diffusion.sampling import specs as sampler_specs
from diffusion.sampling.denoiser import ModelDenoiser
from diffusion.sampling.sample import SAMPLER_FUNCTIONS
from diffusion.sampling.steps import make_steps
from diffusion.sampling.walk import half_log_snr
from diffusion.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

BETAS = make_betas("linear", 1000)
PROCESSES = {
    "ddpm": DiscreteChain(np.cumprod(1 - BETAS)),
    "vp-linear": VPProcess("linear"),
    "vp-cosine": VPProcess("cosine"),
    "edm": EDMProcess(),
    "flow": FlowProcess(),
}
CONTINUOUS = [name for name in PROCESSES if name != "ddpm"]
MU, S = 0.3, 0.5
MEANS = [[-0.6, 0.2, 0.4, -0.1], [0.5, -0.3, 0.0, 0.6]]  # the mixture of test_solvers.py: two classes, std 0.3
MIXTURE_S = 0.3
DATA = {"gaussian": ([[MU] * 4], S), "mixture": (MEANS, MIXTURE_S)}
Z = 5.0  # standard errors a sample moment may stray


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tensor(values):
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def process_name(name):
    return name.split("-")[0]


def allowed(name, key):
    return PROCESS_OPTIONS[Process(process_name(name))][key]


def times(process, fractions=(0.0, 0.1, 0.5, 0.9, 1.0)):
    """Times spread over [t_min, t_max] (the discrete chain's: whole timesteps and between)."""
    t = process.t_min + (process.t_max - process.t_min) * np.asarray(fractions)
    return tensor(np.round(t, 1) if isinstance(process, DiscreteChain) else t)


# ---------------------------------------------------------------- closed forms, written out here


def closed_alpha_sigma(name, t):
    """(α(t), σ(t)) as each paper writes them, float64 numpy."""
    t = np.asarray(t, dtype=np.float64)
    if name == "ddpm":  # ᾱ at whole timesteps (DDPM eq. 4): the product of 1 - β
        ab = np.cumprod(1 - BETAS)[t.astype(int)]
        return np.sqrt(ab), np.sqrt(1 - ab)
    if name == "vp-linear":  # Song et al. 2021 eq. 33, β from 0.1 to 20
        alpha = np.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    elif name == "vp-cosine":  # improved DDPM eq. 17 in continuous time, s = 0.008
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)  # noqa: E731
        alpha = np.clip(f(t), 0, None) / f(0.0)
        alpha = np.where(t == 1, 0.0, alpha)  # cos(π/2) = 0 exactly
    elif name == "edm":
        return np.ones_like(t), t
    else:
        return 1 - t, t
    return alpha, np.sqrt(1 - alpha**2)


def posterior(process, t, x, means, s):
    """(x̂_0, ε̂, ∇log p_t) of the mixture at the process's x_t = ``x`` [B, D] (module doc), float64."""
    alpha, sigma = (a.reshape(-1, 1, 1) for a in process.alpha_sigma(t))
    means = tensor(means)[None]  # [1, K, D]
    v = alpha**2 * s**2 + sigma**2
    diff = x[:, None] - alpha * means  # [B, K, D]
    p = torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * v), dim=1)  # [B, K, 1]
    x0 = (p * (means + alpha * s**2 / v * diff)).sum(1)
    score = -(p * diff / v).sum(1)
    return x0, -sigma[:, 0] * score, score


def exact_prediction(process, prediction, t, x0_hat, eps_hat):
    """What a network predicting ``prediction`` outputs at the exact x̂_0 and ε̂ (the targets'
    definitions: ε, x_0, v = α ε - σ x_0, u = α' x_0 + σ' ε)."""
    alpha, sigma = (a[:, None] for a in process.alpha_sigma(t))
    if prediction is Prediction.EPS:
        return eps_hat
    if prediction is Prediction.X0:
        return x0_hat
    if prediction is Prediction.V:
        return alpha * eps_hat - sigma * x0_hat
    d_alpha, d_sigma = (a[:, None] for a in process.alpha_sigma_derivatives(t))
    return d_alpha * x0_hat + d_sigma * eps_hat


def draw_data(data, n, seed):
    """n draws [n, D] of the data ``data`` (equal class weights) and their classes."""
    means, s = DATA[data]
    g = gen(seed)
    k = torch.randint(0, len(means), (n,), generator=g)
    return tensor(means)[k] + s * torch.randn(n, len(means[0]), generator=g, dtype=torch.float64), k


# ---------------------------------------------------------------- 1. the process and the exact denoiser


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("name", list(PROCESSES))
def test_marginal_of_x_t_has_the_closed_form_moments(name, data):
    """α(t), σ(t) are their papers' closed forms (1e-10 relative), and q_sample's x_t of the
    data has mean α E[x_0] and variance α² Var[x_0] + σ² per dimension (Var[x_0] = s² plus the
    class means' variance for the mixture): sample mean and variance of 20000 draws within 5
    standard errors (the variance's from the sample's fourth moment: the mixture is not Gaussian)."""
    process = PROCESSES[name]
    t = times(process)
    alpha, sigma = process.alpha_sigma(t)
    whole = t == t.round()
    ref_alpha, ref_sigma = closed_alpha_sigma(name, t[whole].numpy() if name == "ddpm" else t.numpy())
    np.testing.assert_allclose(alpha[whole].numpy() if name == "ddpm" else alpha.numpy(), ref_alpha, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(sigma[whole].numpy() if name == "ddpm" else sigma.numpy(), ref_sigma, rtol=1e-10, atol=1e-15)
    means, s = DATA[data]
    mean_x0 = tensor(means).mean(0)
    var_x0 = s**2 + tensor(means).var(0, unbiased=False)
    n = 20000
    for i in range(len(t)):
        x0, _ = draw_data(data, n, seed=i)
        noise = torch.randn(x0.shape, generator=gen(100 + i), dtype=torch.float64)
        x_t = process.q_sample(x0, t[i].repeat(n), noise)
        mean, var = alpha[i] * mean_x0, alpha[i] ** 2 * var_x0 + sigma[i] ** 2
        centred = x_t - x_t.mean(0)
        m4 = (centred**4).mean(0)
        assert ((x_t.mean(0) - mean).abs() <= Z * (var / n).sqrt()).all(), (t[i], x_t.mean(0), mean)
        assert ((x_t.var(0) - var).abs() <= Z * ((m4 - var**2) / n).sqrt()).all(), (t[i], x_t.var(0), var)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_time_derivatives_are_those_of_alpha_and_sigma(name):
    """alpha_sigma_derivatives against central differences of alpha_sigma, h = 1e-5 (t_max
    units): the difference's error is h²/6 |f'''| + ε|f|/h, below 1e-8 for these smooth
    schedules away from t = 0 and from α = 0; asserted to 1e-6 relative to the derivative's scale."""
    process = PROCESSES[name]
    h = 1e-5 * process.t_max
    t = times(process, (0.1, 0.3, 0.5, 0.7, 0.9))
    d_alpha, d_sigma = process.alpha_sigma_derivatives(t)
    (a_up, s_up), (a_down, s_down) = process.alpha_sigma(t + h), process.alpha_sigma(t - h)
    np.testing.assert_allclose(d_alpha.numpy(), ((a_up - a_down) / (2 * h)).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_sigma.numpy(), ((s_up - s_down) / (2 * h)).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("name", list(PROCESSES))
def test_exact_prediction_gives_the_exact_denoiser_and_velocity(name, data):
    """From the exact prediction of each kind the process allows, x0_eps returns the exact
    x̂_0 = E[x_0 | x_t] and ε̂ = -σ ∇log p_t (module doc, closed form); ode_velocity(x̂_0, ε̂)
    is the probability-flow velocity f x - ½ g² ∇log p_t with f = α'/α, g² = d(σ²)/dt - 2 f σ²;
    and exact_mixture's denoiser, in the sampler's view x_t/√(α² + σ²), gives the same x̂_0.
    Times where α > 0 (x̂_0 from ε̂ needs it), float64 to 1e-10."""
    process = PROCESSES[name]
    means, s = DATA[data]
    t_grid = times(process, (0.0, 0.05, 0.3, 0.7, 0.95))
    n = 64
    t = t_grid.repeat_interleave(n)
    x0_true, _ = draw_data(data, len(t), seed=1)
    alpha, sigma = process.alpha_sigma(t)
    x = alpha[:, None] * x0_true + sigma[:, None] * torch.randn(x0_true.shape, generator=gen(2), dtype=torch.float64)
    x0_hat, eps_hat, score = posterior(process, t, x, means, s)
    torch.testing.assert_close(alpha[:, None] * x0_hat + sigma[:, None] * eps_hat, x, rtol=1e-10, atol=1e-10)
    for prediction in map(Prediction, allowed(name, "prediction") + (("velocity",) if name != "ddpm" else ())):
        output = exact_prediction(process, prediction, t, x0_hat, eps_hat)
        got_x0, got_eps = process.x0_eps(prediction, output, x, t)
        torch.testing.assert_close(got_x0, x0_hat, rtol=1e-10, atol=1e-10, msg=prediction)
        torch.testing.assert_close(got_eps, eps_hat, rtol=1e-10, atol=1e-10, msg=prediction)
    vp_view = x / process.scale(t)[:, None]
    torch.testing.assert_close(MixtureDenoiser(process, means, s)(vp_view, t).x0, x0_hat, rtol=1e-10, atol=1e-10)
    if name == "ddpm":
        return
    d_alpha, d_sigma = process.alpha_sigma_derivatives(t)
    f = d_alpha / alpha
    g2 = 2 * sigma * d_sigma - 2 * f * sigma**2
    velocity = f[:, None] * x - 0.5 * g2[:, None] * score
    torch.testing.assert_close(process.ode_velocity(x0_hat, eps_hat, t), velocity, rtol=1e-10, atol=1e-10)
    got_f, got_g2 = process.sde_coefficients(t)
    torch.testing.assert_close(got_f, f, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_g2, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_t_of_sigma_inverts_alpha_bar(name):
    """ᾱ = α²/(α² + σ²) = sigmoid(2λ); t_of_sigma(σ_EDM(t)) = t with σ_EDM = σ/α =
    √((1-ᾱ)/ᾱ) across [t_min, t_max] (between the chain's timesteps too), to 1e-9 t_max; and
    it clamps: σ below σ_min gives t_min, above σ_max (or ∞) t_max."""
    process = PROCESSES[name]
    fractions = np.linspace(0, 1, 41)[:-1]  # t_max apart: σ there may be ∞ (flow, vp cosine)
    t = times(process, fractions)
    if name == "ddpm":
        t = tensor(np.linspace(0, 998.75, 41))
    alpha, sigma = process.alpha_sigma(t)
    ab = process.alpha_bar(t.numpy())
    np.testing.assert_allclose(ab, torch.sigmoid(2 * torch.log(alpha / sigma)).numpy(), rtol=1e-12)
    edm_sigma = np.sqrt((1 - ab) / ab)
    np.testing.assert_allclose(process.t_of_sigma(edm_sigma), t.numpy(), rtol=0, atol=1e-9 * process.t_max)
    sigma_min, sigma_max = process.sigma_range()
    assert process.t_of_sigma(sigma_min / 2) == pytest.approx(process.t_min, abs=1e-12)
    assert process.t_of_sigma(np.inf if name in ("flow", "vp-cosine") else 2 * sigma_max) == process.t_max


# ---------------------------------------------------------------- 2. deterministic samplers: orders


ORDER = {"ddim": 1, "dpm++2m": 2, "dpm++3m": 3, "unipc": 3, "ipndm": 4, "heun": 2, "euler": 1}
NFES = (40, 57, 80, 113, 160)
SOLVER_CASES = [
    (p, s) for p in PROCESSES for s in ORDER if not (p == "ddpm" and sampler_specs.SAMPLER_SPECS[s].continuous_only)
]


def ode_reference(process, x_T, lam_from, lam_to, t_last):
    """The probability-flow ODE of the mixture from λ_from to λ_to, then denoised at t_last:
    in the sampler's view, x = √ᾱ x_0 + √(1-ᾱ) ε with ᾱ = sigmoid(2λ), dx/dλ = α (x̂_0 - α x)
    (α = √ᾱ; dα/dλ = α σ², dσ/dλ = -σ α²), solved by scipy's DOP853 to rtol 1e-11: independent
    of every sampler here."""
    den = MixtureDenoiser(process, MEANS, MIXTURE_S)
    shape = x_T.shape

    def rhs(lam, y):
        x = torch.from_numpy(y).reshape(shape)
        t = torch.full((shape[0],), float(process.t_of_sigma(math.exp(-lam))), dtype=torch.float64)
        a = math.sqrt(1 / (1 + math.exp(-2 * lam)))
        return (a * (den(x, t).x0 - a * x)).reshape(-1).numpy()

    solution = solve_ivp(rhs, (lam_from, lam_to), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-12)
    assert solution.success
    x = torch.from_numpy(solution.y[:, -1]).reshape(shape)
    return den(x, torch.full((shape[0],), t_last, dtype=torch.float64)).x0


_REFERENCES = {}


def fitted_order(nfes, errors):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


@pytest.mark.parametrize(("name", "sampler"), SOLVER_CASES)
def test_sampler_converges_to_the_exact_ode_map_at_its_order(name, sampler):
    """On the two-class mixture (its denoiser is not linear: on one Gaussian the map is affine
    and leading errors cancel) with Karras steps, mean |x - reference| falls as NFE^-p, p the
    solver's order (ddim, euler 1; dpm++2m, heun 2; dpm++3m, unipc 3; ipndm 4), fitted over NFE
    40..160, fourth order over 80..320: its fifth-order term still bends the slope at 40 (local
    slopes 3.4, 3.6, 3.8, 3.8 from 40 to 160, 3.85-3.87 over 80..320, 3.94 over 160..1280).
    The reference is the exact ODE from the schedule's first level to its last evaluation,
    denoised there (where every solver's last step lands: x̂_0 at t = 0)."""
    process = PROCESSES[name]
    x_T = torch.randn((200, 4), generator=gen(0), dtype=torch.float64)
    levels = make_steps("karras", process, 10)  # every n: the same first and last level
    if name not in _REFERENCES:
        _REFERENCES[name] = ode_reference(
            process, x_T, half_log_snr(levels.alpha_bar[0]), half_log_snr(levels.alpha_bar[-2]), float(levels.timesteps[-1])
        )
    reference = _REFERENCES[name]
    errors, nfes = [], []
    for nfe in NFES if ORDER[sampler] < 4 else [2 * nfe for nfe in NFES]:
        n = (nfe + 1) // 2 if sampler == "heun" else nfe
        steps = make_steps("karras", process, n)
        assert steps.alpha_bar[0] == levels.alpha_bar[0] and steps.timesteps[-1] == levels.timesteps[-1]
        out = SAMPLER_FUNCTIONS[sampler](MixtureDenoiser(process, MEANS, MIXTURE_S), x_T.clone(), steps)
        errors.append((out - reference).abs().mean().item())
        nfes.append(sampler_specs.network_evaluations(sampler, n))
    assert fitted_order(nfes, errors) == pytest.approx(ORDER[sampler], abs=0.3), errors
    if sampler == "euler":
        # and it keeps its order to NFE 1280: an error no number of steps removes (a floor) bends the
        # slope there. The next-order term's share of the slope falls as 1/NFE (≤ 0.07 from 40 to 160),
        # so from 160 to 1280 the slope is 1 ± 0.1; an Euler step across σ' = ∞ at t = 0 on the VP
        # processes (which left σ_min/2 of noise, ~1e-4 here) gave 0.84.
        n = 8 * NFES[-1]
        den = MixtureDenoiser(process, MEANS, MIXTURE_S)
        out = SAMPLER_FUNCTIONS[sampler](den, x_T.clone(), make_steps("karras", process, n))
        last = (out - reference).abs().mean().item()
        assert fitted_order([NFES[-1], n], [errors[-1], last]) == pytest.approx(1, abs=0.1), (errors, last)


# ---------------------------------------------------------------- 3. the SDE sampler's law


def em_moments(process, steps, mu, s):
    """The mean and variance of the SDE sampler's output on N(mu, s²) data, started from the
    exact marginal of x at the first level: every Euler–Maruyama step (module doc of
    :mod:`diffusion.sampling.euler`) is affine in x with the exact (affine) ε̂,
    x' = A x + b + √(-h g²) z, and the last evaluation returns x̂_0 = k x + (1 - k α) mu,
    k = α s²/v; so the moments follow exactly: m' = A m + b, P' = A² P - h g²."""
    t = torch.as_tensor(steps.timesteps, dtype=torch.float64)
    alpha, sigma = (a.numpy() for a in process.alpha_sigma(t))
    d_alpha, d_sigma = (a.numpy() for a in process.alpha_sigma_derivatives(t))
    m, P = alpha[0] * mu, alpha[0] ** 2 * s**2 + sigma[0] ** 2
    for i in range(len(t)):
        a, sg = alpha[i], sigma[i]
        k = a * s**2 / (a**2 * s**2 + sg**2)
        if i == len(t) - 1:
            return k * m + (1 - k * a) * mu, k**2 * P
        h = float(t[i + 1] - t[i])
        f = d_alpha[i] / a
        g2 = 2 * sg * d_sigma[i] - 2 * f * sg**2
        A = 1 + h * (f + g2 * (1 - a * k) / sg**2)
        m, P = A * m - h * g2 * a * (1 - k * a) * mu / sg**2, A**2 * P - h * g2


@pytest.mark.parametrize("name", CONTINUOUS)
def test_sde_sampler_draws_the_data_law(name):
    """Euler–Maruyama on the reverse SDE, 512 Karras steps, 16000 values of N(0.3, 0.5²) data
    (started from the exact marginal at σ_max): the sample mean and variance equal the law
    :func:`em_moments` computes for these steps within 5 standard errors (s/√N; the variance's
    s² √(2/(N-1))), and that law is the data's within one standard error (Euler–Maruyama's
    weak error, O(1/n), at n = 512: at most 2.4e-3 of 0.25 here), so the samples are within 6
    standard errors of (mu, s²)."""
    process = PROCESSES[name]
    steps = make_steps("karras", process, 512)
    m_exact, var_exact = em_moments(process, steps, MU, S)
    shape, n = (4000, 4), 16000
    se_mean, se_var = math.sqrt(var_exact / n), var_exact * math.sqrt(2 / (n - 1))
    assert abs(m_exact - MU) < se_mean and abs(var_exact - S**2) < se_var, (m_exact, var_exact)
    alpha, sigma = (float(a) for a in process.alpha_sigma(tensor([steps.timesteps[0]])))
    x_own = alpha * MU + math.sqrt(alpha**2 * S**2 + sigma**2) * torch.randn(shape, generator=gen(0), dtype=torch.float64)
    x_T = x_own / math.hypot(alpha, sigma)
    den = MixtureDenoiser(process, [[MU] * 4], S)
    out = SAMPLER_FUNCTIONS["sde"](den, x_T, steps, generator=gen(1))
    assert abs(out.mean().item() - m_exact) < Z * se_mean, (out.mean().item(), m_exact)
    assert abs(out.var().item() - var_exact) < Z * se_var, (out.var().item(), var_exact)
    ode = SAMPLER_FUNCTIONS["euler"](den, x_T, steps)
    assert (out - ode).abs().mean() > 0.1  # the noise moved each sample off its ODE path


# ---------------------------------------------------------------- 4. EDM's preconditioning


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_is_table_1(sigma_data):
    """Karras et al. 2022, Table 1: c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²),
    c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ. With a network that returns zeros, ModelDenoiser
    (given the sampler's view x = x_σ/√(1 + σ²)) calls it on c_in x_σ and c_noise, and returns
    x̂_0 = c_skip x_σ and ε̂ = (x_σ - x̂_0)/σ; ContinuousDiffusion.predict gives c_skip x_σ too."""
    process = make_diffusion({"process": "edm", "prediction": None, "sigma_data": sigma_data}).process
    assert isinstance(process, EDMProcess) and process.sigma_data == sigma_data
    sigma = tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
    sd2 = sigma_data**2
    root = (sigma**2 + sd2).sqrt()
    table = (sd2 / (sigma**2 + sd2), sigma * sigma_data / root, 1 / root, sigma.log() / 4)
    for got, want in zip(process.preconditioning(sigma), table, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    calls = []

    def zero_net(x, t):
        calls.append((x, t))
        return torch.zeros_like(x)

    x = torch.randn((len(sigma), 3, 4, 4), generator=gen(0), dtype=torch.float64)
    x_sigma = x * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    out = ModelDenoiser(zero_net, process, prediction="x0")(x, sigma)
    c_skip, _, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in table)
    torch.testing.assert_close(calls[0][0], c_in * x_sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(calls[0][1], c_noise.flatten().float(), rtol=0, atol=0)
    torch.testing.assert_close(out.x0, c_skip * x_sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.eps, (x_sigma - c_skip * x_sigma) / sigma.reshape(-1, 1, 1, 1), rtol=1e-12, atol=1e-14)
    predicted = ContinuousDiffusion(process, "x0").predict(zero_net, x_sigma, sigma)
    torch.testing.assert_close(predicted, c_skip * x_sigma, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- 5. loss weightings at the optimum


GAMMA = 5.0


def closed_weight(weighting, prediction, alpha, sigma, d_alpha, d_sigma, sigma_data):
    """E[loss] over the x_0 error's variance, at the exact model: the weighting's w(t) on the
    x_0 error (simple: the prediction's own factor, its target's error over the x_0 error:
    eps α/σ, x0 1, v α²/σ + σ, velocity α' - σ' α/σ, squared)."""
    snr = alpha**2 / sigma**2
    if weighting == "simple":
        factor = {
            "eps": alpha / sigma, "x0": 1.0, "v": alpha**2 / sigma + sigma, "velocity": d_alpha - d_sigma * alpha / sigma,
        }
        return factor[prediction] ** 2
    if weighting == "min-snr":
        return min(snr, GAMMA)
    if weighting == "edm":  # λ(σ) = (σ² + σ_d²)/(σ σ_d)², EDM's σ = σ/α
        edm_sigma2 = 1 / snr
        return (edm_sigma2 + sigma_data**2) / (edm_sigma2 * sigma_data**2)
    return (d_alpha - d_sigma * alpha / sigma) ** 2


WEIGHTING_CASES = [
    (name, prediction, weighting)
    for name in PROCESSES
    for prediction in allowed(name, "prediction")
    for weighting in allowed(name, "loss_weighting")
]


@pytest.mark.parametrize(("name", "prediction", "weighting"), WEIGHTING_CASES)
def test_loss_weighting_at_the_exact_model_is_its_closed_form_minimum(name, prediction, weighting):
    """N(mu, s²) data at a fixed t: the exact denoiser's x_0 error is N(0, P) per dimension,
    P = s² σ²/(α² s² + σ²) (the posterior variance), so the training loss of a network that
    outputs the exact prediction averages w(t) P (:func:`closed_weight`); the mean over
    8192 examples of 4 dimensions (χ²: standard error w P √(2/32768)) is within 5 of it. The
    diffusion comes from make_diffusion, the weights from loss_weight (EDM's process with
    σ_data 0.7, to see it read)."""
    diffusion = make_diffusion({
        "process": process_name(name), "schedule": {"ddpm": "linear", "vp-linear": "linear", "vp-cosine": "cosine"}.get(name),
        "timesteps": 1000, "prediction": prediction, "variance": "fixed_small", "loss": "mse",
        "sigma_data": 0.7 if name == "edm" else 0.5,
    })
    process = diffusion.process
    fractions = (0.05, 0.4, 0.8)
    for i, t_value in enumerate(times(process, fractions)):
        t_value = float(t_value.round()) if name == "ddpm" else float(t_value)
        n = 8192
        t = torch.full((n,), t_value, dtype=torch.float64)
        if name == "ddpm":
            t = t.long()
        alpha, sigma = (float(a[0]) for a in process.alpha_sigma(t[:1]))
        d_alpha, d_sigma = (float(a[0]) for a in process.alpha_sigma_derivatives(t[:1])) if name != "ddpm" else (0.0, 0.0)
        pred = Prediction(prediction)

        def exact_net(x_in, t_in):
            x = x_in / process.network_input(torch.ones_like(x_in), t[: len(x_in)])  # undo c_in (EDM)
            x0_hat, eps_hat, _ = posterior(process, t[: len(x)], x, [[MU] * 4], S)
            output = exact_prediction(process, pred, t[: len(x)].double(), x0_hat, eps_hat)
            if isinstance(process, EDMProcess):  # F with c_skip x + c_out F = x̂_0
                c_skip, c_out, _, _ = (c[:, None] for c in process.preconditioning(t[: len(x)]))
                output = (x0_hat - c_skip * x) / c_out
            return output

        x0 = MU + S * torch.randn((n, 4), generator=gen(i), dtype=torch.float64)
        noise = torch.randn((n, 4), generator=gen(10 + i), dtype=torch.float64)
        weight = loss_weight(weighting, process, pred, t, gamma=GAMMA if weighting == "min-snr" else None)
        loss = diffusion.training_losses(exact_net, x0, t, noise=noise, mse_weight=weight)["loss"]
        P = S**2 * sigma**2 / (alpha**2 * S**2 + sigma**2)
        expected = closed_weight(weighting, prediction, alpha, sigma, d_alpha, d_sigma, process.sigma_data) * P
        se = expected * math.sqrt(2 / (4 * n))
        assert abs(loss.mean().item() - expected) < Z * se, (t_value, loss.mean().item(), expected)


# ---------------------------------------------------------------- 6. noise-level distributions


P_VALUE = 1e-3


NOISE_LEVEL_CASES = [
    (name, distribution, params)
    for name in CONTINUOUS
    for distribution in NoiseLevelSampler.DEFAULTS
    for params in ([(None, None)] if distribution == "uniform" else [(None, None), (0.4, 0.7)])
]


@pytest.mark.parametrize(("name", "distribution", "params"), NOISE_LEVEL_CASES)
def test_noise_level_sampler_draws_its_distribution(name, distribution, params):
    """20000 draws of NoiseLevelSampler against the distribution's CDF (scipy's KS test, p >
    1e-3): uniform t on [t_min, t_max]; logit-normal, logit((t - t_min)/(t_max - t_min)) ~
    N(m, s²) (SD3's m = 0, s = 1 by default); log-normal, ln σ ~ N(P_mean, P_std²) for EDM's
    σ = σ(t)/α(t) (EDM's -1.2, 1.2 by default), censored to [σ_min, σ_max] by t_of_sigma's
    clamp: the draws inside follow the truncated normal and the count at each end is
    Binomial(n, mass beyond it) (two-sided binomial test, p > 1e-3)."""
    process = PROCESSES[name]
    mean, std = params
    sampler = NoiseLevelSampler(distribution, process, mean, std)
    n = 20000
    t, weights = sampler.sample(n, torch.device("cpu"), generator=gen(0))
    assert t.dtype == torch.float64 and torch.equal(weights, torch.ones(n))
    assert bool(((t >= process.t_min) & (t <= process.t_max)).all())
    lo, hi = process.t_min, process.t_max
    if distribution == "uniform":
        assert stats.kstest(t.numpy(), "uniform", args=(lo, hi - lo)).pvalue > P_VALUE
        return
    m, s = (mean, std) if mean is not None else NoiseLevelSampler.DEFAULTS[distribution]
    if distribution == "logit-normal":
        u = (t.numpy() - lo) / (hi - lo)
        assert stats.kstest(np.log(u) - np.log1p(-u), "norm", args=(m, s)).pvalue > P_VALUE
        return
    alpha, sigma = process.alpha_sigma(t)
    log_sigma = torch.log(sigma / alpha).numpy()
    low, high = (np.log(v) for v in process.sigma_range())
    if name in ("flow", "vp-cosine"):
        high = np.inf  # α reaches 0 at t_max: σ = ∞ there
    at_low, at_high = t.numpy() == lo, t.numpy() == hi
    a, b = (low - m) / s, (high - m) / s
    inside = log_sigma[~at_low & ~at_high]
    assert stats.kstest(inside, "truncnorm", args=(a, b, m, s)).pvalue > P_VALUE
    assert stats.binomtest(int(at_low.sum()), n, stats.norm.cdf(a)).pvalue > P_VALUE
    assert stats.binomtest(int(at_high.sum()), n, stats.norm.sf(b)).pvalue > P_VALUE


# ---------------------------------------------------------------- 7. every accepted combination trains


OPTION_VALUES = {
    "prediction": ("eps", "x0", "v", "velocity"),
    "timestep_sampler": ("uniform", "loss-aware", "log-normal", "logit-normal"),
    "loss_weighting": ("simple", "min-snr", "edm", "flow"),
}


def process_params(process, prediction=None, timestep_sampler=None, loss_weighting=None, gamma=None):
    return full_params({
        "diffusion": {"process": process, "schedule": None if process in ("edm", "flow") else "linear",
                      "timesteps": 100, "prediction": prediction},
        "train": {"timestep_sampler": timestep_sampler, "loss_weighting": loss_weighting, "min_snr_gamma": gamma,
                  "steps": 2, "batch_size": 4, "warmup_steps": 0, "device": "cpu", "precision": "fp32", "lr": 1e-3},
        "sample": {"sampler": "ddim"},
    })


def test_every_accepted_combination_trains_and_the_others_are_refused():
    """For every process and every prediction × timestep_sampler × loss_weighting that
    PROCESS_OPTIONS allows it (min-snr with γ = 5), parse_params accepts the params,
    make_diffusion builds the diffusion and the training loop's Trainer takes two optimiser
    steps of unet-tiny on 8 × 8 images: every logged term finite and every weight moved.
    Every other value of each option, and min-snr without γ or γ without min-snr, is a one-line
    ConfigError naming the key."""
    g = gen(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=g)
    net = tiny_unet()  # perturbed: no zero-initialised layer stops the gradient of those before it
    initial = copy.deepcopy(net.state_dict())
    trained = 0
    for process in Process:
        options = PROCESS_OPTIONS[process]
        for prediction in options["prediction"]:
            for timestep_sampler in options["timestep_sampler"]:
                for weighting in options["loss_weighting"]:
                    gamma = GAMMA if weighting == "min-snr" else None
                    params = parse_params(process_params(process.value, prediction, timestep_sampler, weighting, gamma))
                    diffusion = make_diffusion(params.diffusion.model_dump())
                    assert diffusion.process.name == process.value and diffusion.prediction.value == prediction
                    net.load_state_dict(initial)
                    run = Trainer(net, diffusion, images, None, params.train, conditional=False)
                    assert run.loss_weighting == weighting
                    for step in (1, 2):
                        terms = run.step(step, None)
                        case = (process.value, prediction, timestep_sampler, weighting)
                        assert all(math.isfinite(v) for v in terms.values()), (case, terms)
                    unmoved = [k for k, v in net.named_parameters() if torch.equal(v, initial[k])]
                    assert not unmoved, (case, unmoved)
                    trained += 1
        for key, values in OPTION_VALUES.items():
            for value in (v for v in values if v not in options[key]):
                chosen = {"prediction": None, "timestep_sampler": None, "loss_weighting": None} | {key: value}
                gamma = GAMMA if chosen["loss_weighting"] == "min-snr" else None
                with pytest.raises(ConfigError) as err:
                    parse_params(process_params(process.value, gamma=gamma, **chosen), "params.yaml")
                message = str(err.value)
                assert "\n" not in message and f"{key}: got {value!r}; process {process.value!r} allows" in message, message
        for weighting, gamma in (("min-snr", None), (options["loss_weighting"][0], GAMMA)):
            if weighting not in options["loss_weighting"]:
                continue
            with pytest.raises(ConfigError, match="train.min_snr_gamma: got") as err:
                parse_params(process_params(process.value, loss_weighting=weighting, gamma=gamma), "params.yaml")
            assert "\n" not in str(err.value)
    combinations = [len(o["prediction"]) * len(o["timestep_sampler"]) * len(o["loss_weighting"]) for o in PROCESS_OPTIONS.values()]
    assert trained == sum(combinations) == 90
