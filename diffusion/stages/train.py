"""train: the model, the process and the loop as params.yaml says; resumes after a kill.

Outputs: ``models/model.pt`` (the EMA network and its configs, see
:mod:`diffusion.packaged`), ``models/run.json`` (the MLflow run that trained it),
``metrics/train.json``, ``plots/train_loss.csv`` and ``plots/val_loss.csv`` (the
reference loss that compares across configs, :mod:`diffusion.training.reference_loss`), and
``plots/train_kid.csv``: KID and FID of the EMA model's samples against ``data/reference.npz``
every ``train.eval_every`` steps (:func:`sample_quality`), also MLflow's ``train_kid`` and
``train_fid`` against the step, with ``train_eval_seconds``, the time they took; and
``models/ema_snapshots.pt``, the snapshots of the power function EMAs of ``train.ema_lengths``
(:mod:`diffusion.training.posthoc_ema`), from which the sample stage reconstructs the EMA of
length ``sample.ema_length`` (an empty list with ``train.ema_lengths: []``).

With ``model.space: latent`` the network trains on the scaled latents of ``data/latents.npz``
(the encode stage's), and ``models/model.pt`` carries the autoencoder of ``models/vae.pt``
and the scale factor, so sampling decodes (:class:`~diffusion.packaged.PackagedDiffusion`);
it samples unclipped. The held-out figure is then ``val_loss`` on held-out latents, not
bits/dim (which needs discrete pixels).
Checkpoints live in ``checkpoints/<key>/`` of the repository DVC runs in
(:func:`~diffusion.stages.paths.checkpoints_dir`, outside a ``dvc exp run --temp``
copy), where the key hashes the dataset and every param that changes the trajectory
(not ``steps``: raising it continues a finished run). So a killed run, or a retried
experiment, resumes where it stopped, a changed config starts afresh, and the resumed
run logs into the same MLflow run. One training of a key runs at a time (a lock in its
folder): a second one, say a concurrent sweep trial with the same training params,
waits and then resumes from the finished checkpoint. Holding the lock, a training first
deletes the temp files that writers killed mid-write left in the folder.

MLflow (:mod:`diffusion.tracking`): the store is checked before anything is loaded, and
a store that does not answer is a one-line error. Once training runs, an outage does
not stop it: the per-step metrics go through a :class:`~diffusion.tracking.MetricLog`
(``unsent-metrics-<run>.jsonl`` in the checkpoint folder), the outputs are written
regardless, and a store still down at the end is one warning line; the next training
of the config sends the metrics and logs the model. A run id in the folder's
``run.json`` that the store lacks (or a ``run.json`` that is not one) gives a new run,
tagged with the checkpoint it continues. Each step's metrics reach a run once, and the
model is logged into a run once for each version of its weights (tag ``model.md5``).

Distributed (``train.distributed`` > 1, which ``diffusion train`` launches as that many
processes, or any run under torchrun): every rank trains its slice of each batch
(:mod:`diffusion.training.loop`); rank 0 alone checks the store, holds the checkpoint
folder's lock, logs to MLflow and writes checkpoints and the DVC outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffusion import tracking
from diffusion.training.checkpoint import list_checkpoints, save_checkpoint
from diffusion.config import Params, TrainParams
from diffusion.data.dataset import load_dataset
from diffusion.data.latents import load_latents
from diffusion.errors import UserError
from diffusion.evaluation.metrics import cache_dir, fid_from_features, inception_features, kid_from_features, load_reference
from diffusion.files import exclusive_lock, remove_stale_temps, write_csv, write_json
from diffusion.images import generate_images, sampling_labels
from diffusion.process.continuous import ContinuousDiffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.models.text import load_text_embedding_cache
from diffusion.packaged import PackagedDiffusion, load_autoencoder
from diffusion.stages.encode_text import cached
from diffusion.stages.paths import (
    AUTOENCODER, AUTOENCODER_RUN, EMA_SNAPSHOTS, EVAL_CURVE, HELDOUT_SET, LATENTS, LOSS_CURVE, MODEL, MODEL_RUN, REFERENCE,
    TEXT_EMBEDDINGS, TRAIN_METRICS, TRAIN_SET, VAL_CURVE, checkpoint_key, checkpoints_dir,
)
from diffusion.training import distributed
from diffusion.training.devices import precision_name, resolve_precision
from diffusion.training.loop import EvalFn, seeded_init, train

MODEL_MD5_TAG = "model.md5"  # the md5 of models/model.pt (DVC's hash) the run's model was logged from

# Params that do not change the trajectory: a checkpoint stays valid when they change.
RESUMABLE_CHANGES = {
    "steps", "log_every", "checkpoint_every", "bpd_images", "val_every", "val_images", "device", "distributed", "micro_batch_size",
    "eval_every", "eval_images", "eval_sampler", "eval_steps",
}
EVAL_SCHEDULE = "log-snr"  # the step schedule of the in-training samples (sample_quality)


def model_spec(params: Params, channels: int, image_size: int, num_classes: int) -> dict:
    text = {"text_encoder": {"name": params.text.encoder, **params.text.overrides}} if params.model.conditioning == "text" else {}
    return {
        "name": params.model.name,
        "in_channels": channels,
        "image_size": image_size,
        "learn_sigma": params.diffusion.variance == "learned_range",
        "num_classes": num_classes if params.model.conditioning == "class" else None,
        "overrides": dict(params.model.overrides),
        **text,
    }


@dataclass(frozen=True)
class TrainingData:
    """What the network trains on: uint8 images, or scaled latents (and the autoencoder), and
    their labels (a text-conditional model's: its captions' token ids, ``conditions``)."""

    images: torch.Tensor
    labels: torch.Tensor
    heldout: torch.Tensor
    file: Path  # the file they come from: its md5 keys the checkpoints
    autoencoder: dict | None = None  # PackagedDiffusion's autoencoder spec, in latent space
    decoder: torch.nn.Module | None = None


def training_data(params: Params, dataset) -> TrainingData:
    """The images of ``dataset`` and the held-out set, or in latent space their scaled latents."""
    if params.model.space == "pixel":
        return TrainingData(dataset.images, dataset.labels, load_dataset(HELDOUT_SET).images, TRAIN_SET)
    latents = load_latents(LATENTS)
    autoencoder, _ = load_autoencoder(AUTOENCODER)
    if latents.meta.get("autoencoder_md5") != tracking.file_md5(AUTOENCODER):
        raise UserError(f"model.space: latent: {LATENTS} was not encoded by {AUTOENCODER}: run `dvc repro encode`")
    return TrainingData(
        latents.scaled("train"), latents.train_labels, latents.scaled("heldout"), LATENTS,
        autoencoder={"config": autoencoder.config, "scale_factor": latents.scale_factor}, decoder=autoencoder,
    )


def sample_quality(cfg: TrainParams, packaged: PackagedDiffusion, data: TrainingData, reference_features: np.ndarray) -> EvalFn:
    """``evaluate(step, ema_model)`` for the training loop: ``train_kid`` and ``train_fid``
    (:func:`~diffusion.evaluation.metrics.kid_from_features`, :func:`~diffusion.evaluation.metrics.fid_from_features`)
    of ``train.eval_images`` samples of the EMA network against ``reference_features``.

    The same images every time: image k is image k of ``train.seed``
    (:func:`diffusion.images.generate_images`) for label k of the balanced labels (a text model:
    for the caption of training image k), drawn with
    ``train.eval_sampler`` on ``train.eval_steps`` steps of the :data:`EVAL_SCHEDULE` schedule,
    unguided (scale 1: the curve follows the network, not the guidance), at the training's
    precision; a latent model's samples are decoded by ``data``'s autoencoder
    (:class:`~diffusion.packaged.PackagedDiffusion`). None of the ``sample`` params enter.
    """
    if packaged.conditioning == "text":
        labels = data.labels[: cfg.eval_images]
    else:
        labels = sampling_labels(None, cfg.eval_images, packaged.model_spec.get("num_classes"))
    options = {"batch_size": "train.batch_size", "sampler": "train.eval_sampler", "steps": "train.eval_steps"}

    def evaluate(step: int, ema_model: torch.nn.Module) -> dict[str, float]:
        device = next(ema_model.parameters()).device
        settings = {
            "sampler": cfg.eval_sampler, "steps": cfg.eval_steps, "schedule": EVAL_SCHEDULE, "guidance_scale": 1.0,
            "precision": precision_name(resolve_precision(cfg.precision, device)),
        }
        decoder = data.decoder.to(device) if data.decoder is not None else None
        model = PackagedDiffusion(
            packaged.model_spec, packaged.process, net=ema_model, sampling=settings, autoencoder=data.autoencoder,
            decoder=decoder,
        )
        images = generate_images(
            model, model.sampling, labels=labels, batch_size=cfg.batch_size, seed=cfg.seed, device=device,
            name=options.get,
        )
        features = inception_features(images, device=cfg.device)
        return {
            "train_kid": kid_from_features(features, reference_features),
            "train_fid": fid_from_features(features, reference_features),
        }

    return evaluate


def run(params: Params) -> None:
    current = distributed.world()
    if current.main:
        tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
        if params.train.eval_images:
            cache_dir()  # the Inception weights' cache, before any work: a HOME that is not writable is one line
    dataset = load_dataset(TRAIN_SET)
    data = training_data(params, dataset)
    _, channels, height, _ = data.images.shape
    spec = model_spec(params, channels, height, len(dataset.class_names))
    with seeded_init(params.train.seed):
        packaged = PackagedDiffusion(spec, params.diffusion.model_dump())
    text = {}
    if packaged.conditioning == "text":  # the captions' token ids condition it
        data = replace(data, labels=packaged.tokenize(dataset.captions))
        text = {"text": params.text.model_dump(exclude={"cache"})}  # the cache gives the encoder's own numbers
        if cached(params):
            packaged.net.text_encoder.use_cache(load_text_embedding_cache(TEXT_EMBEDDINGS))
    ckpt_dir = checkpoints_dir() / checkpoint_key(
        tracking.file_md5(data.file),  # the dataset's, or in latent space the latents'
        **text,
        model=params.model.model_dump(),
        diffusion=params.diffusion.model_dump(),
        train=params.train.model_dump(exclude=RESUMABLE_CHANGES),
    )
    with distributed.process_group(current):
        if not current.main:  # its slice of every batch; rank 0 writes and logs
            train(
                packaged.net, packaged.diffusion, data.images, data.labels, params.train, checkpoint_dir=ckpt_dir,
                heldout_images=data.heldout, conditional=params.model.conditioning != "none", world=current,
            )
            return

        def waiting(holder: str) -> None:
            print(f"train: {ckpt_dir} is in use by another training ({holder}); waiting for it", flush=True)

        with exclusive_lock(ckpt_dir / ".lock", on_wait=waiting):
            stale = remove_stale_temps(ckpt_dir)  # every writer of the folder holds this lock
            if stale:
                print(f"train: removed the temp files of killed writes: {', '.join(p.name for p in stale)}", flush=True)
            _train(params, packaged, dataset, data, ckpt_dir, current)


def _train(params: Params, packaged: PackagedDiffusion, dataset, data: TrainingData, ckpt_dir, current) -> None:
    spec = packaged.model_spec
    diffusion: GaussianDiffusion | ContinuousDiffusion = packaged.diffusion  # params.diffusion.process's
    resume_run = _checkpoint_run(ckpt_dir)
    newest = list_checkpoints(ckpt_dir)
    continues = {"resumed_from_checkpoint": str(newest[-1])} if newest else {}
    evaluate = None  # train.eval_images 0: no curve
    if params.train.eval_images:
        evaluate = sample_quality(params.train, packaged, data, load_reference(REFERENCE)["features"])

    with tracking.stage_run(
        "train", params.tracking.experiment, resume_run_id=resume_run, resume_tags=continues,
        run_name=f"train-{params.model.name}", system_metrics=True,
    ) as active:
        run_id = active.info.run_id
        tracking.write_run_id(ckpt_dir / "run.json", run_id)
        if run_id != resume_run:
            tracking.log_params(params.model_dump(include={"data", "model", "diffusion", "train"}))
            tracking.log_dataset(
                TRAIN_SET, name=params.data.source, source=dataset.source_uri,
                images=dataset.images, labels=dataset.labels, captions=dataset.captions,
            )
            if data.autoencoder is not None:
                tracking.log_params({"latent_scale_factor": data.autoencoder["scale_factor"]})
                tracking.set_tags({"vae_run_id": tracking.read_run_id(AUTOENCODER_RUN) or ""})
        with tracking.MetricLog(run_id, ckpt_dir) as log:
            result = train(
                packaged.net,
                diffusion,
                data.images,
                data.labels,
                params.train,
                checkpoint_dir=ckpt_dir,
                log=log,
                evaluate=evaluate,
                heldout_images=data.heldout,
                conditional=params.model.conditioning != "none",
                world=current,
            )
            # The outputs first: they do not depend on the store.
            final = PackagedDiffusion(
                spec, params.diffusion.model_dump(), net=result.ema_model,
                autoencoder=data.autoencoder, decoder=data.decoder,
            )
            final.save(MODEL)
            save_checkpoint(EMA_SNAPSHOTS, {"snapshots": result.ema_snapshots})
            val_loss = result.val_curve[-1][1] if result.val_curve else None
            quality = result.eval_curve[-1][1] if result.eval_curve else {}
            summary = {
                "step": result.step, "loss": result.loss, "val_loss": val_loss, **quality, "img_per_s": result.img_per_s,
                "bpd": result.bpd,
            }
            if result.eval_curve:
                summary["train_eval_seconds"] = sum(seconds for *_, seconds in result.eval_curve)
            summary = {k: v for k, v in summary.items() if v is not None}
            _write_outputs(summary, result.loss_curve, result.val_curve, result.eval_curve)
            tracking.write_run_id(MODEL_RUN, run_id)
            log(result.step, {f"final_{k}": v for k, v in summary.items() if k != "step"})
        model_missing = params.tracking.log_model and (log.unsent > 0 or not _log_model_once(final, active))
        if log.unsent or model_missing:
            tracking.end_run_offline()
            _say_offline(run_id, log, model_missing)


def _checkpoint_run(ckpt_dir) -> str | None:
    """The run that the checkpoint folder's ``run.json`` names; None (one warning line) when it is not a run file."""
    try:
        return tracking.read_run_id(ckpt_dir / "run.json")
    except tracking.RunFileError as err:
        print(f"train: warning: {err}; logging into a new run", file=sys.stderr, flush=True)
        return None


