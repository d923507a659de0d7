"""Dataset files: uint8 image tensors with labels, the ``.npz`` files and the manifest.

A :class:`Dataset` holds uint8 images ``[N, C, S, S]``, int64 labels ``[N]``, the class
names, optionally one caption per image (:mod:`diffusion.data.captions`) and where they
came from (the sources are in :mod:`diffusion.data.sources`).

:func:`split` draws the held-out images with a seeded permutation and takes the FID
reference subset from the rest. :func:`save_dataset` writes one ``.npz`` atomically
(deterministic bytes: a fixed zip timestamp); :func:`load_dataset` checks it and
fails with one line naming the file; a file without captions (the optional array
``captions``) loads with ``captions`` None. :func:`write_manifest` records source, sizes,
counts, class names, the captions' source and count, and the sha256 of each file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffusion.data.sizes import DatasetError, check_split
from diffusion.files import atomic_write, file_digest, write_json

if TYPE_CHECKING:
    from diffusion.config import DataParams

DATASET_ARRAYS = ("images", "labels", "class_names", "meta")
MANIFEST_KEYS = ("source", "root", "image_size", "channels", "seed", "class_names", "counts", "sha256")


def quote_error(err: BaseException) -> str:
    """``Type: first line of the message``: a library's error quoted inside a one-line error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@dataclass(frozen=True)
class Dataset:
    """uint8 images ``[N, C, S, S]``, int64 labels ``[N]``, captions (one per image, or None),
    and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str  # the data.source name
    source_uri: str  # the files it was read from (a file:// URI)
    captions: list[str] | None = None  # data.captions: measured or read from a metadata file

    def subset(self, index: torch.Tensor) -> Dataset:
        captions = None if self.captions is None else [self.captions[i] for i in index.tolist()]
        return Dataset(self.images[index], self.labels[index], self.class_names, self.source, self.source_uri, captions)


@dataclass(frozen=True)
class Splits:
    """The held-out images, the training images, and the FID reference (a subset of train)."""

    train: Dataset
    heldout: Dataset
    reference: Dataset


def split(dataset: Dataset, params: DataParams) -> Splits:
    """Held-out = the first ``holdout`` of a permutation seeded with ``seed``; train = the rest;
    reference = the first ``reference_images`` of train (in permuted order)."""
    n = len(dataset.images)
    check_split(n, params)  # the rule validate applies to the source's size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(params.seed))
    train = perm[params.holdout :]
    return Splits(
        train=dataset.subset(train),
        heldout=dataset.subset(perm[: params.holdout]),
        reference=dataset.subset(train[: params.reference_images]),
    )


def to_rgb_uint8_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> numpy uint8 ``[N, H, W, 3]``; one channel is
    repeated, as PIL's ``convert("RGB")`` does for a grayscale image file."""
    array = images.numpy(force=True) if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] not in (1, 3):
        raise DatasetError(f"images: expected uint8 [N, C, H, W] with C 1 or 3; got {array.dtype} {tuple(array.shape)}")
    return np.ascontiguousarray(np.broadcast_to(array, (len(array), 3, *array.shape[2:])).transpose(0, 2, 3, 1))


def _check(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], meta: dict, where: str, captions: np.ndarray | None = None,
) -> None:
    """The invariants of a dataset; each failure is one line starting with ``where``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise DatasetError(f"{where}: images must be uint8 [N, C, S, S] with C 1 or 3; got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DatasetError(f"{where}: labels must be int64 [{len(images)}]; got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DatasetError(
            f"{where}: labels must lie in 0..{len(class_names) - 1} (one per class name); got {labels.min()}..{labels.max()}"
        )
    if meta.get("image_size") != images.shape[2] or meta.get("channels") != images.shape[1]:
        raise DatasetError(
            f"{where}: images are {images.shape[1]}x{images.shape[2]}x{images.shape[3]} but the file says "
            f"image_size {meta.get('image_size')}, channels {meta.get('channels')}"
        )
    if captions is not None and (captions.dtype.kind != "U" or captions.shape != (len(images),)):
        raise DatasetError(f"{where}: captions must be {len(images)} strings, one per image; got {captions.dtype} {tuple(captions.shape)}")


def save_dataset(path: str | Path, dataset: Dataset) -> Path:
    """One compressed ``.npz`` (images, labels, class_names, meta as JSON, and captions when the
    dataset has them), written atomically."""
    path = Path(path)
    images, labels = dataset.images.numpy(force=True), dataset.labels.numpy(force=True)
    meta = {"source": dataset.source, "source_uri": dataset.source_uri, "image_size": images.shape[-1], "channels": images.shape[1]}
    captions = {} if dataset.captions is None else {"captions": np.array(dataset.captions, dtype=str).reshape(-1)}
    _check(images, labels, dataset.class_names, meta, str(path), captions.get("captions"))
    names = np.array(dataset.class_names, dtype=str)
    with atomic_write(path) as fh:
        np.savez_compressed(fh, images=images, labels=labels, class_names=names, meta=np.array(json.dumps(meta)), **captions)
    return path


def load_dataset(path: str | Path) -> Dataset:
    """Read a file of :func:`save_dataset`; :class:`DatasetError` naming it if missing, truncated,
    corrupt or inconsistent (dtypes, shapes, label range, recorded size)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file (the prepare stage writes it)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in DATASET_ARRAYS if name not in npz.files]
            arrays = {name: npz[name] for name in (*DATASET_ARRAYS, "captions") if name in npz.files}
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    except Exception as err:  # zipfile, zlib, numpy and json raise many types for damaged files
        raise DatasetError(f"{path}: truncated or corrupt dataset file ({quote_error(err)})") from None
    if missing:
        raise DatasetError(f"{path}: not a dataset file: missing {', '.join(missing)}; expected arrays {', '.join(DATASET_ARRAYS)}")
    class_names = [str(name) for name in arrays["class_names"].reshape(-1)]
    captions = arrays.get("captions")
    _check(arrays["images"], arrays["labels"], class_names, meta, str(path), captions)
    return Dataset(
        torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), class_names,
        str(meta.get("source", "")), str(meta.get("source_uri", "")),
        None if captions is None else [str(text) for text in captions],
    )


def write_manifest(path: str | Path, params: DataParams, splits: Splits, files: Mapping[str, str | Path]) -> Path:
    """JSON: source, root, image_size, channels, seed, class names, image counts per split, the
    captions (``data.captions`` and how many the training images have) and the sha256 of each
    file in ``files`` (name -> path), written atomically."""
    manifest = {
        "source": params.source,
        "root": params.root,
        "image_size": params.image_size,
        "channels": int(splits.train.images.shape[1]),
        "seed": params.seed,
        "class_names": splits.train.class_names,
        "counts": {name: len(getattr(splits, name).images) for name in ("train", "heldout", "reference")},
        "captions": {"source": params.captions, "count": len(splits.train.captions or [])},
        "sha256": {name: file_digest(file) for name, file in files.items()},
    }
    write_json(path, manifest)
    return Path(path)


def read_manifest(path: str | Path) -> dict:
    """The manifest of :func:`write_manifest`; :class:`DatasetError` naming the file if missing,
    not JSON, or lacking a key."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest (the prepare stage writes it)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a JSON manifest ({quote_error(err)})") from None
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise DatasetError(f"{path}: manifest lacks {', '.join(missing)}; expected keys {', '.join(MANIFEST_KEYS)}")
    return manifest
