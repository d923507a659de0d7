"""sample: N images from the trained model with the chosen sampler.

Sampling is from EMA weights (:func:`load_model`): those of ``models/model.pt`` (the train stage
saves the EMA network of ``train.ema_decay``) or, with ``sample.ema_length``, the power function
EMA of that length, reconstructed from ``models/ema_snapshots.pt`` (EDM2's post-hoc EMA,
:mod:`diffusion.training.posthoc_ema`); that network is then logged as the sample run's model,
which promotion registers (:func:`diffusion.registry.find_model`).

Outputs: ``samples/samples.npz`` (uint8 images [N, C, H, W], their labels (a text-conditional
model's: the token ids of their ``prompts``, which it holds too) and, as JSON, the sampling
settings that drew them, which evaluate records in the FID protocol), ``samples/grid.png`` and
``samples/run.json``: the MLflow run, nested under the model's run, that the evaluate stage
logs FID into. A text-conditional model draws image k for ``sample.prompts`` k mod P, and
the run gets a grid of each prompt's images (``prompts/``).

Images with NaN or inf (black once made uint8) are refused, and nothing is written.

Distributed (``sample.distributed`` > 1, launched by ``diffusion sample``, or under torchrun):
each rank draws its contiguous shard of the images, image k always from its own seed, so the
samples are the same for any number of processes; rank 0 gathers them, logs and writes.
A latent model samples latents and decodes them (:class:`~diffusion.packaged.PackagedDiffusion`):
the images and everything after them are the same as in pixel space.

With ``guidance.classifier`` (and ``guidance.classifier_scale`` > 0) the classifier of
``models/classifier.pt`` guides (:mod:`diffusion.sampling.guidance`); an unconditional model
then gets balanced labels over the classifier's classes. The samples record the scale and
the file's md5 (DVC's hash) for the FID protocol: 0.0 and null when no classifier guided. They
also record the model's noise process (``process``), which the protocol holds too, and with
``sample.schedule: fitted`` the times of ``models/schedule.json`` (the fit_schedule stage's), whose
distances and cost go to the MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from PIL import Image

from diffusion import tracking
from diffusion.config import Params
from diffusion.files import atomic_write
from diffusion.images import cycled_prompts, generate_images, image_grid, sampling_labels
from diffusion.models.classifier import NoiseAwareClassifier, classifier_from_state
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion
from diffusion.process.options import process_identity
from diffusion.sampling.specs import FITTED
from diffusion.stages.paths import (
    CLASSIFIER, CLASSIFIER_DISABLED, EMA_SNAPSHOTS, FITTED_SCHEDULE, GRID, MODEL, MODEL_RUN, SAMPLE_RUN, SAMPLES,
)
from diffusion.training import distributed
from diffusion.training.checkpoint import load_checkpoint
from diffusion.training.posthoc_ema import reconstruct
from diffusion.training.devices import precision_name, resolve_device, resolve_precision
from diffusion.errors import UserError


def load_model(params: Params, device: torch.device) -> PackagedDiffusion:
    """The network the sample and fit_schedule stages draw from, on ``device``: ``models/model.pt``'s, with
    ``sample.ema_length`` its weights replaced by the power function EMA of that length at the
    last snapshot's step, reconstructed from ``models/ema_snapshots.pt``."""
    packaged = PackagedDiffusion.load(MODEL, map_location=device)
    if params.sample.ema_length is not None:
        snapshots = load_checkpoint(EMA_SNAPSHOTS)["snapshots"]
        if not snapshots:
            raise UserError(f"sample.ema_length: {EMA_SNAPSHOTS} holds no snapshots (train.ema_lengths was []): run `dvc repro train`")
        packaged.net.load_state_dict(reconstruct(snapshots, params.sample.ema_length))
    return packaged


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
    process = process_identity(packaged.process)  # a file without "process" holds the chain, ddpm
    theirs = {key: value for key, value in state["process"].items() if process.get(key) != value}
    if theirs:
        ours = {key: process.get(key) for key in theirs}
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} was trained on diffusion {theirs}, the model on {ours}: "
            "run `dvc repro train_classifier`"
        )
    classifier = classifier_from_state(state)
    theirs = (classifier.config["in_channels"], classifier.config["image_size"])
    if theirs != packaged.image_shape[:2]:
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} classifies {theirs[0]} x {theirs[1]}^2 inputs, the model denoises "
            f"{packaged.image_shape[0]} x {packaged.image_shape[1]}^2 ones (pixels or latents): run `dvc repro train_classifier`"
        )
    num_classes = packaged.model_spec.get("num_classes")
    if num_classes is not None and classifier.num_classes != num_classes:
        raise UserError(
            f"guidance.classifier: {CLASSIFIER} tells {classifier.num_classes} classes apart, the model "
            f"{num_classes}: run `dvc repro train_classifier`"
        )
    return classifier.requires_grad_(False).to(device)


