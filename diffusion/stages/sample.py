"""sample: N images from the trained model with the chosen sampler.

Sampling is always from the EMA weights: ``models/model.pt`` stores only them (the
train stage saves the EMA network), so there is no choice to make.

Outputs: ``samples/samples.npz`` (uint8 images [N, C, H, W], their labels and, as
JSON, the sampling settings that drew them, which evaluate records in the FID
protocol), ``samples/grid.png`` and ``samples/run.json``: the MLflow run, nested
under the model's run, that the evaluate stage logs FID into.

Images with NaN or inf (black once made uint8) are refused, and nothing is written.

With ``guidance.classifier`` (and ``guidance.classifier_scale`` > 0) the classifier of
``models/classifier.pt`` guides (:mod:`diffusion.sampling.guidance`); an unconditional model
then gets balanced labels over the classifier's classes. The samples record the scale and
the file's md5 (DVC's hash) for the FID protocol: 0.0 and null when no classifier guided.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from diffusion import tracking
from diffusion.config import Params
from diffusion.files import atomic_write
from diffusion.models.classifier import NoiseAwareClassifier, classifier_from_state
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion, to_uint8
from diffusion.stages.paths import CLASSIFIER, CLASSIFIER_DISABLED, GRID, MODEL, MODEL_RUN, SAMPLE_RUN, SAMPLES
from diffusion.training.checkpoint import load_checkpoint
from diffusion.training.devices import batch_memory, resolve_device
from diffusion.errors import UserError


class NonFiniteSamplesError(UserError, RuntimeError):
    """Samples with NaN or inf; the message is one line saying how many, under which sample params."""


def sampling_labels(given: list[int] | None, count: int, num_classes: int | None) -> torch.Tensor:
    """``count`` labels: ``given`` cycled, else 0, 1, ..., num_classes - 1 cycled (balanced);
    zeros for an unconditional model. A label outside the model's classes is one line naming ``sample.labels``."""
    if not num_classes:
        return torch.zeros(count, dtype=torch.long)
    if given is not None and max(given) >= num_classes:
        raise UserError(f"sample.labels: {max(given)} is not a class of this model; allowed 0..{num_classes - 1}")
    cycle = torch.tensor(given, dtype=torch.long) if given is not None else torch.arange(num_classes)
    return cycle[torch.arange(count) % len(cycle)]


def load_classifier(packaged: PackagedDiffusion, device: torch.device) -> NoiseAwareClassifier:
    """The classifier of ``models/classifier.pt``, frozen, on ``device``; one line when the file
    holds none, or a classifier of another process or other classes than the model's."""
    if CLASSIFIER.is_file() and CLASSIFIER.read_bytes() == CLASSIFIER_DISABLED:
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} holds no classifier (train_classifier ran with guidance.classifier "
            "false): run `dvc repro train_classifier`"
        )
    state = load_checkpoint(CLASSIFIER)
    if not {"config", "state_dict", "process"} <= state.keys():
        raise UserError(f"guidance.classifier: {CLASSIFIER} is not a classifier file (train_classifier writes one)")
    process = {"zero_terminal_snr": False, **packaged.process}  # PackagedDiffusion's default for older files
    theirs = {key: value for key, value in state["process"].items() if process.get(key) != value}
    if theirs:
        ours = {key: process.get(key) for key in theirs}
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} was trained on diffusion {theirs}, the model on {ours}: "
            "run `dvc repro train_classifier`"
        )
    classifier = classifier_from_state(state)
    num_classes = packaged.model_spec.get("num_classes")
    if num_classes is not None and classifier.num_classes != num_classes:
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} tells {classifier.num_classes} classes apart, the model "
            f"{num_classes}: run `dvc repro train_classifier`"
        )
    return classifier.requires_grad_(False).to(device)


