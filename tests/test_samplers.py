"""Samplers on Gaussian data, where the exact model is known and every sampler step is affine
in x plus Gaussian noise, so the law of the output of K steps is computed exactly here.

Tolerances: with N = 16000 independent values (4000 samples x 4 dims), the sample mean and
std have standard errors sd/√N and sd/√(2N); tests allow 5 of them around the exact law of
the K-step sampler. The gap between that law and the data N(mu, s²) is the sampler's
discretisation error; it is computed, not guessed (see ``test_discretisation_error``).

The laws are checked with one generator for the batch; ``test_seeded_images_follow_the_exact_law``
checks the seeded path (one generator per image) against the same law, at 50 steps: 4000
generators drawing 1000 times cost a minute on a CPU.
"""

import math

import pytest
import torch
from device_copies import CrossDeviceOps
from exact_gaussian import GaussianData, alpha_bar_np
from tiny_unet import tiny_unet

from diffusion.sampling import specs as sampler_specs
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sampling.noise import StackedRandomGenerator, image_seed
from diffusion.sampling.ancestral import ddim_sample, ddpm_sample
from diffusion.process.factory import make_diffusion
from diffusion.sampling.denoiser import ModelDenoiser
from diffusion.sampling.sample import SAMPLER_FUNCTIONS, sample
from diffusion.sampling.steps import make_steps
from diffusion.process.schedules import cosine_betas, make_betas, space_timesteps

MU, S = 0.3, 0.5
SHAPE = (4000, 4)
N = SHAPE[0] * SHAPE[1]
BETAS = cosine_betas(1000)

pytestmark = pytest.mark.usefixtures("single_thread")


def exact_law(betas, steps, sampler, *, variance="fixed_small", eta=0.0, model=None):
    """(A, B, noise_var) with output = A x_T + B + N(0, noise_var) for x_T ~ N(0, 1) and the
    exact Gaussian-data model, on the kept ``steps`` of ``betas``, float64.

    Per step: x̂_0 = k x + mu(1 - k√ᾱ) with k = √ᾱ s²/(ᾱ s² + 1-ᾱ), ε̂ = (x - √ᾱ x̂_0)/√(1-ᾱ);
    DDPM eq. 7 (x' = c1 x̂_0 + c2 x + σ z) or DDIM eq. 12/16 (x' = √ᾱ' x̂_0 + √(1-ᾱ'-σ²) ε̂ + σ z).
    """
    alpha_bar = alpha_bar_np(betas)
    A, B, noise_var = 1.0, 0.0, 0.0
    for i in reversed(range(len(steps))):
        ab = alpha_bar[steps[i]]
        ab_prev = alpha_bar[steps[i - 1]] if i > 0 else 1.0
        k = math.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab)
        a0, b0 = k, MU * (1 - k * math.sqrt(ab))
        ae, be = (1 - math.sqrt(ab) * a0) / math.sqrt(1 - ab), -math.sqrt(ab) * b0 / math.sqrt(1 - ab)
        beta = 1 - ab / ab_prev
        posterior_var = beta * (1 - ab_prev) / (1 - ab)
        if sampler == "ddim":
            sigma2 = eta**2 * posterior_var  # eq. 16: (1-ᾱ')/(1-ᾱ) (1 - ᾱ/ᾱ')
            c = math.sqrt(max(1 - ab_prev - sigma2, 0.0))
            a, b = math.sqrt(ab_prev) * a0 + c * ae, math.sqrt(ab_prev) * b0 + c * be
        else:
            c1, c2 = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
            a, b = c1 * a0 + c2, c1 * b0
            if variance == "learned_range" and i > 0:
                v = model(torch.zeros(1, 1), torch.tensor([steps[i]]))[0, 1].item()
                frac = (v + 1) / 2
                sigma2 = math.exp(frac * math.log(beta) + (1 - frac) * math.log(posterior_var))
            else:
                sigma2 = {"fixed_small": posterior_var, "fixed_large": beta, "learned_range": 0.0}[variance]
        A, B, noise_var = a * A, a * B + b, a * a * noise_var + (sigma2 if i > 0 else 0.0)
    return A, B, noise_var


def law_stats(law):
    A, B, noise_var = law
    return B, math.sqrt(A * A + noise_var)


def assert_matches(x, mean, std):
    se_mean, se_std = std / math.sqrt(N), std / math.sqrt(2 * N)
    assert abs(x.mean().item() - mean) < 5 * se_mean, (x.mean().item(), mean)
    assert abs(x.std().item() - std) < 5 * se_std, (x.std().item(), std)