def _log_model_once(final: PackagedDiffusion, active) -> bool:
    """Log the model into the run unless it holds these weights already (``MODEL_MD5_TAG``);
    False when the store stopped answering (anything else fails the stage)."""
    digest = tracking.file_md5(MODEL)
    if active.data.tags.get(MODEL_MD5_TAG) == digest:
        return True
    try:
        tracking.log_packaged_model(final)
        tracking.set_tags({MODEL_MD5_TAG: digest})
    except Exception:
        if tracking.store_answers():
            raise
        return False
    return True


def _say_offline(run_id: str, log: tracking.MetricLog, model_missing: bool) -> None:
    """The one line a training that finished without the store prints."""
    missed = [f"{log.unsent} metric points (kept in {log.path})"] if log.unsent else []
    if model_missing:
        missed.append(f"the model ({MODEL})")
    reason = f" ({log.error})" if log.error else ""
    print(
        f"train: warning: the MLflow store {tracking.tracking_uri()} does not answer{reason}; training finished "
        f"offline, and run {run_id} lacks {' and '.join(missed)}: the next training of this config sends them "
        "(`diffusion train` again, or `dvc repro -f train`)",
        file=sys.stderr, flush=True,
    )


def _write_outputs(
    summary: dict, loss_curve: list[tuple[int, float]], val_curve: list[tuple[int, float]],
    eval_curve: list[tuple[int, dict[str, float], float]],
) -> None:
    write_json(TRAIN_METRICS, summary)
    write_csv(LOSS_CURVE, ["step", "loss"], loss_curve)
    write_csv(VAL_CURVE, ["step", "val_loss"], val_curve)
    write_csv(EVAL_CURVE, ["step", "kid", "fid"], [(step, m["train_kid"], m["train_fid"]) for step, m, _ in eval_curve])