def fitted_timesteps(params: Params) -> list[float] | None:
    """The times of ``models/schedule.json`` with ``sample.schedule: fitted`` (None otherwise);
    one line when it holds no fit for ``sample.sampler`` at ``sample.steps``."""
    if params.sample.schedule != FITTED:
        return None
    record = json.loads(FITTED_SCHEDULE.read_text()) if FITTED_SCHEDULE.is_file() else {}
    if (record.get("schedule"), record.get("sampler"), record.get("steps")) != (FITTED, params.sample.sampler, params.sample.steps):
        raise UserError(
            f"sample.schedule: {FITTED_SCHEDULE} holds no schedule fitted for sampler {params.sample.sampler} at "
            f"{params.sample.steps} steps: run `dvc repro fit_schedule`"
        )
    return record["timesteps"]


def sampling_settings(params: Params, device: torch.device, timesteps: list[float] | None) -> dict:
    """The ``sample`` params that draw the images (the keys of :data:`DEFAULT_SAMPLER`), with
    ``precision: auto`` resolved for ``device``, ``clip_denoised`` false in latent space
    (latents are not bounded) and a fitted schedule's ``timesteps``, so the FID protocol names
    what ran."""
    sampling = {key: getattr(params.sample, key) for key in DEFAULT_SAMPLER if key != "timesteps"}
    sampling["timesteps"] = timesteps
    sampling["precision"] = precision_name(resolve_precision(params.sample.precision, device))
    sampling["clip_denoised"] = params.sample.clip_denoised and params.model.space == "pixel"
    return sampling


def image_labels(
    packaged: PackagedDiffusion, params: Params, classifier: NoiseAwareClassifier | None, count: int
) -> torch.Tensor:
    """The labels of the first ``count`` images the stage draws: ``sample.labels`` cycled, or
    balanced over the model's classes (the guiding ``classifier``'s when the model has none);
    zeros when neither has classes; a text-conditional model's: the token ids of ``sample.prompts``
    cycled (:func:`~diffusion.images.cycled_prompts`)."""
    if packaged.conditioning == "text":
        return packaged.tokenize(cycled_prompts(params.sample.prompts, count))
    num_classes = packaged.model_spec.get("num_classes") or (classifier.num_classes if classifier is not None else None)
    return sampling_labels(params.sample.labels, count, num_classes)


