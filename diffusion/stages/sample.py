"""sample: N images from the trained (EMA) model with the chosen sampler.

Outputs: ``samples/samples.npz`` (uint8 images [N, C, H, W] and their labels),
``samples/grid.png`` and ``samples/run.json``: the MLflow run, nested under the
model's run, that the evaluate stage logs FID into.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from diffusion import tracking
from diffusion.config import Params
from diffusion.files import atomic_write
from diffusion.packaged import PackagedDiffusion, to_uint8
from diffusion.stages.train import MODEL, RUN_FILE
from diffusion.train import resolve_device

SAMPLES = Path("samples/samples.npz")
GRID = Path("samples/grid.png")
SAMPLE_RUN_FILE = Path("samples/run.json")


def generate(packaged: PackagedDiffusion, params: Params, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` uint8 images in batches; batch i uses seed ``seed + i``.

    Class-conditional models get labels cycling through the classes, so each grid
    row shows every class.
    """
    cfg = params.sample
    num_classes = packaged.model_spec.get("num_classes")
    labels = torch.arange(cfg.num_samples) % num_classes if num_classes else torch.zeros(cfg.num_samples, dtype=torch.long)
    batches = []
    for i, start in enumerate(range(0, cfg.num_samples, cfg.batch_size)):
        count = min(cfg.batch_size, cfg.num_samples - start)
        batch_labels = labels[start : start + count].to(device) if num_classes else None
        x = packaged.sample(
            count,
            sampler=cfg.sampler,
            steps=cfg.steps,
            eta=cfg.eta,
            clip_denoised=cfg.clip_denoised,
            threshold=cfg.threshold,
            labels=batch_labels,
            seed=cfg.seed + i,
            device=device,
            progress=True,
        )
        batches.append(to_uint8(x).cpu())
    return torch.cat(batches), labels


def run(params: Params) -> None:
    device = resolve_device(params.sample.device)
    packaged = PackagedDiffusion.load(MODEL, map_location=device)
    model_run = tracking.read_run_id(RUN_FILE)
    with tracking.stage_run(
        "sample", params.tracking.experiment, parent_run_id=model_run,
        run_name=f"sample-{params.sample.sampler}{params.sample.steps}",
    ) as active:
        tracking.log_params(params.model_dump(include={"sample", "evaluate"}))
        images, labels = generate(packaged, params, device)
        with atomic_write(SAMPLES) as fh:
            np.savez(fh, images=images.numpy(), labels=labels.numpy())
        rows = params.sample.grid_rows
        grid = images[: rows * rows].float() / 255.0
        save_image(grid, GRID, nrow=rows, padding=2, pad_value=1.0)
        tracking.log_artifact(GRID)
        tracking.write_run_id(SAMPLE_RUN_FILE, active.info.run_id)
