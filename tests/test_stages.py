"""The stage modules on their own: the sample stage's images and grid, its refusal of
non-finite images and of a batch too large for memory, and what importing a stage costs."""

from __future__ import annotations

import os
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_unet import tiny_unet
from torchvision.utils import make_grid

from diffusion.cli import main
from diffusion.config import parse_params
from diffusion.training.devices import BatchMemoryError
from diffusion.packaged import PackagedDiffusion
from diffusion.stages.paths import MODEL
from diffusion.images import image_grid
from diffusion.stages.sample import generate
from conftest import full_params

PROCESS = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}


def _spec(num_classes: int | None) -> dict:
    return {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": num_classes}


def test_sample_stage_images_do_not_depend_on_the_batch_size() -> None:
    """``sample.batch_size`` only sets how many images a pass holds: image k is image k of
    ``sample.seed`` in batches of 7, 3 or 1 (the uint8 images agree to one level, the float
    samples to CPU rounding: tests/test_samplers.py)."""
    packaged = PackagedDiffusion(_spec(3), PROCESS, net=tiny_unet(num_classes=3))

    def images(batch_size: int, seed: int = 0) -> torch.Tensor:
        sample = {"num_samples": 7, "batch_size": batch_size, "sampler": "ddpm", "steps": 3, "seed": seed}
        params = parse_params(full_params({"model": {"name": "unet-tiny"}, "data": {"image_size": 8}, "sample": sample}))
        out, labels = generate(packaged, params, torch.device("cpu"))
        assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
        return out.int()

    whole = images(7)
    for batch_size in (3, 1):
        diff = (images(batch_size) - whole).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, batch_size
    assert (images(7, seed=1) - whole).abs().float().mean() > 20


@pytest.mark.parametrize(("channels", "count", "columns"), [(1, 16, 4), (3, 7, 3), (1, 3, 5)])
def test_image_grid_is_torchvisions_make_grid(channels: int, count: int, columns: int) -> None:
    images = torch.randint(0, 256, (count, channels, 5, 6), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
    reference = make_grid(images.float() / 255, nrow=columns, padding=2, pad_value=1.0)
    reference = (reference * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    grid = image_grid(images, columns)
    if channels == 1:
        assert grid.ndim == 2
        grid = np.repeat(grid[..., None], 3, axis=-1)  # make_grid repeats one channel to three
    np.testing.assert_array_equal(grid, reference)


def test_train_and_sample_start_without_torchvision_or_clean_fid() -> None:
    """torchvision (with torch._dynamo) costs 1.5 s to import and clean-fid more: every
    sweep trial starts train and sample once, so only prepare and evaluate may load them."""
    code = (
        "import sys, diffusion.stages.train, diffusion.stages.sample; "
        "print(sorted(m for m in ('torchvision', 'cleanfid', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_non_finite_samples_are_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys) -> None:
    """Finite weights whose activations overflow: class 1's label embedding at 1e38 makes
    its images NaN (2 of 7: labels cycle 0, 1, 2). The stage, run by the command, names
    how many in one line and writes no samples."""
    net = tiny_unet(num_classes=3)
    with torch.no_grad():
        net.label_embed.weight[1] = 1e38
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    PackagedDiffusion(_spec(3), PROCESS, net=net).save(MODEL)
    sample = {"num_samples": 7, "batch_size": 3, "sampler": "ddpm", "steps": 3, "device": "cpu"}
    params = {"model": {"name": "unet-tiny", "conditioning": "class"}, "data": {"image_size": 8}, "sample": sample}
    Path("params.yaml").write_text(yaml.safe_dump(full_params(params)))

    assert main(["sample"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "diffusion sample: error: 2 of 7 images hold NaN or inf with sample.sampler 'ddpm' and sample.steps 3 "
        "(the model or these settings diverge); nothing written"
    )
    assert not Path("samples").exists()


class WideLayer(torch.nn.Module):
    """The tiny U-Net behind a layer whose activations take ``bytes_per_image`` bytes an
    image (allocated, never filled): a network too wide for a large batch."""

    def __init__(self, net: torch.nn.Module, bytes_per_image: int):
        super().__init__()
        self.net, self.floats_per_image = net, bytes_per_image // 4

    def forward(self, x, t, y=None):
        x.new_empty((x.shape[0], self.floats_per_image))
        return self.net(x, t, y)


@pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
    reason="with unconditional overcommit the allocation succeeds",
)
def test_sample_batch_too_large_for_memory_is_one_line() -> None:
    """16 images of a quarter of the machine's memory each: the allocator refuses the batch
    at the first network call."""
    quarter = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 16 * 4  # bytes, whole floats
    packaged = PackagedDiffusion(_spec(None), PROCESS, net=WideLayer(tiny_unet(), quarter))
    sample = {"num_samples": 16, "batch_size": 16, "sampler": "ddim", "steps": 2, "guidance_scale": 1.0}
    params = parse_params(full_params({"model": {"name": "unet-tiny", "conditioning": "none"}, "data": {"image_size": 8},
                                       "sample": sample}))
    with pytest.raises(BatchMemoryError) as err:
        generate(packaged, params, torch.device("cpu"))
    assert str(err.value) == (
        f"sample.batch_size: 16 does not fit in cpu memory (tried to allocate {16 * quarter} bytes); "
        "allowed: a smaller sample.batch_size"
    )
def test_samples_carry_the_sampling_settings_that_evaluate_records(tmp_path) -> None:
    from diffusion.data.dataset import DatasetError
    from diffusion.stages.evaluate import load_samples

    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    sampling = {"sampler": "ddim", "steps": 5, "eta": 0.0, "clip_denoised": True, "threshold": None}
    np.savez(tmp_path / "new.npz", images=images, labels=np.zeros(2), sampling=np.array(json.dumps(sampling)))
    loaded, settings = load_samples(tmp_path / "new.npz")
    assert settings == sampling and np.array_equal(loaded, images)
    np.savez(tmp_path / "old.npz", images=images, labels=np.zeros(2))
    with pytest.raises(DatasetError, match=r"old.npz: records no sampling settings \(an older sample stage wrote it\): run sample again$"):
        load_samples(tmp_path / "old.npz")