def generate(
    packaged: PackagedDiffusion, params: Params, device: torch.device, classifier: NoiseAwareClassifier | None = None,
    part: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample.num_samples`` uint8 images and their labels (or those of ``part`` of them),
    drawn with the ``sample`` params in batches of ``sample.batch_size``
    (:func:`diffusion.images.generate_images`: image k is image k of ``sample.seed``, whatever
    the batch size or the part).

    Class-conditional models get ``sample.labels`` cycled over the images, or by default
    labels cycling through the classes (balanced, and each grid row shows every class). A
    ``classifier`` guides at ``guidance.classifier_scale``, towards labels over its classes
    when the model has none.
    """
    cfg = params.sample
    part = part if part is not None else range(cfg.num_samples)
    labels = image_labels(packaged, params, classifier, cfg.num_samples)[part.start : part.stop]
    images = generate_images(
        packaged, sampling_settings(params, device, fitted_timesteps(params)), labels=labels, batch_size=cfg.batch_size, seed=cfg.seed, device=device,
        name=lambda key: f"sample.{key}", classifier=classifier, classifier_scale=params.guidance.classifier_scale,
        first_index=part.start,
    )
    return images, labels


def run(params: Params) -> None:
    current = distributed.world()
    if current.main:
        tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
    device = resolve_device(params.sample.device)
    packaged = load_model(params, device)
    guided = params.guidance.classifier and params.guidance.classifier_scale > 0
    classifier = load_classifier(packaged, device) if guided else None
    with distributed.process_group(current):
        if not current.main:
            _generate_shards(packaged, params, device, classifier, current)
            return
        _sample_and_write(params, packaged, device, classifier, current)


def _generate_shards(packaged, params: Params, device, classifier, current) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank draws its shard (:func:`diffusion.training.distributed.shard`); rank 0 gets them all, in order."""
    shards = distributed.agreed(
        lambda: generate(packaged, params, device, classifier, part=distributed.shard(params.sample.num_samples, current))
    )
    return torch.cat([images for images, _ in shards]), torch.cat([labels for _, labels in shards])


def _sample_and_write(params: Params, packaged, device, classifier, current) -> None:
    model_run = tracking.read_run_id(MODEL_RUN)
    with tracking.stage_run(
        "sample", params.tracking.experiment, parent_run_id=model_run,
        run_name=f"sample-{params.sample.sampler}{params.sample.steps}",
    ) as active:
        tracking.log_params(params.model_dump(include={"sample", "guidance", "evaluate"}))
        images, labels = _generate_shards(packaged, params, device, classifier, current)
        sampling = sampling_settings(params, device, fitted_timesteps(params))
        if FITTED_SCHEDULE.is_file() and params.sample.schedule == FITTED:
            fit = json.loads(FITTED_SCHEDULE.read_text())
            tracking.log_metrics({f"fit_schedule.{key}": fit[key] for key in ("start_distance", "distance", "solves", "seconds")})
            tracking.log_artifact(FITTED_SCHEDULE)
        sampling["classifier_scale"] = params.guidance.classifier_scale if classifier is not None else 0.0
        sampling["classifier_md5"] = tracking.file_md5(CLASSIFIER) if classifier is not None else None
        sampling["process"] = process_identity(packaged.process)["process"]  # the protocol's: steps differ per process
        sampling["prompts_sha256"] = prompts_digest(params.sample.prompts) if packaged.conditioning == "text" else None
        prompts = cycled_prompts(params.sample.prompts, len(images)) if packaged.conditioning == "text" else None
        text = {"prompts": np.array(prompts, dtype=str)} if prompts is not None else {}
        with atomic_write(SAMPLES) as fh:
            np.savez(fh, images=images.numpy(), labels=labels.numpy(), sampling=np.array(json.dumps(sampling)), **text)
        rows = params.sample.grid_rows
        with atomic_write(GRID) as fh:
            Image.fromarray(image_grid(images[: rows * rows], columns=rows)).save(fh, format="png")
        tracking.log_artifact(GRID)
        if prompts is not None:
            _log_prompt_grids(images, params.sample.prompts)
        if params.sample.ema_length is not None and params.tracking.log_model:
            tracking.log_packaged_model(packaged)  # the weights the FID measures: promotion registers the run's own model
        tracking.write_run_id(SAMPLE_RUN, active.info.run_id)


def prompts_digest(prompts: list[str]) -> str:
    """The FID protocol's ``prompts_sha256``: the sha256 of the prompts' JSON."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _log_prompt_grids(images: torch.Tensor, prompts: list[str]) -> None:
    """One grid of each prompt's images (every P-th image, :func:`~diffusion.images.cycled_prompts`)
    as the run's ``prompts/<k>-<prompt>.png``, the prompt in the file name."""
    for k, prompt in enumerate(prompts):
        mine = images[k :: len(prompts)]
        if not len(mine):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")[:60]
        tracking.log_image(image_grid(mine, columns=math.ceil(math.sqrt(len(mine)))), f"prompts/{k:02d}-{slug}.png")
