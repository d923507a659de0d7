"""The FID protocol: its fields, digest and tags, and how two protocols differ."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusion.evaluation import protocol
from diffusion.packaged import DEFAULT_SAMPLER

MEASURED = protocol.describe(
    num_samples=500, reference_images=500, reference_sha256="ab" * 32, inception="clean-fid clean, inception-2015-12-05",
    sampler="ddim", steps=25, schedule="linspace", eta=0, clip_denoised=True, threshold=None, guidance_scale=1.0,
    guidance_interval=None, precision="fp32", classifier_scale=0.0, classifier_md5=None,
)


def test_the_sampling_fields_are_what_the_packaged_model_samples_with():
    assert protocol.SAMPLING == tuple(DEFAULT_SAMPLER)


def test_tags_hold_each_field_and_read_back():
    tags = protocol.to_tags(MEASURED)
    assert tags["fid.protocol.sampler"] == "ddim"
    assert tags["fid.protocol.steps"] == "25"
    assert tags["fid.protocol.eta"] == "0.0"
    assert tags["fid.protocol.clip_denoised"] == "true"
    assert tags["fid.protocol.threshold"] == "null"
    assert tags["fid.protocol.reference_sha256"] == "ab" * 32
    assert len(tags) == len(protocol.FIELDS) + 1
    back = protocol.from_tags({**tags, "fid": "3.0"})
    assert back == MEASURED and type(back["eta"]) is float
    assert protocol.digest(back) == tags[protocol.DIGEST_TAG]


def test_the_digest_follows_every_field_and_only_the_fields():
    assert protocol.digest(MEASURED) == protocol.digest({**MEASURED, "eta": 0.0, "unrelated": 1})
    for field, other in [("num_samples", 50), ("reference_sha256", "cd" * 32), ("sampler", "ddpm"), ("steps", 50),
                         ("eta", 1.0), ("clip_denoised", False), ("threshold", 0.995), ("inception", "legacy"),
                         ("classifier_scale", 2.0), ("classifier_md5", "ef" * 16)]:
        assert protocol.digest({**MEASURED, field: other}) != protocol.digest(MEASURED), field


def test_eta_is_no_part_of_the_protocol_of_a_sampler_that_does_not_take_it():
    """ddpm draws the same images at any eta: its protocol records eta 0, so a run recorded
    with another eta (before validation refused one) compares equal to one at 0."""
    ddpm = {**MEASURED, "sampler": "ddpm"}
    assert protocol.describe(**{**ddpm, "eta": 0.7}) == protocol.describe(**ddpm) and protocol.describe(**ddpm)["eta"] == 0.0
    recorded = {**protocol.to_tags(ddpm), "fid.protocol.eta": "0.7"}
    assert protocol.differences(protocol.describe(**ddpm), protocol.from_tags(recorded)) == []
    assert protocol.describe(**{**MEASURED, "eta": 0.7})["eta"] == 0.7  # ddim takes it


def test_classifier_guidance_is_recorded_beside_the_sampler_settings():
    """The classifier is a network of its own, not a setting of the packaged model's sampler:
    its scale and file hash are fields of the protocol, not of DEFAULT_SAMPLER."""
    assert protocol.FIELDS == (
        protocol.MEASUREMENT + protocol.SAMPLING + protocol.CLASSIFIER_FIELDS + protocol.MODEL_FIELDS + protocol.PROMPT_FIELDS
    )
    assert not set(protocol.CLASSIFIER_FIELDS) & set(DEFAULT_SAMPLER)
    guided = {**MEASURED, "classifier_scale": 2.0, "classifier_md5": "ef" * 16}
    tags = protocol.to_tags(guided)
    assert tags["fid.protocol.classifier_scale"] == "2.0" and tags["fid.protocol.classifier_md5"] == f'"{"ef" * 16}"'
    assert protocol.to_tags(MEASURED)["fid.protocol.classifier_md5"] == "null"
    assert protocol.from_tags(tags) == guided
    assert protocol.differences(guided, MEASURED) == ["classifier_scale 2.0 (vs 0.0)", f'classifier_md5 "{"ef" * 16}" (vs null)']


def test_differences_name_the_fields():
    other = {**MEASURED, "steps": 50, "num_samples": 5000}
    assert protocol.differences(other, MEASURED) == ["num_samples 5000 (vs 500)", "steps 50 (vs 25)"]
    assert protocol.differences(MEASURED, dict(MEASURED)) == []
    assert protocol.differences(MEASURED, None) == ["no protocol recorded"]


def test_no_digest_is_no_protocol_and_a_partial_one_is_an_error():
    assert protocol.from_tags({"fid": "3.0"}) is None
    partial = {k: v for k, v in protocol.to_tags(MEASURED).items() if k != "fid.protocol.steps"}
    with pytest.raises(protocol.ProtocolError, match=r"^tags record an FID protocol without steps: run evaluate again$"):
        protocol.from_tags(partial)


def test_tags_from_before_precision_existed_read_as_fp32():
    """Every FID recorded before ``precision`` was a field sampled in fp32: such tags read back
    as that protocol, and differ from a bf16 one in that field alone."""
    old = {k: v for k, v in protocol.to_tags(MEASURED).items() if k != "fid.protocol.precision"}
    assert protocol.from_tags(old) == MEASURED
    bf16 = {**MEASURED, "precision": "bf16"}
    assert protocol.differences(bf16, protocol.from_tags(old)) == ["precision bf16 (vs fp32)"]


def test_the_process_is_a_field_and_tags_from_before_processes_read_as_ddpm():
    """The same sampler, steps and schedule are another discretisation on another noise process,
    so FIDs of two processes are two protocols; every FID recorded before there were processes
    (or EDM's churn) was drawn on the discrete chain without churn."""
    assert MEASURED["process"] == "ddpm" and MEASURED["s_churn"] == 0.0 and MEASURED["s_tmax"] is None
    flow = protocol.describe(**{**MEASURED, "process": "flow"})
    assert protocol.to_tags(flow)["fid.protocol.process"] == "flow"
    assert protocol.differences(flow, MEASURED) == ["process flow (vs ddpm)"]
    assert protocol.digest(flow) != protocol.digest(MEASURED)
    old = {k: v for k, v in protocol.to_tags(MEASURED).items()
           if k.removeprefix("fid.protocol.") not in ("process", "s_churn", "s_tmin", "s_tmax", "s_noise")}
    assert protocol.from_tags(old) == MEASURED
    assert protocol.differences(flow, protocol.from_tags(old)) == ["process flow (vs ddpm)"]


def test_importing_it_loads_neither_torch_nor_mlflow():
    code = "import sys, diffusion.evaluation.protocol; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
