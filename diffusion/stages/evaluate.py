"""evaluate: FID and KID of the samples against the cached reference statistics.

Outputs: ``metrics/evaluate.json`` (fid, kid, num_samples) for ``dvc metrics``,
``metrics/protocol.json``, the protocol the FID was measured under (its fields and
their digest, :mod:`diffusion.evaluation.protocol`), and ``plots/fid_vs_samples.csv``, FID on
growing prefixes of the samples (FID is biased upwards at small N; the curve shows
how far from converged the number is). FID and KID are logged into the sample
stage's MLflow run with the protocol as ``fid.protocol.*`` tags, and both are
mirrored onto its model run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusion import tracking
from diffusion.evaluation import protocol
from diffusion.config import Params
from diffusion.data.dataset import DatasetError, quote_error
from diffusion.files import file_digest, write_csv, write_json
from diffusion.evaluation.metrics import INCEPTION, cache_dir, fid_from_features, inception_features, kid_from_features, load_reference
from diffusion.stages.paths import EVALUATE_METRICS, FID_CURVE, FID_PROTOCOL, REFERENCE, SAMPLE_RUN, SAMPLES

CURVE_POINTS = 5
MIN_CURVE_SAMPLES = 16


def load_samples(path: Path) -> tuple[np.ndarray, dict]:
    """The uint8 images of the sample stage and the sampling settings that drew them."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such samples file (the sample stage writes it)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
            sampling = json.loads(str(npz["sampling"])) if "sampling" in npz.files else None
    except Exception as err:  # zipfile/numpy raise many types for damaged files
        raise DatasetError(f"{path}: truncated or corrupt samples file ({quote_error(err)})") from None
    if sampling is None:
        raise DatasetError(f"{path}: records no sampling settings (an older sample stage wrote it): run sample again")
    return images, sampling


def fid_curve(features: np.ndarray, reference_features: np.ndarray) -> list[tuple[int, float]]:
    """FID on ``CURVE_POINTS`` geometrically growing prefixes, ending at all samples."""
    n = len(features)
    sizes = sorted({int(s) for s in np.geomspace(min(MIN_CURVE_SAMPLES, n), n, CURVE_POINTS)})
    return [(size, fid_from_features(features[:size], reference_features)) for size in sizes]


def _write_outputs(results: dict, measured: dict, curve: list[tuple[int, float]]) -> None:
    write_json(EVALUATE_METRICS, results)
    write_json(FID_PROTOCOL, {**measured, "digest": protocol.digest(measured)})
    write_csv(FID_CURVE, ["num_samples", "fid"], curve)


def run(params: Params) -> None:
    cache_dir()  # the Inception weights' cache, before any work: a HOME that is not writable is one line
    tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
    cfg = params.evaluate
    images, sampling = load_samples(SAMPLES)
    reference = load_reference(REFERENCE)
    measured = protocol.describe(
        num_samples=len(images), reference_images=len(reference["features"]),
        reference_sha256=file_digest(REFERENCE), inception=INCEPTION, **sampling,
    )
    features = inception_features(images, device=cfg.device, batch_size=cfg.batch_size)
    curve = fid_curve(features, reference["features"])
    results = {"fid": curve[-1][1], "num_samples": len(images)}
    if cfg.kid:
        results["kid"] = kid_from_features(features, reference["features"])
    print("evaluate: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))

    _write_outputs(results, measured, curve)

    with tracking.stage_run("evaluate", params.tracking.experiment, resume_run_id=tracking.read_run_id(SAMPLE_RUN)):
        logged = {k: v for k, v in results.items() if k != "num_samples"}
        tags = protocol.to_tags(measured)
        tracking.log_metrics(logged)
        tracking.set_tags(tags)
        for size, value in curve:
            tracking.log_metrics({"fid_vs_samples": value}, step=size)
        tracking.log_artifact(FID_CURVE)
        tracking.mirror_to_parent(logged, tags)
