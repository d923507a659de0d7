"""Guidance on a Gaussian mixture, where every guided denoiser has a closed form.

Data (tests/exact_mixture.py): class k is N(mu_k, s² I) with weight pi_k. At ᾱ, with
a = √ᾱ and v = ᾱ s² + 1 - ᾱ, the conditional x̂_0 of class y is mu_y + a s²/v (x_t - a mu_y)
and the unconditional one averages these over p(k | x_t). Their difference is
(1 - a² s²/v) (mu_y - Σ_k p(k | x_t) mu_k) = (1-ᾱ)/v (mu_y - E[mu | x_t]), so classifier-free
guidance at w is, in closed form,

    x̂_0^w = x̂_0^c + (w - 1) (1-ᾱ)/v (mu_y - Σ_k p(k | x_t) mu_k):

w > 1 pushes x̂_0 past class y's own denoiser, away from the posterior mean of the classes.

With the exact classifier log p(y | x_t), classifier guidance at s on the unconditional
denoiser is ε_u - s √(1-ᾱ) ∇ log p(y | x_t), and Bayes (∇ log p(x_t | y) = ∇ log p(x_t) +
∇ log p(y | x_t), ε = -√(1-ᾱ) ∇ log p) makes that ε_u + s (ε_c - ε_u): classifier-free
guidance at w = s, the conditional denoiser at s = 1.

Everything runs in float64, so "equal" means equal to ~1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from exact_mixture import MixtureDenoiser

from diffusion.process.options import Variance
from diffusion.process.schedules import cosine_betas
from diffusion.sampling.ancestral import ddim_sample
from diffusion.sampling.denoiser import Denoised
from diffusion.sampling.guidance import (
    ClassifierFreeGuidance, ClassifierGuidance, classifier_gradient, guidance,
)
from diffusion.sampling.specs import network_evaluations
from diffusion.process.discrete import DiscreteChain
from diffusion.sampling.steps import make_steps

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHAS_CUMPROD = np.cumprod(1 - cosine_betas(1000))
LEVELS = DiscreteChain(ALPHAS_CUMPROD)
MEANS = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
S = 0.3
NULL = len(MEANS)  # the mixture's "no label"


def mixture() -> MixtureDenoiser:
    return MixtureDenoiser(LEVELS, MEANS, S, WEIGHTS)


def points(batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t [B, 2, 1, 1] spread over the classes, and labels cycling through them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 1, 1, generator=gen, dtype=torch.float64), torch.arange(batch) % NULL


def at(t: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long)


def guided_x0(x: torch.Tensor, alpha_bar: float, y: torch.Tensor, w: float) -> torch.Tensor:
    """The module doc's x̂_0^w for x [B, 2] at ᾱ, written from the formulas alone."""
    a, v = math.sqrt(alpha_bar), alpha_bar * S**2 + 1 - alpha_bar
    conditional = MEANS[y] + a * S**2 / v * (x - a * MEANS[y])
    posterior = torch.softmax(WEIGHTS.log() - ((x[:, None] - a * MEANS) ** 2).sum(-1) / (2 * v), dim=1)
    return conditional + (w - 1) * (1 - alpha_bar) / v * (MEANS[y] - posterior @ MEANS)


def assert_same(a: Denoised, b: Denoised, atol: float = 0.0) -> None:
    torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=atol)
    torch.testing.assert_close(a.eps, b.eps, rtol=0, atol=atol)


class Counting:
    """A denoiser that records the rows and labels of every call of ``inner``."""

    def __init__(self, inner):
        self.inner, self.process, self.calls = inner, inner.process, []

    def __call__(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.tolist()))
        return self.inner(x, t, y)


# ---------------------------------------------------------------- classifier-free guidance


@pytest.mark.parametrize("t", [0, 300, 700, 999])
def test_cfg_at_one_is_the_conditional_and_at_zero_the_unconditional_denoiser(t: int):
    x, y = points()
    model = mixture()
    assert_same(ClassifierFreeGuidance(model, 1.0, NULL)(x, at(t, 6), y), model(x, at(t, 6), y))
    assert_same(ClassifierFreeGuidance(model, 0.0, NULL)(x, at(t, 6), y), model(x, at(t, 6)))


