"""validate: the whole of params.yaml is checked before DVC touches any stage's outputs.

DVC removes a stage's outputs before it runs the stage's command, so a bad param
found by ``diffusion train`` itself would cost the previous ``models/model.pt``.
Every stage depends on this stage's one output, ``data/params.ok``, so ``dvc repro``
runs it first and stops on its error with every previous output in place. The
``diffusion`` command has already validated params.yaml (keys, types, ranges and
combinations) when this runs; here come the checks that depend on the machine: a
``cuda`` device asked for where there is none (each device a stage will use: the
autoencoder's with ``model.space: latent``, the classifier's with ``guidance.classifier``),
or more CUDA processes (``train.distributed``, ``sample.distributed``) than GPUs; and the
checks that depend on the data: ``data.holdout`` and ``data.reference_images`` against the
number of images the source holds (:mod:`diffusion.data.sizes`, the rule prepare applies to
the images it reads), ``data.root`` as the source takes it, with ``data.captions: metadata``
the folder's metadata file, a caption for every image (:mod:`diffusion.data.captions`), and ``sample.labels`` and
``guidance.classifier`` against the source's classes (the rules sample and train_classifier apply),
and a ``vae.pretrained`` autoencoder against the source's channels (train_vae's rule); and an
``evaluate.reference`` file, read as evaluate reads it, with ``evaluate.prdc_k`` against its
features; and a text-conditional model's ``text.encoder`` built with its ``text.overrides`` (a
pretrained folder loaded, as train loads it). The output's content never changes, so a valid change re-runs no stage that its params do not
concern.
"""

from __future__ import annotations

from diffusion.config import Params, autoencoder_config
from diffusion.data.sizes import (
    FIXED_CHANNELS, check_autoencoder_channels, check_classifier_classes, check_labels, check_split, source_classes, source_size,
)
from diffusion.files import atomic_write
from diffusion.stages.paths import PARAMS_OK

OK = b"params.yaml is valid on this machine\n"


def run(params: Params) -> None:
    _check_data(params)
    _check_reference(params)
    if params.model.conditioning == "text":
        from diffusion.models.text import build_text_encoder

        build_text_encoder(params.text.encoder, **params.text.overrides)  # its overrides, a pretrained folder's files
    devices = {"train.device": params.train.device, "sample.device": params.sample.device}
    if params.model.space == "latent":  # train_vae and encode
        devices["vae.device"] = params.vae.device
    if params.guidance.classifier:  # train_classifier
        devices["guidance.classifier_device"] = params.guidance.classifier_device
    devices["evaluate.device"] = params.evaluate.device
    if "cuda" in devices.values():
        from diffusion.training.devices import resolve_device

        for key, device in devices.items():
            if device == "cuda":
                resolve_device(device, key=key)
    for section, cfg in {"train": params.train, "sample": params.sample}.items():
        if cfg.distributed > 1 and cfg.device != "cpu":
            _check_gpus(cfg.distributed, section)
    with atomic_write(PARAMS_OK) as fh:
        fh.write(OK)


def _check_data(params: Params) -> None:
    """The rules that prepare, sample, train_classifier and train_vae apply to the data they read,
    applied to what the source holds (:mod:`diffusion.data.sizes`): its root, size, classes and
    channels. A count that cannot be told without reading the source (None) is left to prepare."""
    where = f"data.source {params.data.source}"
    count = source_size(params.data)
    if count is not None:
        check_split(count, params.data)
    classes = source_classes(params.data)  # the models' classes: train's, and the classifier's
    if params.data.captions == "metadata":
        from diffusion.data.captions import folder_captions

        folder_captions(params.data)
    if classes is not None:
        check_labels(params.sample.labels, classes)
        if params.guidance.classifier:
            check_classifier_classes(classes, where)
    if params.model.space == "latent" and params.vae.pretrained is not None:
        encodes = autoencoder_config(params.vae)["in_channels"]
        check_autoencoder_channels(params.vae.pretrained, encodes, FIXED_CHANNELS[params.data.source], where)


def _check_reference(params: Params) -> None:
    """``evaluate.reference`` (a file config.py found) loads as a reference (one line naming it,
    :mod:`diffusion.evaluation.reference_files`), and holds more features than ``evaluate.prdc_k``
    when it holds any (statistics alone give FID only)."""
    path, k = params.evaluate.reference, params.evaluate.prdc_k
    if path is None:
        return
    from diffusion.evaluation.reference_files import ReferenceFileError, load_reference_statistics

    try:
        features = load_reference_statistics(path)["features"]
    except ReferenceFileError as err:
        raise ReferenceFileError(f"evaluate.reference: {err}") from None
    if features is not None and k >= len(features):
        raise ReferenceFileError(
            f"evaluate.prdc_k: {k} needs more than {k} images, but evaluate.reference {path} holds {len(features)} "
            f"features; allowed 1..{len(features) - 1}"
        )


def _check_gpus(processes: int, section: str) -> None:
    """One process per GPU: CUDA processes need as many GPUs (CPU processes, on a machine
    without CUDA, need none)."""
    import torch

    from diffusion.errors import UserError

    count = torch.cuda.device_count()
    if 0 < count < processes:
        raise UserError(
            f"{section}.distributed: {processes} processes, one per GPU, but this machine has {count} GPUs; "
            f"allowed here: 1..{count} (or {section}.device: cpu for gloo processes on the CPU)"
        )
