"""EDM2's post-hoc EMA (diffusion/training/posthoc_ema.py): the exact discrete profiles, the
reconstruction against directly tracked EMAs, σ_rel against EDM2's numbers, bad lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import full_params
from diffusion.config import MAX_EMA_LENGTH, ConfigError, parse_params
from diffusion.errors import UserError
from diffusion.training.posthoc_ema import (
    PosthocEMA, PowerEMA, _gram, gamma_to_sigma_rel, reconstruct, sigma_rel_to_gamma, solve,
)


def profile(sigma_rel: float, step: int, steps: int) -> np.ndarray:
    """w_γ(τ; t) for τ = 1..steps, from its product form Π β_s (not the module's closed form)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    betas = np.array([(1 - 1 / s) ** (gamma + 1) for s in range(1, step + 1)])
    later = np.append(np.cumprod(betas[::-1])[::-1][1:], 1.0)  # Π_{s=τ+1..t} β_s
    return np.concatenate([(1 - betas) * later, np.zeros(steps - step)])


def tracks(trajectory: torch.Tensor, sigma_rels: list[float], every: int, direct: list[float]) -> tuple[PosthocEMA, list[PowerEMA]]:
    """Step a bias-free float64 linear layer through the weights ``trajectory`` [steps, out, in],
    updating the snapshotted tracks of ``sigma_rels`` and directly tracked EMAs of ``direct`` as the loop does."""
    model = nn.Linear(trajectory.shape[2], trajectory.shape[1], bias=False, dtype=torch.float64)
    posthoc, tracked = PosthocEMA(model, sigma_rels, every), [PowerEMA(model, s) for s in direct]
    for step, weight in enumerate(trajectory, start=1):
        model.weight.data.copy_(weight)
        posthoc.update(model, last=step == len(trajectory))
        for track in tracked:
            track.update(model)
    return posthoc, tracked


def test_snapshots_of_every_step_reconstruct_a_tracked_ema_to_float_precision():
    """One track (σ_rel 0.10) snapshotted at every step spans every profile, so the EMA of any
    other length is an exact combination of the snapshots. float64: the Gram matrix of 200
    every-step profiles has condition number ~1e4 (asserted), so its solve loses at most ~1e4 of
    eps = 1.1e-16, and the log-space running sums add ~200 eps: errors ~1e-12; rtol 1e-9 is a
    thousandfold margin that no machine's rounding closes."""
    steps, targets = 200, [0.03, 0.05, 0.2, 0.28]
    trajectory = 5.0 + torch.randn(steps, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).cumsum(0)
    posthoc, direct = tracks(trajectory, [0.10], every=1, direct=targets)
    assert [s["step"] for s in posthoc.snapshots] == list(range(1, steps + 1))
    gram = _gram(np.full(steps, sigma_rel_to_gamma(0.10)), np.arange(1, steps + 1))
    assert np.linalg.cond(gram) < 1e5
    for track in direct:
        rebuilt = reconstruct(posthoc.snapshots, track.sigma_rel)
        scale = track.model.weight.abs().max().item()  # the walks cross zero: relative to the largest weight
        assert torch.allclose(rebuilt["weight"], track.model.weight, rtol=1e-9, atol=1e-9 * scale), track.sigma_rel


def test_the_gram_matrix_and_weights_match_explicit_profiles():
    """The closed form (1 - β_τ)(τ/t)^(γ+1) summed in log space against the product of β's and
    numpy's least squares on the explicit [steps, snapshots] matrix."""
    steps = 120
    sources = [(s, t) for s in (0.05, 0.10) for t in range(10, steps + 1, 10)]
    explicit = np.stack([profile(s, t, steps) for s, t in sources], axis=1)
    assert np.allclose(explicit.sum(axis=0), 1.0, rtol=1e-13)  # β_1 = 0: every profile sums to one
    gammas = np.array([sigma_rel_to_gamma(s) for s, _ in sources])
    gram = _gram(gammas, np.array([t for _, t in sources]))
    np.testing.assert_allclose(gram, explicit.T @ explicit, rtol=1e-11)
    for target in (0.03, 0.08, 0.2):
        weights = np.linalg.lstsq(explicit, profile(target, steps, steps), rcond=None)[0]
        np.testing.assert_allclose(solve(sources, target), weights / weights.sum(), rtol=0, atol=1e-7 * np.abs(weights).max())


def test_sparse_snapshots_of_two_tracks_reconstruct_a_random_walk_within_its_predicted_error():
    """Two tracks (0.05, 0.10) snapshotted every 10 steps (and at the last, 305) of 4,000
    independent unit-step random walks. The error is Σ_τ r(τ) θ(τ) with r the residual profile
    (Σ r = 0, the weights summing to one), so over the walks its variance is r'Kr, K = min(τ, τ'):
    the measured RMS matches that within 10% (its sampling error is 1/sqrt(2 · 4000) ≈ 1.1%), and
    the prediction itself is below 1% of the walks' spread about their mean and below a tenth of
    what the nearest track's last snapshot misses by."""
    steps, walks = 305, 4000
    trajectory = torch.randn(steps, walks, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).cumsum(0)
    targets = [0.03, 0.08, 0.2]
    posthoc, direct = tracks(trajectory, [0.05, 0.10], every=10, direct=targets)
    assert [s["step"] for s in posthoc.snapshots][-4:] == [300, 300, 305, 305]
    sources = [(s["sigma_rel"], s["step"]) for s in posthoc.snapshots]
    explicit = np.stack([profile(s, t, steps) for s, t in sources], axis=1)
    tau = np.arange(1, steps + 1)
    brownian = np.minimum.outer(tau, tau).astype(np.float64)
    spread = math.sqrt(np.trace(brownian) / steps - brownian.sum() / steps**2)  # E[mean_τ (θ - mean θ)²]^½
    for track in direct:
        target = profile(track.sigma_rel, steps, steps)
        residual = explicit @ solve(sources, track.sigma_rel) - target
        predicted = math.sqrt(residual @ brownian @ residual)
        nearest = min((0.05, 0.10), key=lambda s: abs(s - track.sigma_rel))
        naive = profile(nearest, steps, steps) - target
        error = reconstruct(posthoc.snapshots, track.sigma_rel)["weight"] - track.model.weight
        measured = error.square().mean().sqrt().item()
        assert 0.9 * predicted < measured < 1.1 * predicted, (track.sigma_rel, measured, predicted)
        assert predicted < 0.01 * spread and predicted < 0.1 * math.sqrt(naive @ brownian @ naive), track.sigma_rel


def test_sigma_rel_and_gamma_match_edm2():
    """EDM2 Sec. 3.1: γ = 16.97 for σ_rel 0.05 and 6.94 for 0.10 (given to two decimals); the
    inverse round-trips; the discrete profile's standard deviation over τ/t tends to σ_rel."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.001, 0.01, 0.05, 0.1, 0.2, 0.28, 0.2886):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(MAX_EMA_LENGTH, rel=1e-15)
    steps = 20_000  # O(1/t) from the continuous limit
    weights, ages = profile(0.10, steps, steps), np.arange(1, steps + 1) / steps
    mean = weights @ ages
    assert math.sqrt(weights @ (ages - mean) ** 2) == pytest.approx(0.10, rel=1e-3)


def test_a_bad_length_is_a_one_line_error():
    for bad in (0.0, -0.1, 0.3, MAX_EMA_LENGTH):
        with pytest.raises(ValueError, match=r"^sigma_rel: got .*; allowed 0 < sigma_rel < 0\.2887 \(gamma > 0, EDM2 Eq\. 123\)$"):
            sigma_rel_to_gamma(bad)
    cases = {
        "train.ema_lengths: got 0.3; allowed 0 < sigma_rel < 0.2887": {"train": {"ema_lengths": [0.05, 0.3]}},
        "train.ema_lengths: [0.1, 0.1] names a length twice": {"train": {"ema_lengths": [0.1, 0.1]}},
        "sample.ema_length: got 0.5; allowed 0 < sigma_rel < 0.2887": {"sample": {"ema_length": 0.5}},
        "sample.ema_length: 0.1 is reconstructed from the snapshots of train.ema_lengths, which is []": {
            "train": {"ema_lengths": []}, "sample": {"ema_length": 0.1},
        },
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_params(full_params(raw))
        assert message in str(err.value) and "\n" not in str(err.value)
    assert parse_params(full_params({"sample": {"ema_length": 0.2}})).sample.ema_length == 0.2


def test_the_sample_stages_load_the_reconstructed_weights(tmp_path, monkeypatch):
    """load_model, which the sample and fit_schedule stages both call: models/model.pt's network,
    and with sample.ema_length the same network with the reconstructed weights."""
    from diffusion.packaged import PackagedDiffusion
    from diffusion.stages.paths import EMA_SNAPSHOTS, MODEL
    from diffusion.stages.sample import load_model
    from diffusion.training.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    spec = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None, "overrides": {}}
    process = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
    torch.manual_seed(0)
    packaged = PackagedDiffusion(spec, process)
    posthoc = PosthocEMA(packaged.net, [0.05, 0.10], every=2)
    for step in range(1, 7):
        with torch.no_grad():
            for weight in packaged.net.parameters():
                weight.add_(torch.randn_like(weight))
        posthoc.update(packaged.net, last=step == 6)
    packaged.save(MODEL)
    save_checkpoint(EMA_SNAPSHOTS, {"snapshots": posthoc.snapshots})
    today = load_model(parse_params(full_params()), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(today.net.state_dict().values(), packaged.net.state_dict().values()))
    chosen = load_model(parse_params(full_params({"sample": {"ema_length": 0.2}})), torch.device("cpu"))
    expected = reconstruct(posthoc.snapshots, 0.2)
    assert all(torch.equal(chosen.net.state_dict()[key], value) for key, value in expected.items())
    save_checkpoint(EMA_SNAPSHOTS, {"snapshots": []})
    with pytest.raises(UserError, match=r"^sample.ema_length: models/ema_snapshots.pt holds no snapshots \(train.ema_lengths was \[\]\): run `dvc repro train`$"):
        load_model(parse_params(full_params({"sample": {"ema_length": 0.2}})), torch.device("cpu"))
