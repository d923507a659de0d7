"""The files the stages write and read, relative to the repository root.

dvc.yaml's deps, outs, metrics and plots name the same paths. They live here rather
than in the stage that writes them so that importing one stage does not import
another's libraries (prepare's torchvision datasets and clean-fid, for one).
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# validate
PARAMS_OK = Path("data/params.ok")  # constant content: every stage depends on it
# prepare
TRAIN_SET = Path("data/train.npz")
HELDOUT_SET = Path("data/heldout.npz")
REFERENCE = Path("data/reference.npz")  # Inception statistics of the FID reference images
MANIFEST = Path("data/manifest.json")
# train_vae and encode (with model.space pixel each writes its marker: the whole file)
AUTOENCODER = Path("models/vae.pt")  # the autoencoder (diffusion.packaged.save_autoencoder), or PIXEL_SPACE
AUTOENCODER_RUN = Path("models/vae_run.json")  # the MLflow run that trained (or imported) it
AUTOENCODER_METRICS = Path("metrics/vae.json")
AUTOENCODER_CURVE = Path("plots/vae_loss.csv")
RECONSTRUCTIONS = Path("plots/vae_reconstructions.png")  # held-out images above their reconstructions
LATENTS = Path("data/latents.npz")  # the encoded train and held-out sets (diffusion.data.latents), or PIXEL_SPACE
LATENTS_METRICS = Path("metrics/latents.json")
PIXEL_SPACE = b"model.space is pixel: no autoencoder, no latents\n"
TEXT_EMBEDDINGS = Path("data/text_embeddings.npz")  # a frozen text encoder's embeddings of the captions, or NO_TEXT_CACHE
NO_TEXT_CACHE = b"text.cache is off, or the text encoder learns: no text embeddings cached\n"
# train
MODEL = Path("models/model.pt")
MODEL_RUN = Path("models/run.json")  # the MLflow run that trained the model
EMA_SNAPSHOTS = Path("models/ema_snapshots.pt")  # the power function EMAs' snapshots (diffusion/training/posthoc_ema.py)
TRAIN_METRICS = Path("metrics/train.json")
LOSS_CURVE = Path("plots/train_loss.csv")
VAL_CURVE = Path("plots/val_loss.csv")
EVAL_CURVE = Path("plots/train_kid.csv")  # KID and FID of the EMA model's samples during training
# train_classifier
CLASSIFIER = Path("models/classifier.pt")  # the noise-aware classifier, or CLASSIFIER_DISABLED
CLASSIFIER_DISABLED = b"guidance.classifier is false: no classifier trained\n"  # the whole file when off
CLASSIFIER_ACCURACY = Path("plots/classifier_accuracy.csv")
# train_digit_classifier
DIGIT_CLASSIFIER = Path("models/digit_classifier.pt")  # the classifier of clear and named digits, or NO_DIGIT_CLASSIFIER
NO_DIGIT_CLASSIFIER = b"data.source is not a digit source: no digit classifier trained\n"  # the whole file then
# fit_schedule
FITTED_SCHEDULE = Path("models/schedule.json")  # sample.schedule fitted: the fitted times (diffusion/stages/fit_schedule.py)
# sample
SAMPLES = Path("samples/samples.npz")
GRID = Path("samples/grid.png")
SAMPLE_RUN = Path("samples/run.json")  # the nested sample run that evaluate logs into
# evaluate
EVALUATE_METRICS = Path("metrics/evaluate.json")
FID_PROTOCOL = Path("metrics/protocol.json")  # how the FID was measured (diffusion/evaluation/protocol.py)
FID_CURVE = Path("plots/fid_vs_samples.csv")


def checkpoints_dir() -> Path:
    """Resume state, not a DVC out: ``checkpoints/`` (one folder per config) of the
    repository DVC runs in. DVC sets ``DVC_ROOT`` to it, also for a ``dvc exp run
    --temp`` copy, so a killed and retried experiment finds its checkpoints after DVC
    removed the copy; outside DVC, the working directory's."""
    return Path(os.environ.get("DVC_ROOT") or ".") / "checkpoints"


def checkpoint_key(data_md5: str, **sections: Any) -> str:
    """A training's folder name in :func:`checkpoints_dir`: 16 hex digits of the sha256 of the
    md5 of the data it trains on and ``sections``, the params (plain data) that define its
    trajectory. A change to any of them starts afresh; any other change resumes."""
    key = {"data": data_md5, **sections}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
