"""Latents file: the autoencoder's encoding of the train and held-out sets, with the scale factor.

Latent diffusion trains on ``scale_factor * z`` where ``z`` are the encoder's latents and
``scale_factor = 1 / std(z)`` over the whole training set (Rombach et al. 2022, §4.3.2 and
App. G: "we rescale the latents ... by the component-wise standard deviation"), so the
diffusion model sees unit-variance inputs as its noise schedule assumes. The file keeps the
raw latents and the factor; :meth:`Latents.scaled` gives what the models see, and the
decoder gets ``x = D(z' / scale_factor)``.

One ``.npz`` written atomically (:func:`save_latents`); :func:`load_latents` checks it and fails
with one line naming the file.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.data.dataset import DatasetError
from diffusion.files import atomic_write

LATENT_ARRAYS = ("train", "heldout", "train_labels", "heldout_labels", "scale_factor", "meta")


@dataclass(frozen=True)
class Latents:
    train: torch.Tensor
    """float32 [N, C_z, h, w]: the raw latents of the training images."""
    heldout: torch.Tensor
    """float32 [M, C_z, h, w]: the raw latents of the held-out images."""
    train_labels: torch.Tensor
    heldout_labels: torch.Tensor
    scale_factor: float
    """1 / std of ``train``: :meth:`scaled` has unit standard deviation on the training set."""
    meta: dict[str, Any]
    """How they were made: ``posterior`` (mean | sample), the autoencoder file's md5, ..."""

    def scaled(self, split: str) -> torch.Tensor:
        """``scale_factor * z`` of ``split`` (train | heldout): the diffusion model's data."""
        return getattr(self, split) * self.scale_factor


def latent_scale_factor(latents: torch.Tensor) -> float:
    """``1 / std(z)`` over every element of the training latents (LDM's ``scale_factor``)."""
    return 1.0 / latents.double().std().item()


def save_latents(path: str | Path, latents: Latents) -> Path:
    """Write ``latents`` as one ``.npz``, atomically."""
    arrays = {
        "train": latents.train.float().numpy(),
        "heldout": latents.heldout.float().numpy(),
        "train_labels": latents.train_labels.numpy().astype(np.int64),
        "heldout_labels": latents.heldout_labels.numpy().astype(np.int64),
        "scale_factor": np.array(latents.scale_factor, dtype=np.float64),
        "meta": np.array(json.dumps(latents.meta, sort_keys=True)),
    }
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)
    return Path(path)


def load_latents(path: str | Path) -> Latents:
    """The latents of :func:`save_latents`; :class:`DatasetError` (one line) for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in LATENT_ARRAYS if key not in data.files]
            if missing:
                raise DatasetError(f"{path}: not a latents file (no {', '.join(missing)}): run `dvc repro encode`")
            arrays = {key: data[key] for key in LATENT_ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path}: not a latents file ({err.__class__.__name__}): run `dvc repro encode`") from None
    return Latents(
        train=torch.from_numpy(arrays["train"]),
        heldout=torch.from_numpy(arrays["heldout"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        heldout_labels=torch.from_numpy(arrays["heldout_labels"]),
        scale_factor=float(arrays["scale_factor"]),
        meta=json.loads(str(arrays["meta"])),
    )
