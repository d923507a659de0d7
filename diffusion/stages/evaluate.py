"""evaluate: FID and KID of the samples, with their uncertainty, and precision, recall,
density and coverage, against the reference (``data/reference.npz``, or ``evaluate.reference``).

Outputs: ``metrics/evaluate.json`` for ``dvc metrics``: ``fid`` with ``fid_low``/``fid_high``
(its ``evaluate.confidence`` bootstrap interval, :func:`uncertainty`) and ``fid_se`` (the
replicates' standard deviation), ``kid`` with ``kid_low``/``kid_high``, ``precision``,
``recall``, ``density``, ``coverage`` (:mod:`diffusion.evaluation.fidelity`), ``fid_infinity``
when ``evaluate.fid_infinity``, and ``num_samples``; ``metrics/protocol.json``, the protocol
the FID was measured under (its fields and their digest, :mod:`diffusion.evaluation.protocol`)
and how its interval was computed; ``plots/fid_vs_samples.csv``, FID on growing prefixes of
the samples (FID is biased upwards at small N; the curve shows how far from converged the
number is). The metrics are logged into the sample stage's MLflow run with the protocol as
``fid.protocol.*`` tags and the interval's method as ``fid.interval.*``, and mirrored onto
its model run.

On digit data (``models/digit_classifier.pt`` holds a classifier: the train_digit_classifier
stage) the metrics also say whether the images show what they were drawn for
(:func:`~diffusion.evaluation.text_faithfulness.text_faithfulness`): ``text_clear``, and
``text_digit_accuracy`` for the digit each was asked for (a text model's prompt, a class
model's label), and for a text model each attribute's ``text_<attribute>_agreement``,
``_chance`` and ``_gap`` and the summary ``text_error`` (the sweep's objective of that
name). The protocol file records the classifier (its md5 and held-out accuracy) under
``digits``, outside the digest: it changes no FID.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffusion import tracking
from diffusion.evaluation import protocol
from diffusion.config import EvaluateParams, Params
from diffusion.data.dataset import DatasetError, quote_error
from diffusion.files import file_digest, write_csv, write_json
from diffusion.evaluation.fidelity import precision_recall_density_coverage
from diffusion.evaluation.metrics import (
    INCEPTION, Moments, bootstrap_interval, cache_dir, fid_bootstrap, fid_infinity, frechet_distance, inception_features,
    kid_bootstrap, kid_from_features, moments, statistics_moments,
)
from diffusion.data.captions import CAPTION_VOCABULARY, caption
from diffusion.evaluation.digit_classifier import load_digit_classifier
from diffusion.evaluation.reference_files import load_reference_statistics
from diffusion.evaluation.text_faithfulness import text_faithfulness
from diffusion.stages.paths import (
    DIGIT_CLASSIFIER, EVALUATE_METRICS, FID_CURVE, FID_PROTOCOL, NO_DIGIT_CLASSIFIER, REFERENCE, SAMPLE_RUN, SAMPLES,
)

CURVE_POINTS = 5
MIN_CURVE_SAMPLES = 16
FID_INFINITY_POINTS = 15  # sample counts FID_inf is fitted to, evenly spaced from N / 10 to N (Chong & Forsyth: 5k to 50k)
INTERVAL_METHOD = "bootstrap over both feature sets; percentile interval moved by the replicates' shift"


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


def asked_prompts(path: Path, conditioning: str) -> list[str]:
    """What each image of the samples file was drawn for, as a prompt: a text model's prompts, a
    class model's label as the digit's name ("a seven"), an unconditional model's nothing ("")."""
    with np.load(path, allow_pickle=False) as npz:
        if "prompts" in npz.files:
            return [str(prompt) for prompt in npz["prompts"]]
        labels = npz["labels"]
    if conditioning != "class":
        return [""] * len(labels)
    return [caption(CAPTION_VOCABULARY["digits"][label], []) for label in labels.tolist()]


def digit_scores(images: np.ndarray, prompts: list[str]) -> tuple[dict, dict | None]:
    """The text-faithfulness metrics of the images by ``models/digit_classifier.pt``, and the
    protocol's record of that classifier; nothing when the data are not digits."""
    if DIGIT_CLASSIFIER.read_bytes() == NO_DIGIT_CLASSIFIER:
        return {}, None
    classifier, meta = load_digit_classifier(DIGIT_CLASSIFIER)
    record = {"classifier_md5": tracking.file_md5(DIGIT_CLASSIFIER), "heldout_accuracy": meta.get("heldout_accuracy")}
    return text_faithfulness(torch.from_numpy(images), prompts, classifier), record


