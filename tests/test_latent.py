"""Latent diffusion: the latents file and its scale factor, the packaged latent model (every
sampler, both guidances, save and load), the params rules of latent space, and the whole
pipeline through `dvc repro` with the autoencoder stages skipped on a diffusion change."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import TINY_PARAMS, copy_repo, full_params, pipeline_env, run_in
from mlflow import MlflowClient

from diffusion.config import ConfigError, merge_params, parse_params
from diffusion.data.latents import Latents, latent_scale_factor, load_latents, save_latents
from diffusion.models.classifier import create_classifier
from diffusion.models.configs import VAE_CONFIGS
from diffusion.models.vae import KLAutoencoder
from diffusion.packaged import PackagedDiffusion, load_autoencoder
from diffusion.sampling.specs import SAMPLER_SPECS
from diffusion.stages.encode import encode_images

PROCESS = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}


def tiny_autoencoder(in_channels: int = 1) -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder(in_channels=in_channels, **VAE_CONFIGS["vae-tiny"]).eval()


def latent_model(process: dict | None = None, **sampling) -> PackagedDiffusion:
    """A class-conditional unet-tiny on the 2 x 8 x 8 latents of vae-tiny (16 px images), on
    ``process`` (a diffusion section; default :data:`PROCESS`, the discrete chain)."""
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder()
    spec = {"name": "unet-tiny", "in_channels": 2, "image_size": 8, "learn_sigma": False, "num_classes": 3, "overrides": {}}
    return PackagedDiffusion(
        spec, process or PROCESS, sampling={"clip_denoised": False, **sampling},
        autoencoder={"config": autoencoder.config, "scale_factor": 2.5}, decoder=autoencoder,
    )


# ---------------------------------------------------------------- latents and the scale factor


def test_scale_factor_gives_the_training_latents_unit_std(tmp_path):
    """encode_images on 16 px images, then 1 / std: the scaled training latents have std 1
    (to float64 rounding), and the file keeps raw latents, labels and factor."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 1, 16, 16, generator=gen) * 255).to(torch.uint8)
    z = encode_images(tiny_autoencoder(), images, posterior="mean", seed=0, batch_size=16, device="cpu")
    assert z.shape == (40, 2, 8, 8)
    scale = latent_scale_factor(z)
    assert scale == pytest.approx(1 / z.double().std().item())
    labels = torch.arange(40) % 3
    save_latents(tmp_path / "l.npz", Latents(z[:30], z[30:], labels[:30], labels[30:], latent_scale_factor(z[:30]), {"a": 1}))
    loaded = load_latents(tmp_path / "l.npz")
    assert loaded.scaled("train").double().std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(loaded.heldout, z[30:]) and torch.equal(loaded.train_labels, labels[:30]) and loaded.meta == {"a": 1}


def test_posterior_samples_are_seeded_per_image():
    """vae.posterior: sample draws mean + std * eps, image k's eps from (seed, k): any batch size gives
    the same latents, another seed others, and the draw's spread is the posterior's std."""
    images = (torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    ae = tiny_autoencoder()
    a = encode_images(ae, images, posterior="sample", seed=3, batch_size=5, device="cpu")
    b = encode_images(ae, images, posterior="sample", seed=3, batch_size=12, device="cpu")
    c = encode_images(ae, images, posterior="sample", seed=4, batch_size=12, device="cpu")
    mean = encode_images(ae, images, posterior="mean", seed=3, batch_size=12, device="cpu")
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)
    with torch.no_grad():
        std = ae.encode(images.float() / 127.5 - 1).std
    assert ((a - mean) / std).std().item() == pytest.approx(1.0, abs=0.1)


# ---------------------------------------------------------------- the packaged latent model


