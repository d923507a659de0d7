"""The in-training KID curve (``train.eval_every``): its steps, its survival of a resume, the
trajectory it leaves alone, and the train stage's KID and FID against the same images drawn again."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import full_params, section
from diffusion.config import ConfigError, parse_params
from diffusion.evaluation.metrics import fid_from_features, inception_features, kid_from_features
from diffusion.images import to_uint8
from diffusion.models.factory import create_model
from diffusion.packaged import PackagedDiffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.schedules import make_betas
from diffusion.stages.train import TrainingData, sample_quality
from diffusion.training.checkpoint import checkpoint_path
from diffusion.training.loop import train

T = 20
SIZE = 8
NUM_CLASSES = 3

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(**changes):
    base = dict(
        steps=7, batch_size=4, lr=1e-3, warmup_steps=2, log_every=2, checkpoint_every=3, ema_decay=0.9, seed=7,
        device="cpu", precision="fp32", bpd_images=0, val_images=0, eval_every=3, eval_images=4, eval_steps=3,
        eval_sampler="dpm++2m",
    )
    return section("train", **(base | changes))


SPEC = {"name": "unet-tiny", "in_channels": 1, "image_size": SIZE, "learn_sigma": False, "num_classes": NUM_CLASSES,
        "overrides": {"dropout": 0.1}}  # dropout: training draws from torch's global RNG
PROCESS = {"process": "ddpm", "schedule": "cosine", "timesteps": T, "zero_terminal_snr": False, "prediction": "eps",
           "variance": "fixed_small", "loss": "mse", "sigma_data": 0.5}


def _diffusion():
    return GaussianDiffusion(make_betas("cosine", T, False), prediction="eps", variance="fixed_small", loss="mse")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, NUM_CLASSES, (16,), generator=g)


def _train(folder: Path, data, cfg, evaluate=None, logs=None):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=1, image_size=SIZE, num_classes=NUM_CLASSES, dropout=0.1)
    images, labels = data
    log = (lambda step, metrics: logs.append((step, metrics))) if logs is not None else None
    return train(model, _diffusion(), images, labels, cfg, checkpoint_dir=folder, evaluate=evaluate, log=log,
                 conditional=True, progress=False)


def weight_sum(step: int, ema_model: torch.nn.Module) -> dict[str, float]:
    """A stand-in for the stage's evaluation: a number of the EMA weights, after a draw from
    torch's global RNG (the stream dropout uses) that must not reach the training."""
    torch.randn(100)
    return {"train_kid": float(sum(p.double().sum() for p in ema_model.parameters()))}


