"""sample: N images from the trained model with the chosen sampler.

Sampling is always from the EMA weights: ``models/model.pt`` stores only them (the
train stage saves the EMA network), so there is no choice to make.

Outputs: ``samples/samples.npz`` (uint8 images [N, C, H, W], their labels and, as
JSON, the sampling settings that drew them, which evaluate records in the FID
protocol), ``samples/grid.png`` and ``samples/run.json``: the MLflow run, nested
under the model's run, that the evaluate stage logs FID into.

Images with NaN or inf (black once made uint8) are refused, and nothing is written.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from diffusion import tracking
from diffusion.config import Params
from diffusion.files import atomic_write
from diffusion.images import generate_images, image_grid, sampling_labels
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion
from diffusion.stages.paths import GRID, MODEL, MODEL_RUN, SAMPLE_RUN, SAMPLES
from diffusion.training.devices import resolve_device


def generate(packaged: PackagedDiffusion, params: Params, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample.num_samples`` uint8 images and their labels, drawn with the ``sample`` params
    in batches of ``sample.batch_size`` (:func:`diffusion.images.generate_images`: image k is
    image k of ``sample.seed``, whatever the batch size).

    Class-conditional models get ``sample.labels`` cycled over the images, or by default
    labels cycling through the classes (balanced, and each grid row shows every class).
    """
    cfg = params.sample
    labels = sampling_labels(cfg.labels, cfg.num_samples, packaged.model_spec.get("num_classes"))
    sampling = {key: getattr(cfg, key) for key in DEFAULT_SAMPLER}
    images = generate_images(
        packaged, sampling, labels=labels, batch_size=cfg.batch_size, seed=cfg.seed, device=device,
        name=lambda key: f"sample.{key}",
    )
    return images, labels


def run(params: Params) -> None:
    tracking.check_store()  # in seconds, before any work: a store that does not answer is one line
    device = resolve_device(params.sample.device)
    packaged = PackagedDiffusion.load(MODEL, map_location=device)
    model_run = tracking.read_run_id(MODEL_RUN)
    with tracking.stage_run(
        "sample", params.tracking.experiment, parent_run_id=model_run,
        run_name=f"sample-{params.sample.sampler}{params.sample.steps}",
    ) as active:
        tracking.log_params(params.model_dump(include={"sample", "evaluate"}))
        images, labels = generate(packaged, params, device)
        sampling = {key: getattr(params.sample, key) for key in DEFAULT_SAMPLER}
        with atomic_write(SAMPLES) as fh:
            np.savez(fh, images=images.numpy(), labels=labels.numpy(), sampling=np.array(json.dumps(sampling)))
        rows = params.sample.grid_rows
        with atomic_write(GRID) as fh:
            Image.fromarray(image_grid(images[: rows * rows], columns=rows)).save(fh, format="png")
        tracking.log_artifact(GRID)
        tracking.write_run_id(SAMPLE_RUN, active.info.run_id)