@pytest.mark.parametrize("sampler", list(SAMPLER_SPECS))
def test_every_sampler_decodes_latents_to_images(sampler, single_thread):
    """Each sampler draws 2 x 8 x 8 latents and returns the decoded 1 x 16 x 16 images in [-1, 1],
    exactly D(z / scale) of the latents the sampler drew; those in the process's own time
    (euler, sde) on the flow, the others on the discrete chain."""
    flow = {**PROCESS, "process": "flow", "schedule": None, "prediction": None}
    packaged = latent_model(flow if SAMPLER_SPECS[sampler].continuous_only else None)
    labels = torch.tensor([0, 2])
    images = packaged.sample(2, sampler=sampler, steps=4, clip_denoised=False, guidance_scale=2.0, labels=labels, seed=0)
    assert images.shape == (2, *packaged.output_shape) == (2, 1, 16, 16)
    assert images.abs().max() <= 1 and torch.isfinite(images).all()
    decoder, packaged.autoencoder = packaged.autoencoder, None  # the latents alone, same seed
    latents = packaged.sample(2, sampler=sampler, steps=4, clip_denoised=False, guidance_scale=2.0, labels=labels, seed=0)
    packaged.autoencoder = decoder
    assert torch.allclose(images, packaged.decode(latents), atol=1e-6)


def test_classifier_guidance_in_latent_space_changes_the_samples(single_thread):
    """A classifier on the latents guides: scale 0 equals no classifier, scale 10 does not."""
    packaged = latent_model()
    torch.manual_seed(1)
    classifier = create_classifier("classifier-tiny", in_channels=2, image_size=8, num_classes=3).eval()
    with torch.no_grad():  # a fresh classifier's output layer is zero: give it a gradient
        for weight in classifier.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    kwargs = dict(sampler="ddim", steps=4, clip_denoised=False, labels=torch.tensor([1, 2]), seed=0)
    plain = packaged.sample(2, **kwargs)
    assert torch.equal(plain, packaged.sample(2, classifier=classifier, classifier_scale=0.0, **kwargs))
    guided = packaged.sample(2, classifier=classifier, classifier_scale=10.0, **kwargs)
    assert (guided - plain).abs().max() > 1e-3


def test_sample_defaults_to_the_models_own_settings(single_thread):
    """sample(n) with no settings samples as forward does, with the model's: a latent model's
    are unclipped, so sample(n) works on it (clip_denoised on latents is refused)."""
    packaged = latent_model(steps=3)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    assert torch.equal(packaged.sample(2, noise=noise, labels=labels), packaged(noise, labels))
    assert packaged.sample(2, seed=0).shape == (2, 1, 16, 16)


def test_latent_model_saves_with_its_decoder(tmp_path):
    """model.pt carries the autoencoder and the factor: the loaded model draws the same images;
    clip_denoised or threshold on latents is refused in one line."""
    packaged = latent_model()
    packaged.save(tmp_path / "model.pt")
    loaded = PackagedDiffusion.load(tmp_path / "model.pt")
    assert loaded.autoencoder_spec == {"config": packaged.autoencoder.config, "scale_factor": 2.5}
    kwargs = dict(sampler="ddim", steps=3, clip_denoised=False, labels=torch.tensor([0]), seed=5)
    assert torch.equal(packaged.sample(1, **kwargs), loaded.sample(1, **kwargs))
    assert loaded(torch.randn(2, 2, 8, 8)).shape == (2, 1, 16, 16)  # forward: x_T -> images, stored sampling
    with pytest.raises(ValueError, match="clip_denoised and threshold clip pixels"):
        loaded.sample(1, clip_denoised=True)


# ---------------------------------------------------------------- params


def latent_params(**changes) -> dict:
    base = full_params(TINY_PARAMS)
    return merge_params(base, {"model": {"space": "latent", "name": "unet-tiny"}, "vae": {"name": "vae-tiny"}} | changes)


def test_latent_params_check_the_network_on_the_latents():
    parse_params(latent_params())  # 28 px through f = 2: 14 x 14 latents, unet-tiny halves once
    with pytest.raises(ConfigError, match=r"model.space: latent: dit-tiny does not fit the 7 x 7 latents of vae-f4-cpu"):
        parse_params(latent_params(model={"space": "latent", "name": "dit-tiny"}, vae={"name": "vae-f4-cpu"}))
    with pytest.raises(ConfigError, match=r"data.image_size: 28 is not divisible by 8, the autoencoder's down-sampling"):
        parse_params(latent_params(vae={"name": "kl-f8"}))
    with pytest.raises(ConfigError, match=r"train.hflip: flips pixels"):
        parse_params(latent_params(train={"hflip": True}))
    with pytest.raises(ConfigError, match=r"sample.threshold: dynamic thresholding clips pixels"):
        parse_params(latent_params(sample={"threshold": 0.99}))