def generate(
    packaged: PackagedDiffusion, params: Params, device: torch.device, classifier: NoiseAwareClassifier | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` uint8 images in batches of ``sample.batch_size``. Image k is image k
    of ``sample.seed`` (its own generator, :mod:`diffusion.sampling.noise`), so the images do
    not depend on the batch size.

    Class-conditional models get ``sample.labels`` cycled over the images, or by default
    labels cycling through the classes (balanced, and each grid row shows every class). :class:`NonFiniteSamplesError` if any image holds NaN or inf;
    a batch too large for the device's memory is a one-line error naming ``sample.batch_size``.
    A ``classifier`` guides at ``guidance.classifier_scale``, towards labels over its classes
    when the model has none.
    """
    cfg = params.sample
    num_classes = packaged.model_spec.get("num_classes") or (classifier.num_classes if classifier is not None else None)
    labels = sampling_labels(cfg.labels, cfg.num_samples, num_classes)
    batches, non_finite = [], 0
    for start in range(0, cfg.num_samples, cfg.batch_size):
        count = min(cfg.batch_size, cfg.num_samples - start)
        batch_labels = labels[start : start + count].to(device) if num_classes else None
        with batch_memory("sample.batch_size", cfg.batch_size, device):
            x = packaged.sample(
                count,
                sampler=cfg.sampler,
                steps=cfg.steps,
                schedule=cfg.schedule,
                eta=cfg.eta,
                guidance_scale=cfg.guidance_scale,
                guidance_interval=cfg.guidance_interval,
                clip_denoised=cfg.clip_denoised,
                threshold=cfg.threshold,
                labels=batch_labels,
                classifier=classifier,
                classifier_scale=params.guidance.classifier_scale,
                seed=cfg.seed,
                first_index=start,
                device=device,
                progress=True,
            )
        non_finite += int((~torch.isfinite(x)).flatten(1).any(1).sum())
        batches.append(to_uint8(x).cpu())
    if non_finite:
        raise NonFiniteSamplesError(
            f"{non_finite} of {cfg.num_samples} images hold NaN or inf with sample.sampler {cfg.sampler!r} and "
            f"sample.steps {cfg.steps} (the model or these settings diverge); nothing written"
        )
    return torch.cat(batches), labels


def image_grid(images: torch.Tensor, columns: int, padding: int = 2) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> one uint8 image, ``[rows, cols]`` for C = 1, else ``[rows, cols, 3]``.

    ``columns`` images a row with ``padding`` white pixels around each: the layout of
    ``torchvision.utils.make_grid(images, nrow=columns, padding=padding, pad_value=1)``,
    without importing torchvision (1.5 s, paid by every trial's sample stage).
    """
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((padding + rows * (h + padding), padding + columns * (w + padding), c), 255, dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def run(params: Params) -> None:
    tracking.check_store()  # in seconds, before any work: a store that does not answer is one line
    device = resolve_device(params.sample.device)
    packaged = PackagedDiffusion.load(MODEL, map_location=device)
    guided = params.guidance.classifier and params.guidance.classifier_scale > 0
    classifier = load_classifier(packaged, device) if guided else None
    model_run = tracking.read_run_id(MODEL_RUN)
    with tracking.stage_run(
        "sample", params.tracking.experiment, parent_run_id=model_run,
        run_name=f"sample-{params.sample.sampler}{params.sample.steps}",
    ) as active:
        tracking.log_params(params.model_dump(include={"sample", "guidance", "evaluate"}))
        images, labels = generate(packaged, params, device, classifier)
        sampling = {key: getattr(params.sample, key) for key in DEFAULT_SAMPLER}
        sampling["classifier_scale"] = params.guidance.classifier_scale if classifier is not None else 0.0
        sampling["classifier_md5"] = tracking.file_md5(CLASSIFIER) if classifier is not None else None
        with atomic_write(SAMPLES) as fh:
            np.savez(fh, images=images.numpy(), labels=labels.numpy(), sampling=np.array(json.dumps(sampling)))
        rows = params.sample.grid_rows
        with atomic_write(GRID) as fh:
            Image.fromarray(image_grid(images[: rows * rows], columns=rows)).save(fh, format="png")
        tracking.log_artifact(GRID)
        tracking.write_run_id(SAMPLE_RUN, active.info.run_id)
