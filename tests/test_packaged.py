"""The packaged model's sampling settings: what forward samples with, in model.pt and back."""

from __future__ import annotations

import pytest
import torch

from diffusion.training.checkpoint import save_checkpoint
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion

SPEC = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None, "overrides": {}}
PROCESS = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
SAMPLING = {**DEFAULT_SAMPLER, "steps": 3, "clip_denoised": False}


@pytest.fixture
def packaged(single_thread) -> PackagedDiffusion:
    torch.manual_seed(0)
    return PackagedDiffusion(SPEC, PROCESS, sampling=SAMPLING).eval()


def test_forward_samples_with_its_sampling_settings(packaged):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = packaged(noise)
    assert torch.equal(images, packaged.sample(2, noise=noise, **SAMPLING))
    assert torch.equal(images, packaged.sample(2, noise=noise))  # sample()'s defaults are the model's
    assert not torch.equal(images, packaged.sample(2, noise=noise, **DEFAULT_SAMPLER))  # the settings matter


def test_sampling_survives_save_and_load(packaged, tmp_path):
    loaded = PackagedDiffusion.load(packaged.save(tmp_path / "model.pt"))
    assert loaded.sampling == SAMPLING
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(noise), packaged(noise))


def test_a_file_without_sampling_loads_with_the_defaults(packaged, tmp_path):
    state = {"model_spec": SPEC, "process": PROCESS, "state_dict": packaged.net.state_dict()}
    loaded = PackagedDiffusion.load(save_checkpoint(tmp_path / "old.pt", state))
    assert loaded.sampling == DEFAULT_SAMPLER
    assert PackagedDiffusion(SPEC, PROCESS, sampling={"steps": 7}).sampling == {**DEFAULT_SAMPLER, "steps": 7}


def test_a_file_from_before_processes_holds_the_discrete_chain_and_samples_as_before(tmp_path, single_thread):
    """A model file whose process section has no ``process`` (written before there were others)
    is the ddpm chain: it samples exactly as the same section with ``process: ddpm``; a model of
    another process keeps it through save and load."""
    from tiny_unet import tiny_unet

    net = tiny_unet()
    old = {"model_spec": SPEC, "process": PROCESS, "sampling": SAMPLING, "state_dict": net.state_dict()}
    loaded = PackagedDiffusion.load(save_checkpoint(tmp_path / "old.pt", old))
    explicit = PackagedDiffusion(SPEC, {**PROCESS, "process": "ddpm"}, net=net, sampling=SAMPLING)
    assert loaded.diffusion.process.name == "ddpm" and loaded.diffusion.num_timesteps == 50
    for sampler in ("ddpm", "ddim", "heun"):
        assert torch.equal(loaded.sample(2, sampler=sampler, seed=0), explicit.sample(2, sampler=sampler, seed=0))
    flow = PackagedDiffusion(SPEC, {**PROCESS, "process": "flow", "schedule": None, "prediction": None}, net=net, sampling=SAMPLING)
    back = PackagedDiffusion.load(flow.save(tmp_path / "flow.pt"))
    assert back.process["process"] == back.diffusion.process.name == "flow"
    assert torch.equal(back.sample(2, sampler="euler", seed=0), flow.sample(2, sampler="euler", seed=0))


def test_the_packaged_model_imports_none_of_the_helpers_that_use_it():
    """images.py (the sample stage's and ``diffusion generate``'s batches, labels and grids)
    sits above the packaged model: packaged.py's import closure holds none of it, so the
    two do not import each other."""
    from test_dvc_deps import import_closure

    assert "diffusion/images.py" not in import_closure("diffusion.packaged")


def test_an_unknown_sampling_key_fails_with_one_line():
    with pytest.raises(ValueError, match=r"^sampling: unknown seed; allowed sampler, steps, schedule, timesteps, eta, clip_denoised, threshold, guidance_scale, guidance_interval, precision, s_churn, s_tmin, s_tmax, s_noise$"):
        PackagedDiffusion(SPEC, PROCESS, sampling={"seed": 1})


def test_bf16_precision_runs_the_network_in_bf16_and_the_sampler_in_float32(packaged):
    """``precision: bf16``: every convolution's output is bf16 (autocast), the images are
    float32 and within bf16's rounding of the fp32 images, but not equal to them."""
    for p in packaged.net.parameters():  # the U-Net zero-initialises its output layer
        p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
             for m in packaged.net.modules() if isinstance(m, torch.nn.Conv2d)]
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    fp32 = packaged.sample(4, noise=noise, **{**SAMPLING, "precision": "fp32"})
    assert dtypes == {torch.float32}
    dtypes.clear()
    bf16 = packaged.sample(4, noise=noise, **{**SAMPLING, "precision": "bf16"})
    assert dtypes == {torch.bfloat16}
    for hook in hooks:
        hook.remove()
    assert bf16.dtype == torch.float32
    error = (bf16 - fp32).abs().max().item()
    assert 0 < error < 0.05 * fp32.abs().max().item()
