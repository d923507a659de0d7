"""The probability-flow ODE's log-likelihood (diffusion/process/likelihood.py): with the exact
denoiser of Gaussian data it is the data's Gaussian log-density, by the exact trace and (within
its standard error) by Hutchinson's estimate, for vp, edm and flow; bits/dim and heldout_bpd."""

from __future__ import annotations

import math
import sys
import subprocess

import pytest
import torch
from torch import nn

from diffusion.models.factory import create_model
from diffusion.process.factory import make_diffusion
from diffusion.process.likelihood import BPD_OFFSET, dequantize, ode_bpd, ode_log_likelihood
from diffusion.process.options import Prediction
from diffusion.training.loop import heldout_bpd, to_model_range

DIM = 3
PROCESSES = {
    "vp": {"process": "vp", "schedule": "linear", "prediction": "eps"},
    "edm": {"process": "edm", "sigma_data": 0.5, "prediction": "x0"},
    "flow": {"process": "flow", "prediction": "velocity"},
}


def _gaussian(dim=DIM):
    """N(μ, Σ) with a full Σ (eigenvalues 0.6..2), so ∂v/∂x is not diagonal and Hutchinson's
    Rademacher estimate has a variance."""
    g = torch.Generator().manual_seed(3)
    mu = 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(0.6, 2.0, dim, dtype=torch.float64)
    return mu, q, eigenvalues


class ExactNetwork(nn.Module):
    """The network whose prediction (after the process's preconditioning) is exactly what the
    process's prediction type asks of N(μ, QΛQᵀ) data: E[x_0 | x_t] = μ + αΣ(α²Σ + σ²I)⁻¹(x_t - αμ)."""

    def __init__(self, diffusion, mu, q, eigenvalues):
        super().__init__()
        self.diffusion, self.mu, self.q, self.eigenvalues = diffusion, mu, q, eigenvalues

    def forward(self, x_in, t_in):
        p = self.diffusion.process
        if p.name == "edm":
            t = torch.exp(4 * t_in.double())  # c_noise = ¼ ln σ
            x = x_in.double() / p.preconditioning(t)[2][:, None]
        else:
            t, x = t_in.double() / 999.0, x_in.double()
        alpha, sigma = (v[:, None] for v in p.alpha_sigma(t))
        gain = alpha * self.eigenvalues / (alpha**2 * self.eigenvalues + sigma**2)
        x0 = self.mu + ((x - alpha * self.mu) @ self.q * gain) @ self.q.T
        eps = (x - alpha * x0) / sigma
        prediction = self.diffusion.prediction
        if prediction is Prediction.X0:
            out = x0
        elif prediction is Prediction.EPS:
            out = eps
        elif prediction is Prediction.VELOCITY:
            d_alpha, d_sigma = (v[:, None] for v in p.alpha_sigma_derivatives(t))
            out = d_alpha * x0 + d_sigma * eps
        else:
            out = alpha * eps - sigma * x0
        if p.name == "edm":
            c_skip, c_out, _, _ = p.preconditioning(t)
            out = (out - c_skip[:, None] * x) / c_out[:, None]
        return out.to(x_in.dtype)


def _true_log_p(x, mu, q, eigenvalues):
    z = (x - mu) @ q / eigenvalues.sqrt()
    return -0.5 * (len(mu) * math.log(2 * math.pi) + eigenvalues.log().sum() + (z**2).sum(1))


def _setup(name):
    diffusion = make_diffusion(PROCESSES[name])
    mu, q, eigenvalues = _gaussian()
    x = mu + (torch.randn(4, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * eigenvalues.sqrt()) @ q.T
    return diffusion, ExactNetwork(diffusion, mu, q, eigenvalues), x, _true_log_p(x, mu, q, eigenvalues)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_exact_trace_gives_the_gaussian_log_density(name):
    diffusion, net, x, true = _setup(name)
    log_p, nfe = ode_log_likelihood(net, diffusion, x, exact_trace=True)
    assert log_p.shape == (4,) and nfe > 10
    assert torch.allclose(log_p, true, rtol=0.01, atol=0), (log_p, true)


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_agrees_within_its_standard_error(name, probe):
    """Each point repeated 8 times in a batch (a probe per row) under 4 probe seeds: 32
    estimates per point, their mean within 4 standard errors of the exact trace's value. The
    Rademacher estimate of a 3x3 Jacobian takes 4 values, so fewer draws give a poor error."""
    diffusion, net, x, true = _setup(name)
    exact, _ = ode_log_likelihood(net, diffusion, x, exact_trace=True)
    repeats = 8
    runs = torch.cat([
        ode_log_likelihood(net, diffusion, x.repeat(repeats, 1), probe=probe, generator=torch.Generator().manual_seed(seed))[0]
        .reshape(repeats, len(x))
        for seed in range(4)
    ])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
    assert (se > 0.01).all()  # the probe's variance is not zero: the test is not vacuous
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert ((mean - true).abs() < 4 * se + 0.01 * true.abs()).all(), (mean, true, se)


def test_bpd_of_uint8_images_adds_the_bin_width():
    """A Gaussian fit to dequantized images: ode_bpd = -log p/(D ln 2) + log₂ 127.5 of the same
    dequantized y, whose bins around k/127.5 - 1 are 1/127.5 wide."""
    diffusion = make_diffusion(PROCESSES["flow"])
    images = torch.randint(0, 256, (2, DIM), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = dequantize(images, torch.Generator().manual_seed(1))
    assert ((y - to_model_range(images)).abs() <= 0.5 / 127.5 + 1e-6).all()
    mu, q, eigenvalues = torch.zeros(DIM, dtype=torch.float64), torch.eye(DIM, dtype=torch.float64), torch.full((DIM,), 0.3, dtype=torch.float64)
    net = ExactNetwork(diffusion, mu, q, eigenvalues)
    bpd, _ = ode_bpd(net, diffusion, images, generator=torch.Generator().manual_seed(1), exact_trace=True)
    expected = -_true_log_p(y.double(), mu, q, eigenvalues) / (DIM * math.log(2)) + BPD_OFFSET
    assert BPD_OFFSET == pytest.approx(7 - math.log2(256 / 255))
    assert torch.allclose(bpd, expected, rtol=0.01), (bpd, expected)


def _untrained_unet():
    """unet-tiny with its zero-initialised layers drawn small, so v depends on x."""
    torch.manual_seed(0)
    net = create_model("unet-tiny", in_channels=1, image_size=8, learn_sigma=False, num_classes=None, dropout=0.0)
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    return net


def test_heldout_bpd_of_a_flow_model_is_finite_positive_and_seeded():
    net, diffusion = _untrained_unet(), make_diffusion(PROCESSES["flow"])
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = heldout_bpd(net, diffusion, images, batch_size=2, seed=4, ode_tolerance=1e-3)
    assert math.isfinite(first) and first > 0
    assert heldout_bpd(net, diffusion, images, batch_size=2, seed=4, ode_tolerance=1e-3) == first
    assert heldout_bpd(net, diffusion, images, batch_size=2, seed=5, ode_tolerance=1e-3) != first
    assert net.training  # the mode is restored


def test_importing_diffusion_loads_no_scipy():
    code = "import sys, diffusion.process.likelihood, diffusion.training.loop; print('scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