def assert_recovers_data(x):
    """Against N(mu, s²) itself: 5 standard errors plus the ≤ 0.003 discretisation error at
    1000 steps (``test_discretisation_error``)."""
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(N) + 0.003
    assert abs(x.std().item() - S) < 5 * S / math.sqrt(2 * N) + 0.003


def diffusion_for(variance):
    return GaussianDiffusion(BETAS, variance=variance, loss="hybrid" if variance == "learned_range" else "mse")


# --- against the exact law ----------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "steps"), [("linear", 10), ("linear", 50), ("cosine", 10), ("cosine", 50), ("cosine", 1000)]
)
def test_ddim_eta0_is_the_exact_affine_map(schedule, steps):
    betas = make_betas(schedule, 1000)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = sample(GaussianDiffusion(betas), GaussianData(betas, MU, S), SHAPE, steps=steps, noise=x_T, clip_denoised=False)
    A, B, noise_var = exact_law(betas, space_timesteps(1000, steps), "ddim")
    assert noise_var == 0
    torch.testing.assert_close(x, (A * x_T.double() + B).float(), rtol=0, atol=2e-4)
    if steps == 1000:
        assert_recovers_data(x)


@pytest.mark.parametrize(
    ("sampler", "variance", "eta", "steps"),
    [
        (sampler, variance, eta, steps)
        for sampler, variance, eta in (
            ("ddpm", "fixed_small", 0.0),
            ("ddpm", "fixed_large", 0.0),
            ("ddpm", "learned_range", 0.0),
            ("ddim", "fixed_small", 1.0),
            ("ddim", "fixed_small", 0.5),
        )
        for steps in (10, 50, 1000)
        if not (eta == 0.5 and steps == 1000)
    ],
)
def test_stochastic_samplers_match_the_exact_law(sampler, variance, eta, steps):
    model = GaussianData(BETAS, MU, S, learned=variance == "learned_range")
    generator = torch.Generator().manual_seed(steps)
    x = sample(
        diffusion_for(variance), model, SHAPE, sampler=sampler, steps=steps, eta=eta, clip_denoised=False,
        generator=generator,
    )
    law = exact_law(BETAS, space_timesteps(1000, steps), sampler, variance=variance, eta=eta, model=model)
    assert_matches(x, *law_stats(law))
    if steps == 1000:
        assert_recovers_data(x)


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.5)])
def test_seeded_images_follow_the_exact_law(sampler, eta):
    """With a seed every image draws from its own generator: the 4000 images are still
    independent draws of the exact law (a shared or shifted stream would shrink or skew it)."""
    x = sample(diffusion_for("fixed_small"), GaussianData(BETAS, MU, S), SHAPE, sampler=sampler, steps=50, eta=eta,
               clip_denoised=False, seed=11)
    assert_matches(x, *law_stats(exact_law(BETAS, space_timesteps(1000, 50), sampler, eta=eta)))


def test_discretisation_error():
    """The exact law's distance from N(mu, s²) = N(0.3, 0.5²), cosine T=1000, on kept timesteps. The mean
    stays 0.3000 (to 4 digits); the std of the output is:

    steps      ddim η=0   ddim η=1 = ddpm small   ddpm large   ddpm learned
    10         0.4211     0.3806                  0.5532       0.4744
    50         0.4845     0.4672                  0.5094       0.4994
    1000       0.4992     0.4980                  0.5004       0.5000
    The learned model carries the exact reverse variance, so at 1000 steps it is exact.
    """
    model = GaussianData(BETAS, MU, S, learned=True)
    table = {}
    for steps in (10, 50, 1000):
        kept = space_timesteps(1000, steps)
        for name, sampler, variance, eta in (
            ("ddim0", "ddim", None, 0.0),
            ("small", "ddpm", "fixed_small", 0.0),
            ("ddim1", "ddim", None, 1.0),
            ("large", "ddpm", "fixed_large", 0.0),
            ("learned", "ddpm", "learned_range", 0.0),
        ):
            mean, std = law_stats(exact_law(BETAS, kept, sampler, variance=variance, eta=eta, model=model))
            assert mean == pytest.approx(MU, abs=0.01)
            table[name, steps] = std
    assert table["small", 50] == pytest.approx(table["ddim1", 50], abs=1e-12)
    for name in ("ddim0", "small", "large", "learned"):
        errors = [abs(table[name, steps] - S) for steps in (10, 50, 1000)]
        assert errors[0] > errors[1] > errors[2], name
        assert errors[2] < 0.003, name
    assert abs(table["learned", 1000] - S) < 1e-4