def test_curve_steps_log_and_untouched_trajectory(tmp_path, data):
    """Every eval_every steps and at the last; logged with the running seconds; the weights
    are bit for bit those of a run without it."""
    logs = []
    with_eval = _train(tmp_path / "on", data, _cfg(), weight_sum, logs)
    without = _train(tmp_path / "off", data, _cfg())
    assert [step for step, _, _ in with_eval.eval_curve] == [3, 6, 7] and without.eval_curve == []
    assert with_eval.eval_curve[-1][1] == weight_sum(7, with_eval.ema_model)
    logged = [(step, m) for step, m in logs if "train_kid" in m]
    assert [(step, m["train_kid"]) for step, m in logged] == [(s, m["train_kid"]) for s, m, _ in with_eval.eval_curve]
    seconds = [m["train_eval_seconds"] for _, m in logged]
    assert seconds == pytest.approx(np.cumsum([s for *_, s in with_eval.eval_curve])) and seconds[0] > 0
    for a, b in zip(with_eval.ema_model.state_dict().values(), without.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_curve_survives_a_resume(tmp_path, data):
    """A run killed after its step-3 checkpoint and run again gives the straight run's curve."""
    straight = _train(tmp_path / "straight", data, _cfg(), weight_sum)
    _train(tmp_path / "killed", data, _cfg(), weight_sum)
    for step in (6, 7):  # as if killed after step 3's checkpoint
        checkpoint_path(tmp_path / "killed", step).unlink()
    resumed = _train(tmp_path / "killed", data, _cfg(), weight_sum)
    assert [(s, m) for s, m, _ in resumed.eval_curve] == [(s, m) for s, m, _ in straight.eval_curve]
    assert [s for s, _, _ in straight.eval_curve] == [3, 6, 7]


def test_stage_kid_and_fid_are_those_of_the_seeded_unguided_images(tmp_path, data):
    """train_kid and train_fid at the last step equal KID and FID of the images the EMA model
    draws again from (train.seed, k), labels 0, 1, 2, 0, unguided, with the eval sampler."""
    cfg = _cfg(steps=2, eval_every=2)
    reference = np.random.default_rng(0).normal(size=(6, 2048)).astype(np.float32)
    images, labels = data
    packaged = PackagedDiffusion(SPEC, PROCESS)
    evaluate = sample_quality(cfg, packaged, TrainingData(images, labels, images, tmp_path / "train.npz"), reference)
    result = _train(tmp_path, data, cfg, evaluate)
    [(step, measured, _)] = result.eval_curve
    again = PackagedDiffusion(SPEC, PROCESS, net=result.ema_model).sample(
        4, labels=torch.tensor([0, 1, 2, 0]), seed=cfg.seed, sampler="dpm++2m", steps=3, schedule="log-snr",
        guidance_scale=1.0, precision="fp32",
    )
    features = inception_features(to_uint8(again), device="cpu")
    assert step == 2
    assert measured == {"train_kid": kid_from_features(features, reference), "train_fid": fid_from_features(features, reference)}
    other = PackagedDiffusion(SPEC, PROCESS, net=result.ema_model).sample(
        4, labels=torch.tensor([0, 1, 2, 0]), seed=cfg.seed + 1, sampler="dpm++2m", steps=3, schedule="log-snr",
        guidance_scale=1.0, precision="fp32",
    )
    # control: other images (another seed) give another KID
    assert kid_from_features(inception_features(to_uint8(other), device="cpu"), reference) != measured["train_kid"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"train": {"eval_images": 1}}, "train.eval_images: 1 image has no covariance (FID) and no pairs (KID)"),
    ({"train": {"eval_sampler": "euler"}}, "train.eval_sampler: euler steps in the process's own time"),
    ({"train": {"eval_steps": 1001}}, "train.eval_steps: 1001 is more than diffusion.timesteps (1000)"),
    ({"train": {"eval_images": 0}, "sweep": {"prune_on": "train_kid"}}, "sweep.prune_on: train_kid is measured only"),
    ({"sweep": {"prune_on": "kid"}}, "sweep.prune_on: got 'kid'"),
])
def test_bad_eval_params_are_one_line(changes, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(full_params(changes), "params.yaml")
    assert str(err.value).startswith(f"params.yaml: {expected}") and "\n" not in str(err.value)
    parse_params(full_params({"train": {"eval_images": 0}}))  # off


def test_sweep_prunes_on_the_metric_prune_on_names():
    """``sweep.prune_on: train_kid``: the trial's reporter reads train_kid's history, not val_loss's."""
    from types import SimpleNamespace

    from flows.pruning import PruningReporter

    history = {"val_loss": [(10, 0.5)], "train_kid": [(150, 0.02), (300, 0.01)]}
    client = SimpleNamespace(get_metric_history=lambda run_id, key: [SimpleNamespace(step=s, value=v) for s, v in history[key]])
    reported = []
    trial = SimpleNamespace(report=lambda value, step: reported.append((step, value)), should_prune=lambda: False)
    reporter = PruningReporter.for_trial(trial, client, "run", train_steps=450, metric="train_kid")
    assert reporter.report() and reported == history["train_kid"]
    PruningReporter.for_trial(trial, client, "run", train_steps=450).report()
    assert reported[2:] == history["val_loss"]  # the default: val_loss
