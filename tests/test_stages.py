"""The stage modules on their own: the sample grid, and what importing a stage costs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from diffusion.stages.sample import image_grid


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


def test_samples_carry_the_sampling_settings_that_evaluate_records(tmp_path) -> None:
    from diffusion.data import DatasetError
    from diffusion.stages.evaluate import load_samples

    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    sampling = {"sampler": "ddim", "steps": 5, "eta": 0.0, "clip_denoised": True, "threshold": None}
    np.savez(tmp_path / "new.npz", images=images, labels=np.zeros(2), sampling=np.array(json.dumps(sampling)))
    loaded, settings = load_samples(tmp_path / "new.npz")
    assert settings == sampling and np.array_equal(loaded, images)
    np.savez(tmp_path / "old.npz", images=images, labels=np.zeros(2))
    with pytest.raises(DatasetError, match=r"old.npz: records no sampling settings \(an older sample stage wrote it\): run sample again$"):
        load_samples(tmp_path / "old.npz")