def test_zero_terminal_snr_with_v_prediction():
    betas = make_betas("cosine", 1000, zero_terminal_snr=True)
    d = GaussianDiffusion(betas, prediction="v")
    x = sample(d, GaussianData(betas, MU, S, prediction="v"), SHAPE, steps=50, seed=0, clip_denoised=False)
    assert torch.isfinite(x).all()
    assert_matches(x, *law_stats(exact_law(betas, space_timesteps(1000, 50), "ddim")))


# --- consistency between samplers and parameterisations ---------------------------------


def test_ddim_eta1_is_ddpm_with_fixed_small_variance():
    d, model = diffusion_for("fixed_small"), GaussianData(BETAS, MU, S)
    a = sample(d, model, (64, 4), sampler="ddpm", steps=50, seed=5, clip_denoised=False)
    b = sample(d, model, (64, 4), sampler="ddim", steps=50, eta=1.0, seed=5, clip_denoised=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_predictions_give_the_same_samples():
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    out = {}
    for prediction in ("eps", "x0", "v"):
        d = GaussianDiffusion(BETAS, prediction=prediction)
        out[prediction] = sample(d, GaussianData(BETAS, MU, S, prediction=prediction), x_T.shape, steps=50, noise=x_T)
    torch.testing.assert_close(out["x0"], out["eps"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["v"], out["eps"], rtol=0, atol=1e-4)


# --- the front door -----------------------------------------------------------------------


def test_seed_reproduces_and_generator_is_the_same_path():
    d, model = diffusion_for("fixed_large"), GaussianData(BETAS, MU, S)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.7)):
        a = sample(d, model, (8, 3), sampler=sampler, eta=eta, steps=20, seed=7)
        b = sample(d, model, (8, 3), sampler=sampler, eta=eta, steps=20, seed=7)
        c = sample(d, model, (8, 3), sampler=sampler, eta=eta, steps=20, generator=StackedRandomGenerator(7, range(8)))
        other = sample(d, model, (8, 3), sampler=sampler, eta=eta, steps=20, seed=8)
        assert torch.equal(a, b) and torch.equal(a, c) and not torch.allclose(a, other)
        # one generator for the whole batch stays an option, and reproduces too
        one = [sample(d, model, (8, 3), sampler=sampler, eta=eta, steps=20, generator=torch.Generator().manual_seed(7))
               for _ in range(2)]
        assert torch.equal(*one) and not torch.allclose(one[0], a)