@pytest.mark.parametrize("t", [50, 400, 800])
@pytest.mark.parametrize("w", [0.5, 3.0])
def test_cfg_x0_is_the_closed_form_and_eps_follows_from_it(t: int, w: float):
    x, y = points(9, seed=t)
    out = ClassifierFreeGuidance(mixture(), w, NULL)(x, at(t, 9), y)
    ab = float(ALPHAS_CUMPROD[t])
    expected = guided_x0(x.reshape(9, 2), ab, y, w)
    torch.testing.assert_close(out.x0.reshape(9, 2), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps, (x - math.sqrt(ab) * out.x0) / math.sqrt(1 - ab), rtol=0, atol=1e-12)


def guided_ode(x_T: torch.Tensor, y: torch.Tensor, w: float, steps: int = 400) -> torch.Tensor:
    """The guided probability-flow ODE integrated finely, independent of the library's samplers
    and wrappers: in x̃ = x/√ᾱ and u = log σ, σ = √((1-ᾱ)/ᾱ) (EDM's variables), dx̃/du = σ ε̂ =
    x̃ - x̂_0^w, by RK4 on ``steps`` uniform steps from σ at t = 999 to σ at t = 0, then x̂_0^w
    there (the samplers' last step, σ -> 0)."""
    sigmas = np.sqrt((1 - ALPHAS_CUMPROD[[-1, 0]]) / ALPHAS_CUMPROD[[-1, 0]])
    us = np.linspace(math.log(sigmas[0]), math.log(sigmas[1]), steps + 1)

    def x0_at(x_tilde, u):
        alpha_bar = 1 / (1 + math.exp(2 * u))
        return guided_x0(math.sqrt(alpha_bar) * x_tilde, alpha_bar, y, w)

    def slope(x_tilde, u):
        return x_tilde - x0_at(x_tilde, u)

    x = x_T / math.sqrt(ALPHAS_CUMPROD[-1])
    for u, u_next in zip(us[:-1], us[1:]):
        h = u_next - u
        k1 = slope(x, u)
        k2 = slope(x + h / 2 * k1, u + h / 2)
        k3 = slope(x + h / 2 * k2, u + h / 2)
        k4 = slope(x + h * k3, u_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x0_at(x, us[-1])


def test_the_reference_ode_is_exact_for_one_gaussian():
    """At w = 1 the guided ODE is class y's Gaussian's, which keeps z = (x_t - a mu)/√v fixed:
    at the last level (σ_0 at t = 0) x̂_0 = mu + s²/√(s² + σ_0²) z_T. The integrator meets it."""
    gen = torch.Generator().manual_seed(1)
    x_T, y = torch.randn(300, 2, generator=gen, dtype=torch.float64), torch.arange(300) % NULL
    a_T, v_T = math.sqrt(ALPHAS_CUMPROD[-1]), ALPHAS_CUMPROD[-1] * S**2 + 1 - ALPHAS_CUMPROD[-1]
    sigma_0_sq = (1 - ALPHAS_CUMPROD[0]) / ALPHAS_CUMPROD[0]
    exact = MEANS[y] + S**2 / math.sqrt(S**2 + sigma_0_sq) * (x_T - a_T * MEANS[y]) / math.sqrt(v_T)
    torch.testing.assert_close(guided_ode(x_T, y, 1.0), exact, rtol=0, atol=1e-6)


def test_guided_ddim_class_means_move_away_from_the_unconditional_mean_as_the_ode_says():
    """DDIM (250 steps, η = 0) through the guidance wrapper follows the guided ODE of the closed
    form on the same x_T, image by image (its first-order error: 1e-2) and in each class's
    mean (2e-3). At w = 1 the class means are the mu_y (the ODE maps each Gaussian onto itself
    exactly); at w = 3 each moves further from the mixture's mean along mu_y - mean, by 0.31,
    0.42 and 0.49 (the classes of weight 0.5, 0.3, 0.2: the rarer, the further)."""
    gen = torch.Generator().manual_seed(0)
    x_T, y = torch.randn(1200, 2, generator=gen, dtype=torch.float64), torch.arange(1200) % NULL
    steps = make_steps("linspace", LEVELS, 250)
    unconditional_mean = WEIGHTS @ MEANS
    shifts = {}
    for w in (1.0, 3.0):
        reference = guided_ode(x_T, y, w)
        out = ddim_sample(ClassifierFreeGuidance(mixture(), w, NULL), x_T.reshape(-1, 2, 1, 1), steps, y=y)
        out = out.reshape(-1, 2)
        assert (out - reference).abs().max() < 1.5e-2
        for k in range(NULL):
            mean, expected = out[y == k].mean(0), reference[y == k].mean(0)
            assert (mean - expected).abs().max() < 2e-3, (w, k, mean, expected)
            direction = (MEANS[k] - unconditional_mean) / (MEANS[k] - unconditional_mean).norm()
            shifts[w, k] = float((expected - unconditional_mean) @ direction)
    for k in range(NULL):
        assert shifts[1.0, k] == pytest.approx(float((MEANS[k] - unconditional_mean).norm()), abs=0.03)
        assert 0.3 < shifts[3.0, k] - shifts[1.0, k] < 0.5, shifts
    assert shifts[3.0, 0] - shifts[1.0, 0] < shifts[3.0, 1] - shifts[1.0, 1] < shifts[3.0, 2] - shifts[1.0, 2]


def test_batched_cfg_calls_the_model_once_a_step_with_2b_rows():
    x, y = points(5)
    for w, rows, labels in [(3.0, 10, y.tolist() + [NULL] * 5), (1.0, 5, y.tolist()), (0.0, 5, [NULL] * 5)]:
        counted = Counting(mixture())
        ddim_sample(ClassifierFreeGuidance(counted, w, NULL), x, make_steps("linspace", LEVELS, 10), y=y)
        assert counted.calls == [(rows, labels)] * 10, w
        assert sum(r for r, _ in counted.calls) / 5 == network_evaluations("ddim", 10, w)  # the sweep's sampling_cost


def test_outside_the_interval_the_step_is_exactly_conditional():
    """Guided for lo <= t <= hi (both ends included), the conditional model alone elsewhere."""
    x, y = points(4)
    model = mixture()
    guided = ClassifierFreeGuidance(model, 4.0, NULL, interval=(200, 600))
    for t in (0, 199, 601, 999):
        assert_same(guided(x, at(t, 4), y), model(x, at(t, 4), y))
    for t in (200, 400, 600):
        assert (guided(x, at(t, 4), y).x0 - model(x, at(t, 4), y).x0).abs().max() > 1e-3

    counted = Counting(mixture())
    steps = make_steps("linspace", LEVELS, 10)  # timesteps 999, 888, ..., 111, 0
    ddim_sample(ClassifierFreeGuidance(counted, 4.0, NULL, interval=(200, 600)), x, steps, y=y)
    inside = [200 <= t <= 600 for t in steps.timesteps]
    assert [rows for rows, _ in counted.calls] == [8 if guided_step else 4 for guided_step in inside]
    assert sum(inside) == 4


class LearnedVariance:
    """The mixture with ``learned_range`` variance channels that tell the labels apart: v = y / 10."""

    def __init__(self):
        self.inner, self.process = mixture(), LEVELS

    def __call__(self, x, t, y=None):
        out = self.inner(x, t, y)
        v = (torch.full((x.shape[0],), float(NULL)) if y is None else y.double()) / 10
        return Denoised(out.x0, out.eps, Variance.LEARNED_RANGE, v.reshape(-1, 1, 1, 1).expand_as(x))


def test_the_variance_channels_come_from_the_conditional_half():
    x, y = points(6)
    out = ClassifierFreeGuidance(LearnedVariance(), 2.0, NULL)(x, at(500, 6), y)
    assert out.variance is Variance.LEARNED_RANGE
    torch.testing.assert_close(out.var_values, LearnedVariance()(x, at(500, 6), y).var_values, rtol=0, atol=0)


def test_cfg_refuses_a_missing_label_and_a_reversed_interval():
    x, _ = points(2)
    with pytest.raises(ValueError, match=r"^guidance_scale: classifier-free guidance needs a condition"):
        ClassifierFreeGuidance(mixture(), 2.0, NULL)(x, at(10, 2))
    reversed_interval = r"^guidance_interval: got \(5, 1\); allowed: \[lo, hi\] with lo <= hi, or null$"
    with pytest.raises(ValueError, match=reversed_interval):
        ClassifierFreeGuidance(mixture(), 2.0, NULL, interval=(5, 1))
    with pytest.raises(ValueError, match=r"^guidance_scale: 2.0 needs a conditional model"):
        guidance(scale=2.0)


# ---------------------------------------------------------------- classifier guidance


def exact_classifier(model: MixtureDenoiser):
    """log p(k | x_t) of the mixture as a classifier's logits (a log-softmax is its own log-softmax)."""
    return model.log_prob_class


@pytest.mark.parametrize("t", [100, 500, 900])
def test_classifier_gradient_is_the_finite_difference_of_log_p_y_given_x(t: int):
    x, y = points(6, seed=t)
    model = mixture()
    grad = classifier_gradient(exact_classifier(model), x, at(t, 6), y)
    assert grad.dtype == torch.float64
    h = 1e-6
    numeric = torch.zeros_like(x)
    for d in range(2):
        step = torch.zeros_like(x)
        step[:, d] = h
        up = model.log_prob_class(x + step, at(t, 6))[torch.arange(6), y]
        down = model.log_prob_class(x - step, at(t, 6))[torch.arange(6), y]
        numeric[:, d] = ((up - down) / (2 * h)).reshape(6, 1, 1)
    torch.testing.assert_close(grad, numeric, rtol=0, atol=1e-8)


@pytest.mark.parametrize("t", [0, 250, 600, 999])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_denoiser(t: int):
    """Bayes at s = 1: the unconditional model (called without labels) plus the exact
    classifier's gradient is class y's own denoiser."""
    x, y = points(6, seed=t)
    model = mixture()
    guided = ClassifierGuidance(model, exact_classifier(model), 1.0, conditional=False)
    assert_same(guided(x, at(t, 6), y), model(x, at(t, 6), y), atol=1e-10)


@pytest.mark.parametrize("s", [0.5, 2.5])
def test_classifier_guidance_at_s_is_classifier_free_guidance_at_w_equal_s(s: float):
    x, y = points(6)
    model = mixture()
    guided = ClassifierGuidance(model, exact_classifier(model), s, conditional=False)
    assert_same(guided(x, at(400, 6), y), ClassifierFreeGuidance(model, s, NULL)(x, at(400, 6), y), atol=1e-10)


def test_both_guidances_at_once_add_their_scales():
    """CFG at w inside, the exact classifier at s on top: ε_u + w (ε_c - ε_u) + s (ε_c - ε_u),
    classifier-free guidance at w + s; and the factory builds it in that order."""
    x, y = points(6)
    model = mixture()
    wrap = guidance(scale=2.0, null_condition=NULL, classifier=exact_classifier(model), classifier_scale=1.5)
    both = wrap(model)
    assert isinstance(both, ClassifierGuidance) and isinstance(both.inner, ClassifierFreeGuidance)
    assert_same(both(x, at(300, 6), y), ClassifierFreeGuidance(model, 3.5, NULL)(x, at(300, 6), y), atol=1e-10)


def test_the_factory_guides_an_unconditional_model_with_the_classifier_alone():
    """No null class: the model is unconditional and is called without labels."""
    x, y = points(6)
    counted = Counting(mixture())
    wrap = guidance(classifier=exact_classifier(counted.inner), classifier_scale=1.0)
    assert_same(wrap(counted)(x, at(700, 6), y), counted.inner(x, at(700, 6), y), atol=1e-10)
    assert counted.calls == [(6, None)]


def test_nothing_to_guide_is_no_wrapper_and_scale_zero_is_the_inner_denoiser():
    model = mixture()
    assert guidance() is None
    assert guidance(classifier=exact_classifier(model), classifier_scale=0.0) is None
    x, y = points(3)
    off = ClassifierGuidance(model, exact_classifier(model), 0.0, conditional=True)
    assert_same(off(x, at(10, 3), y), model(x, at(10, 3), y))
    with pytest.raises(ValueError, match=r"^classifier_scale: classifier guidance needs class labels"):
        off(x, at(10, 3))