def test_pretrained_autoencoder_folder_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"vae.pretrained: .*config.json not found"):
        parse_params(latent_params(vae={"pretrained": str(tmp_path)}))
    config = {"_class_name": "AutoencoderKL", "in_channels": 1, "out_channels": 1, "latent_channels": 4,
              "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "act_fn": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    parse_params(latent_params(vae={"pretrained": str(tmp_path)}))
    (tmp_path / "config.json").write_text(json.dumps(config | {"act_fn": "gelu"}))
    with pytest.raises(ConfigError, match=r"config.json: act_fn is 'gelu'; allowed: 'silu'"):
        parse_params(latent_params(vae={"pretrained": str(tmp_path)}))


# ---------------------------------------------------------------- the pipeline


@pytest.mark.integration
def test_latent_pipeline_through_dvc_repro(tmp_path, prepared_repo):
    """model.space: latent on the tiny pipeline: train_vae, encode, train (with a latent
    classifier for guidance), sample and evaluate; then a diffusion and network change re-runs
    train (a latent DiT), not train_vae or encode, and leaves sample to re-run."""
    params = merge_params(TINY_PARAMS, {
        "model": {"space": "latent", "name": "unet-tiny"},
        "vae": {"name": "vae-tiny", "steps": 40, "batch_size": 16, "log_every": 10, "checkpoint_every": 20, "grid_images": 4},
        "guidance": {"classifier": True, "classifier_model": "classifier-tiny", "classifier_steps": 10,
                     "classifier_batch_size": 16, "classifier_eval_images": 16, "classifier_eval_bins": 2},
    })
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)
    out = run_in(repo, "dvc", "repro")
    for stage in ("train_vae", "encode", "train", "train_classifier", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    vae = json.loads((repo / "metrics/vae.json").read_text())
    assert vae["heldout_mse"] < vae["mean_image_mse"]
    latents = load_latents(repo / "data/latents.npz")
    assert latents.train.shape[1:] == (2, 14, 14)
    assert latents.scaled("train").std().item() == pytest.approx(1.0, abs=1e-4)
    autoencoder, info = load_autoencoder(repo / "models/vae.pt")
    assert info["source"] == "trained" and autoencoder.config["in_channels"] == 1
    packaged = PackagedDiffusion.load(repo / "models/model.pt")
    assert packaged.image_shape == (2, 14, 14) and packaged.output_shape == (1, 28, 28)
    assert packaged.autoencoder_spec["scale_factor"] == pytest.approx(latents.scale_factor)
    import numpy as np

    with np.load(repo / "samples/samples.npz") as samples:
        assert samples["images"].shape == (TINY_PARAMS["sample"]["num_samples"], 1, 28, 28)
        assert json.loads(str(samples["sampling"]))["clip_denoised"] is False
    assert math.isfinite(json.loads((repo / "metrics/evaluate.json").read_text())["fid"])
    assert "bpd" not in json.loads((repo / "metrics/train.json").read_text())
    client = MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    vae_run = client.get_run(json.loads((repo / "models/vae_run.json").read_text())["run_id"])
    assert vae_run.data.metrics["heldout_mse"] == pytest.approx(vae["heldout_mse"]) and "vae_loss" in vae_run.data.metrics
    (version,) = client.search_model_versions("name = 'autoencoder'")
    assert version.run_id == vae_run.info.run_id and float(version.tags["heldout_mse"]) == pytest.approx(vae["heldout_mse"], rel=1e-4)

    changed = yaml.safe_load((repo / "params.yaml").read_text())
    changed["diffusion"]["schedule"] = "linear"
    changed["model"]["name"] = "dit-tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(changed))
    out = run_in(repo, "dvc", "repro", "train")  # a latent DiT on the trained autoencoder's latents
    assert "Running stage 'train'" in out.stdout
    for stage in ("train_vae", "encode"):
        assert f"Running stage '{stage}'" not in out.stdout
    assert type(PackagedDiffusion.load(repo / "models/model.pt").net).__name__ == "DiT"
    status = run_in(repo, "dvc", "status").stdout  # the new model: sample next, then evaluate
    assert "sample:" in status and "train_vae:" not in status and "encode:" not in status
