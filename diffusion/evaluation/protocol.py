"""The evaluation protocol behind an FID: what must match for two FIDs to be compared.

An FID measures the images as much as the model. It depends on

- the measurement: the number of samples (FID is biased upwards at small N), the
  reference (the sha256 of its file, ``data/reference.npz`` or ``evaluate.reference``, and
  how many images it holds: null for a file of statistics alone) and the features (clean-fid's mode and the Inception weights,
  :data:`diffusion.evaluation.metrics.INCEPTION`);
- the sampler that drew the images: sampler, steps, schedule (and a fitted schedule's
  ``timesteps``: two fits are two schedules), eta, EDM's churn (s_churn, s_tmin,
  s_tmax, s_noise), clip_denoised, threshold, guidance and the network's precision (the keys of
  :data:`diffusion.packaged.DEFAULT_SAMPLER`), so two FIDs compare models at the same sampling
  cost. ``eta`` is 0 for a sampler that does not take it
  (:func:`diffusion.sampling.specs.eta_refused`): it draws the same images at any eta;
- the model's noise process (``process``: ddpm, vp, edm or flow): a step schedule places its
  steps in the process's own time, so the same sampler, steps and schedule are another
  discretisation on another process;
- the classifier that guided it (:data:`CLASSIFIER_FIELDS`): ``classifier_scale`` (0.0: none) and
  ``classifier_md5``, DVC's hash of ``models/classifier.pt`` (null: none). They are fields
  of their own, not sampler settings: the classifier is a second network, not part of the
  packaged model, so a promoted model's ``sampling`` (:data:`SAMPLING`) cannot hold it;
- what a text-conditional model was asked for (:data:`PROMPT_FIELDS`): ``prompts_sha256``, the
  sha256 of ``sample.prompts`` as JSON (null: a model not conditioned on text), so FIDs of
  other prompts are other distributions.

The evaluate stage writes the protocol to ``metrics/protocol.json`` and tags the run
it logs FID into with ``fid.protocol.<field>`` and ``fid.protocol.digest`` (a hash of
all fields). Promotion copies those tags onto the model version and moves
``champion`` only between versions with the same digest.

A protocol is a plain dict of :data:`FIELDS`. Tag values are the JSON of each value,
except strings, which stay as they are, so the UI shows ``ddim`` rather than
``"ddim"``. Neither torch nor MLflow is imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from diffusion.sampling.specs import CHURN_DEFAULTS, SAMPLER_SPECS

MEASUREMENT = ("num_samples", "reference_images", "reference_sha256", "inception")
SAMPLING = (
    "sampler", "steps", "schedule", "timesteps", "eta", "clip_denoised", "threshold", "guidance_scale", "guidance_interval", "precision",
    *CHURN_DEFAULTS,
)
CLASSIFIER_FIELDS = ("classifier_scale", "classifier_md5")
MODEL_FIELDS = ("process",)
PROMPT_FIELDS = ("prompts_sha256",)
FIELDS = MEASUREMENT + SAMPLING + CLASSIFIER_FIELDS + MODEL_FIELDS + PROMPT_FIELDS
TEXT_FIELDS = ("reference_sha256", "inception", "sampler", "schedule", "precision", "process")  # tagged as they are, not as JSON
# Fields added after FIDs were first recorded, and the value every earlier FID had: a run or
# model version tagged before ``precision`` existed sampled in fp32, before EDM's churn without
# it, before there were processes on the discrete chain, before fitted schedules on a formula, and
# before text conditioning without prompts.
ADDED_LATER = {"precision": "fp32", **CHURN_DEFAULTS, "process": "ddpm", "timesteps": None, "prompts_sha256": None}
TAG_PREFIX = "fid.protocol."
DIGEST_TAG = f"{TAG_PREFIX}digest"
INTERVAL_TAG_PREFIX = "fid.interval."  # how the FID's interval was computed (not part of the protocol)


class ProtocolError(ValueError):
    """Protocol fields that are missing or unknown; the message is one line."""


def describe(
    *,
    num_samples: int,
    reference_images: int | None,
    reference_sha256: str,
    inception: str,
    sampler: str,
    steps: int | None,
    schedule: str,
    eta: float,
    clip_denoised: bool,
    threshold: float | None,
    guidance_scale: float,
    guidance_interval: Any,
    precision: str,
    classifier_scale: float,
    classifier_md5: str | None,
    s_churn: float = ADDED_LATER["s_churn"],
    s_tmin: float = ADDED_LATER["s_tmin"],
    s_tmax: float | None = ADDED_LATER["s_tmax"],
    s_noise: float = ADDED_LATER["s_noise"],
    process: str = ADDED_LATER["process"],
    timesteps: Any = ADDED_LATER["timesteps"],
    prompts_sha256: str | None = ADDED_LATER["prompts_sha256"],
) -> dict[str, Any]:
    """The protocol as a dict of :data:`FIELDS`, each value in one canonical type
    (``eta`` 0 and 0.0 give the same digest); ``eta`` 0.0 for a sampler that does not take
    it, so a record from before validation refused another eta compares equal. A field of
    :data:`ADDED_LATER` left out (samples drawn before it existed) is its value then."""
    spec = SAMPLER_SPECS.get(str(sampler))  # None: a sampler since removed, its eta kept
    return {
        "num_samples": int(num_samples),
        "reference_images": None if reference_images is None else int(reference_images),
        "reference_sha256": str(reference_sha256),
        "inception": str(inception),
        "sampler": str(sampler),
        "steps": None if steps is None else int(steps),
        "eta": float(eta) if spec is None or spec.takes_eta else 0.0,
        "clip_denoised": bool(clip_denoised),
        "threshold": None if threshold is None else float(threshold),
        "schedule": str(schedule),
        "timesteps": None if timesteps is None else [float(t) for t in timesteps],
        "guidance_scale": float(guidance_scale),
        "guidance_interval": None if guidance_interval is None else [float(v) for v in guidance_interval],
        "precision": str(precision),
        "s_churn": float(s_churn),
        "s_tmin": float(s_tmin),
        "s_tmax": None if s_tmax is None else float(s_tmax),
        "s_noise": float(s_noise),
        "classifier_scale": float(classifier_scale),
        "classifier_md5": None if classifier_md5 is None else str(classifier_md5),
        "process": str(process),
        "prompts_sha256": None if prompts_sha256 is None else str(prompts_sha256),
    }


def digest(protocol: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the protocol's canonical JSON."""
    canonical = json.dumps({field: protocol[field] for field in FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _tag_value(field: str, value: Any) -> str:
    return str(value) if field in TEXT_FIELDS else json.dumps(value)


def to_tags(protocol: Mapping[str, Any]) -> dict[str, str]:
    """``fid.protocol.<field>`` for each field, plus ``fid.protocol.digest``."""
    tags = {f"{TAG_PREFIX}{field}": _tag_value(field, protocol[field]) for field in FIELDS}
    tags[DIGEST_TAG] = digest(protocol)
    return tags


def from_tags(tags: Mapping[str, str]) -> dict[str, Any] | None:
    """The protocol recorded in ``tags`` (a run's or a model version's); None when they
    record none (no digest tag). A field of :data:`ADDED_LATER` that older tags lack reads as
    its value then; :class:`ProtocolError` when another field is missing."""
    if DIGEST_TAG not in tags:
        return None
    tags = {**{f"{TAG_PREFIX}{field}": _tag_value(field, value) for field, value in ADDED_LATER.items()}, **tags}
    missing = [field for field in FIELDS if f"{TAG_PREFIX}{field}" not in tags]
    if missing:
        raise ProtocolError(f"tags record an FID protocol without {', '.join(missing)}: run evaluate again")
    values = {
        field: tags[f"{TAG_PREFIX}{field}"] if field in TEXT_FIELDS else json.loads(tags[f"{TAG_PREFIX}{field}"])
        for field in FIELDS
    }
    return describe(**values)


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any] | None) -> list[str]:
    """``"<field> <ours> (vs <theirs>)"`` for each field in which two protocols differ;
    ``["no protocol recorded"]`` when ``theirs`` is None."""
    if theirs is None:
        return ["no protocol recorded"]
    return [
        f"{field} {_tag_value(field, ours[field])} (vs {_tag_value(field, theirs[field])})"
        for field in FIELDS
        if ours[field] != theirs[field]
    ]
