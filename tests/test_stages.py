"""The stage modules on their own: the sample stage's images and grid, and what importing a stage costs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_unet import tiny_unet
from torchvision.utils import make_grid

from diffusion.config import parse_params
from diffusion.packaged import PackagedDiffusion
from diffusion.stages.sample import generate, image_grid


def test_sample_stage_images_do_not_depend_on_the_batch_size() -> None:
    """``sample.batch_size`` only sets how many images a pass holds: image k is image k of
    ``sample.seed`` in batches of 7, 3 or 1 (the uint8 images agree to one level, the float
    samples to CPU rounding: tests/test_samplers.py)."""
    spec = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": 3}
    process = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
    packaged = PackagedDiffusion(spec, process, net=tiny_unet(num_classes=3))

    def images(batch_size: int, seed: int = 0) -> torch.Tensor:
        sample = {"num_samples": 7, "batch_size": batch_size, "sampler": "ddpm", "steps": 3, "seed": seed}
        params = parse_params({"model": {"name": "unet-tiny"}, "data": {"image_size": 8}, "sample": sample})
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
