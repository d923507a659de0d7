"""The stage modules on their own: the sample grid, and what importing a stage costs."""

from __future__ import annotations

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
