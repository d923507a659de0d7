"""fit_schedule: where ``sample.steps`` steps of ``sample.sampler`` should go on this model.

With ``sample.schedule: fitted`` it fits the schedule (:func:`diffusion.sampling.fitted.fit_timesteps`)
on ``fit_schedule.calibration_images`` fixed x_T (seed ``fit_schedule.seed``), drawn and guided
exactly as the sample stage draws its images (labels, guidance, clipping, precision), against
the reference :data:`REFERENCE_SAMPLER` on ``fit_schedule.reference_steps`` log-snr steps, and
writes ``models/schedule.json``: the fitted times, the schedule it started from, both
distances, what it cost. The sample stage reads the times from there; the samples, the FID
protocol and a promoted model carry them. With any other schedule it writes
:data:`NOT_FITTED` at once, so a sweep over samplers pays nothing here. Its params are the
sample settings that shape the solution (not ``num_samples``, ``seed`` or ``batch_size``), so
DVC re-fits only when one of those changes, and its run cache brings back an earlier fit.
"""

from __future__ import annotations

import time

from diffusion.config import Params
from diffusion.files import write_json
from diffusion.sampling.specs import CHURN_DEFAULTS, FITTED
from diffusion.stages.paths import FITTED_SCHEDULE

REFERENCE_SAMPLER = "dpm++3m"
"""The reference's solver: third order (tests/test_solvers.py), one evaluation a step."""
NOT_FITTED = {"schedule": None, "why": "sample.schedule is not fitted"}
"""The whole of ``models/schedule.json`` when nothing is fitted."""


def run(params: Params) -> None:
    if params.sample.schedule != FITTED:
        write_json(FITTED_SCHEDULE, NOT_FITTED)
        return
    write_json(FITTED_SCHEDULE, fit(params))


def fit(params: Params) -> dict:
    """Fit the schedule (module doc): the record the sample stage reads back
    (:func:`diffusion.stages.sample.fitted_timesteps`)."""
    import torch

    from diffusion.process.options import process_identity
    from diffusion.sampling.fitted import fit_timesteps
    from diffusion.sampling.steps import make_steps
    from diffusion.stages.sample import image_labels, load_classifier, load_model, sampling_settings
    from diffusion.training.devices import resolve_device

    cfg, sample = params.fit_schedule, params.sample
    device = resolve_device(sample.device)
    packaged = load_model(params, device)
    guided = params.guidance.classifier and params.guidance.classifier_scale > 0
    classifier = load_classifier(packaged, device) if guided else None
    labels = image_labels(packaged, params, classifier, cfg.calibration_images)
    conditional = packaged.conditioning != "none" or classifier is not None  # as generate_images
    settings = sampling_settings(params, device, timesteps=None)

    def draw(**overrides) -> torch.Tensor:
        images = []
        for first in range(0, cfg.calibration_images, sample.batch_size):
            count = min(sample.batch_size, cfg.calibration_images - first)
            images.append(packaged.sample(
                count, **{**settings, **overrides}, labels=labels[first : first + count].to(device) if conditional else None,
                classifier=classifier, classifier_scale=params.guidance.classifier_scale, seed=cfg.seed,
                first_index=first, device=device,
            ))
        return torch.cat(images)

    started = time.perf_counter()
    reference = draw(sampler=REFERENCE_SAMPLER, steps=cfg.reference_steps, schedule="log-snr", eta=0.0, **CHURN_DEFAULTS)
    start = make_steps(cfg.start, packaged.diffusion.process, sample.steps)
    result = fit_timesteps(
        lambda steps: draw(schedule=FITTED, timesteps=steps.timesteps.tolist()), reference, start, max_solves=cfg.max_solves,
    )
    return {
        "schedule": FITTED,
        "sampler": sample.sampler,
        "steps": sample.steps,
        "process": process_identity(packaged.process)["process"],
        "timesteps": result.steps.timesteps.tolist(),
        "start": cfg.start,
        "start_timesteps": start.timesteps.tolist(),
        "start_distance": result.start_distance,
        "distance": result.distance,
        "solves": result.solves,
        "seconds": time.perf_counter() - started,
        "reference": f"{REFERENCE_SAMPLER}, {cfg.reference_steps} log-snr steps",
        "calibration_images": cfg.calibration_images,
    }