def test_image_seeds():
    """Image k of seed s has its own 64-bit seed, SeedSequence(s, spawn_key=(k,)): pinned here, since
    a run's images are only reproducible while these stay, and no two (s, k) share one."""
    assert image_seed(0, 0) == 8668861027912758289
    assert image_seed(1, 5) == 5892472470897923492
    assert len({image_seed(s, k) for s in range(20) for k in range(200)}) == 20 * 200
    stacked = StackedRandomGenerator(3, range(5, 9)).randn((4, 2, 3), device=torch.device("cpu"), dtype=torch.float32)
    for row, k in zip(stacked, range(5, 9), strict=True):
        assert torch.equal(row, torch.randn(2, 3, generator=torch.Generator().manual_seed(image_seed(3, k))))
    with pytest.raises(ValueError, match="noise: got a batch of 3; the generator holds 4 images"):
        StackedRandomGenerator(3, range(4)).randn((3, 2), device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_images_do_not_depend_on_the_batch_size(sampler, eta):
    """Image k of a seed is the same image in batches of 1, 3 or 8 (a tiny untrained U-Net, moved
    off its zero output): x_T and every later noise of it come from its own generator."""
    net = tiny_unet()
    d = GaussianDiffusion(cosine_betas(100))

    def run(seed, batch_size, count=8):
        batches = [
            sample(d, net, (min(batch_size, count - start), 1, 8, 8), sampler=sampler, steps=4, eta=eta, seed=seed,
                   first_index=start)
            for start in range(0, count, batch_size)
        ]
        return torch.cat(batches)

    whole = run(0, 8)
    assert whole.std() > 0.5
    for batch_size in (1, 3):  # equal up to float rounding: CPU kernels round per batch size (~1e-6)
        torch.testing.assert_close(run(0, batch_size), whole, rtol=0, atol=1e-4)
    other = run(1, 8, count=9)
    # seeds 0 and 1 share no image, not even shifted by one (as seed + index would)
    assert torch.cdist(other.flatten(1), whole.flatten(1)).min() > 0.5


def test_intermediates_and_original_timesteps():
    d, model = diffusion_for("fixed_small"), GaussianData(BETAS, MU, S)
    x, preds = sample(d, model, (16, 2), steps=10, seed=0, clip_denoised=False, return_intermediates=True)
    assert len(preds) == 10 and all(p.shape == (16, 2) for p in preds)
    torch.testing.assert_close(preds[-1], x)  # DDIM's last step returns x̂_0
    assert [t.unique().item() for t in model.calls] == space_timesteps(1000, 10)[::-1]
    _, preds = sample(d, model, (16, 2), sampler="ddpm", steps="ddim25", seed=0, return_intermediates=True)
    assert len(preds) == 25


def test_callback_sees_every_step():
    d = diffusion_for("fixed_small")
    seen = []
    for name, fn in SAMPLER_FUNCTIONS.items():
        if sampler_specs.SAMPLER_SPECS[name].continuous_only:  # on the chain: one line (tests/test_processes.py)
            continue
        seen.clear()
        fn(ModelDenoiser.for_process(GaussianData(BETAS, MU, S), d), torch.randn(4, 2), make_steps("linspace", d.process, [0, 500, 999]),
           callback=seen.append)
        assert [(info["i"], info["t"]) for info in seen] == [(0, 999), (1, 500), (2, 0)]
        assert set(seen[0]) == {"i", "t", "x", "pred_x0"}
    assert SAMPLER_FUNCTIONS["ddpm"] is ddpm_sample and SAMPLER_FUNCTIONS["ddim"] is ddim_sample
    assert list(SAMPLER_FUNCTIONS) == list(sampler_specs.SAMPLER_SPECS)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_network_evaluations_per_image_are_the_calls_made(steps):
    """sampler_specs.network_evaluations (the sweep's sampling_cost) is what each sampler really
    costs: the images the network is called on, per image of the batch."""
    flow = make_diffusion({"process": "flow", "prediction": None})

    class Zero:  # the flow's velocity 0: any network, its calls counted
        calls = []

        def __call__(self, x, t):
            self.calls.append(t)
            return torch.zeros_like(x)

    for name in SAMPLER_FUNCTIONS:
        continuous = sampler_specs.SAMPLER_SPECS[name].continuous_only
        model = Zero() if continuous else GaussianData(BETAS, MU, S)
        model.calls = []
        sample(flow if continuous else diffusion_for("fixed_small"), model, (6, 2), sampler=name, steps=steps,
               eta=0.5 * (name == "ddim"), seed=0)
        assert sum(len(t) for t in model.calls) / 6 == sampler_specs.network_evaluations(name, steps), name


def test_no_host_copy_per_step():
    """The samplers read the schedule on the samples' device: after the first call ('meta' stands in
    for CUDA) a whole sampling run moves nothing between host and device."""
    meta = torch.device("meta")
    d = diffusion_for("fixed_small")

    def model(x, t):
        return torch.zeros_like(x)

    copies = []
    for _ in range(3):
        with CrossDeviceOps() as ops:
            for name, eta in (("ddpm", 0.0), ("ddim", 0.5)):
                sample(d, model, (4, 2), sampler=name, steps=5, eta=eta, noise=torch.zeros(4, 2, device=meta),
                       device=meta)
        copies.append(len(ops.ops))
    assert copies == [3, 0, 0]  # the noise levels' 3 tables (timesteps, ᾱ, log σ), once


def test_clipping_and_thresholding_bound_the_samples():
    d, model = diffusion_for("fixed_small"), GaussianData(BETAS, MU, S)
    free = sample(d, model, (2000, 4), steps=20, seed=1, clip_denoised=False)
    clipped = sample(d, model, (2000, 4), steps=20, seed=1)
    thresholded = sample(d, model, (2000, 4), steps=20, seed=1, threshold=0.995)
    assert free.abs().max() > 1.2  # N(0.3, 0.25) puts ~8% above 1
    assert clipped.abs().max() <= 1 and thresholded.abs().max() <= 1
    assert not torch.allclose(clipped, thresholded)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "lms"}, "sampler: got 'lms'; allowed: ddpm, ddim"),
        ({"seed": 1, "generator": torch.Generator()}, "seed: give a seed or a generator, not both"),
        ({"eta": 1.5}, "eta: got 1.5; allowed: 0 <= eta <= 1"),
        ({"noise": torch.zeros(3, 2)}, r"noise: got shape \(3, 2\); need \(4, 2\)"),
        ({"seed": 1, "first_index": -1}, "first_index: got -1; allowed: an int >= 0"),
        ({"steps": 1001}, "spec: cannot take 1001 steps"),
    ],
)
def test_front_door_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(diffusion_for("fixed_small"), GaussianData(BETAS, MU, S), (4, 2), **kwargs)