def fid_curve(features: np.ndarray, reference: Moments) -> list[tuple[int, float]]:
    """FID on ``CURVE_POINTS`` geometrically growing prefixes, ending at all samples."""
    n = len(features)
    sizes = sorted({int(s) for s in np.geomspace(min(MIN_CURVE_SAMPLES, n), n, CURVE_POINTS)})
    return [(size, frechet_distance(moments(features[:size]), reference)) for size in sizes]


def uncertainty(features: np.ndarray, reference: dict, cfg: EvaluateParams) -> tuple[dict, list[tuple[int, float]]]:
    """FID with its bootstrap interval and standard error, KID with its interval, precision,
    recall, density and coverage, FID_inf when asked; and the FID curve. A reference of
    statistics alone has no features: no KID, no PRDC, and its side of the bootstrap is fixed."""
    ref_features = reference["features"]
    ref_moments = moments(ref_features) if ref_features is not None else statistics_moments(reference["mu"], reference["sigma"])
    curve = fid_curve(features, ref_moments)
    fid = curve[-1][1]
    replicates = fid_bootstrap(features, ref_moments if ref_features is None else ref_features, replicates=cfg.bootstrap_replicates)
    low, high = bootstrap_interval(fid, replicates, cfg.confidence)
    results = {"fid": fid, "fid_low": low, "fid_high": high, "fid_se": float(np.std(replicates)), "num_samples": len(features)}
    if cfg.fid_infinity:
        n = len(features)
        results["fid_infinity"], _ = fid_infinity(features, ref_moments, sizes=np.linspace(max(2, n // 10), n, FID_INFINITY_POINTS).astype(int))
    if ref_features is not None:
        if cfg.kid:
            kid = kid_from_features(features, ref_features)
            kid_replicates = kid_bootstrap(features, ref_features, replicates=cfg.bootstrap_replicates)
            results["kid"] = kid
            results["kid_low"], results["kid_high"] = bootstrap_interval(kid, kid_replicates, cfg.confidence)
        results |= precision_recall_density_coverage(features, ref_features, cfg.prdc_k)
    return results, curve


def _write_outputs(results: dict, measured: dict, interval: dict, digits: dict | None, curve: list[tuple[int, float]]) -> None:
    write_json(EVALUATE_METRICS, results)
    write_json(FID_PROTOCOL, {**measured, "digest": protocol.digest(measured), "interval": interval, "digits": digits})
    write_csv(FID_CURVE, ["num_samples", "fid"], curve)


def run(params: Params) -> None:
    cache_dir()  # the Inception weights' cache, before any work: a HOME that is not writable is one line
    tracking.check_store(experiment=params.tracking.experiment)  # in seconds, before any work: one line
    cfg = params.evaluate
    images, sampling = load_samples(SAMPLES)
    reference_file = Path(cfg.reference) if cfg.reference else REFERENCE
    reference = load_reference_statistics(reference_file)
    measured = protocol.describe(
        num_samples=len(images), reference_images=None if reference["features"] is None else len(reference["features"]),
        reference_sha256=file_digest(reference_file), inception=INCEPTION, **sampling,
    )
    interval = {"method": INTERVAL_METHOD, "replicates": cfg.bootstrap_replicates, "confidence": cfg.confidence}
    features = inception_features(images, device=cfg.device, batch_size=cfg.batch_size)
    results, curve = uncertainty(features, reference, cfg)
    text, digits = digit_scores(images, asked_prompts(SAMPLES, params.model.conditioning))
    results |= text
    print(
        f"evaluate: fid {results['fid']:.4g} ({cfg.confidence:.0%} interval {results['fid_low']:.4g} to {results['fid_high']:.4g}), "
        + ", ".join(f"{k} {v:.4g}" for k, v in results.items() if k not in ("fid", "fid_low", "fid_high"))
    )

    _write_outputs(results, measured, interval, digits, curve)

    with tracking.stage_run("evaluate", params.tracking.experiment, resume_run_id=tracking.read_run_id(SAMPLE_RUN)):
        logged = {k: v for k, v in results.items() if k != "num_samples"}
        tags = protocol.to_tags(measured) | {f"{protocol.INTERVAL_TAG_PREFIX}{key}": str(value) for key, value in interval.items()}
        tracking.log_metrics(logged)
        tracking.set_tags(tags)
        for size, value in curve:
            tracking.log_metrics({"fid_vs_samples": value}, step=size)
        tracking.log_artifact(FID_CURVE)
        tracking.mirror_to_parent(logged, tags)
