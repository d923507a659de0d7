"""The real DVC pipeline in a temporary git repo, tracked into a real SQLite MLflow store."""

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_PARAMS, copy_repo, full_params, pipeline_env, run_in
from faults import kill_mid_write, overwrite_tensor_bytes
from kill_loop import equal, kill_and_recover, model_tensors

from diffusion import registry
from diffusion.packaged import PackagedDiffusion

pytestmark = pytest.mark.integration

STAGES = (
    "validate", "prepare", "train_vae", "encode", "encode_text", "train", "train_classifier", "train_digit_classifier",
    "fit_schedule", "sample", "evaluate",
)


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def assert_tracked_everything(repo: Path, out: str) -> None:
    """What a whole `dvc repro` of TINY_PARAMS (printed ``out``) left in ``repo``: every stage ran
    and wrote its files, and the repository's own MLflow store holds the model run with its
    curves, system metrics, git and DVC provenance and data-only model, and its nested sample
    run with the FID and grid. The README's pipeline test (tests/test_readme.py) runs it after
    `make pipeline` in a fresh clone, then re-runs what a changed param affects."""
    assert ran_stages(out) == list(STAGES)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert math.isfinite(evaluation["fid"]) and evaluation["fid"] > 0
    assert evaluation["num_samples"] == TINY_PARAMS["sample"]["num_samples"]
    assert 0 < evaluation["kid"] < 10
    # the intervals hold their estimates
    assert evaluation["fid_low"] < evaluation["fid"] < evaluation["fid_high"] and evaluation["fid_se"] > 0
    assert evaluation["kid_low"] < evaluation["kid"] < evaluation["kid_high"]
    assert all(0 <= evaluation[key] <= 1 for key in ("precision", "recall", "coverage")) and evaluation["density"] >= 0
    # digits: the share of clear digits and of the asked class (the digit classifier of train_digit_classifier)
    assert all(0 <= evaluation[key] <= 1 for key in ("text_clear", "text_digit_accuracy"))
    assert evaluation["text_error"] == 1 - evaluation["text_digit_accuracy"]  # a class model asks for no attribute
    train_metrics = json.loads((repo / "metrics/train.json").read_text())
    assert train_metrics["step"] == TINY_PARAMS["train"]["steps"]
    assert math.isfinite(train_metrics["bpd"])
    manifest = json.loads((repo / "data/manifest.json").read_text())
    assert manifest["counts"] == {"train": 5000 - 16, "heldout": 16, "reference": TINY_PARAMS["data"]["reference_images"]}
    curve = (repo / "plots/fid_vs_samples.csv").read_text().splitlines()
    assert curve[0] == "num_samples,fid" and curve[-1].startswith(f"{TINY_PARAMS['sample']['num_samples']},")

    # MLflow: the model run and its nested sample run, in the repo's own store.
    mlflow.set_tracking_uri(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    model_run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    sample_run_id = json.loads((repo / "samples/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient()
    model_run, sample_run = client.get_run(model_run_id), client.get_run(sample_run_id)
    assert model_run.info.status == sample_run.info.status == "FINISHED"
    assert sample_run.data.tags["mlflow.parentRunId"] == model_run_id
    assert model_run.data.params["train.steps"] == str(TINY_PARAMS["train"]["steps"])
    assert model_run.data.params["model.name"] == "unet-tiny"
    assert sample_run.data.params["sample.steps"] == str(TINY_PARAMS["sample"]["steps"])
    losses = client.get_metric_history(model_run_id, "loss")
    assert [m.step for m in losses] == list(range(5, 31, 5))
    for key in ("grad_norm", "lr", "img_per_s"):
        assert client.get_metric_history(model_run_id, key)
    # The in-training KID curve (train.eval_images on; eval_every 150 > 30 steps: the last step alone).
    kid_curve = (repo / "plots/train_kid.csv").read_text().splitlines()
    assert kid_curve[0] == "step,kid,fid" and [row.split(",")[0] for row in kid_curve[1:]] == ["30"]
    assert [(m.step, m.value) for m in client.get_metric_history(model_run_id, "train_kid")] == [
        (30, pytest.approx(train_metrics["train_kid"]))
    ]
    assert 0 < train_metrics["train_eval_seconds"] and math.isfinite(train_metrics["train_fid"])
    assert any(k.startswith("system/") for k in model_run.data.metrics)
    assert model_run.data.tags["git_commit"] == run_in(repo, "git", "rev-parse", "HEAD").stdout.strip()
    train_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/train.npz")
    assert model_run.data.tags["dvc.prepare.data/train.npz"] == train_md5
    dataset_input = model_run.inputs.dataset_inputs[0]
    assert dataset_input.dataset.name == "mnist5k"
    assert {t.key: t.value for t in dataset_input.tags}["dvc_md5"] == train_md5
    assert sample_run.data.metrics["fid"] == pytest.approx(evaluation["fid"])
    assert model_run.data.metrics["fid"] == pytest.approx(evaluation["fid"])  # mirrored
    assert "grid.png" in {a.path for a in client.list_artifacts(sample_run_id)}

    # The logged model is data only (weights-only model.pt, MLmodel), and loads and samples back.
    model_id = registry._logged_model_id(client, model_run_id)
    assert {a.path for a in client.list_logged_model_artifacts(model_id)} == {"MLmodel", "model.pt"}
    model = registry.load_model(f"runs:/{model_run_id}/model", tracking_uri=pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    images = model.sample(3, steps=4, seed=1)
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, model.sample(3, steps=4, seed=1))


def assert_only_sampling_reran(repo: Path, out: str, model_run_id: str, sample_run_id: str) -> None:
    """After a change of sampling params alone (printed ``out``): fit_schedule (a marker: the
    schedule is not fitted), sample and evaluate re-ran, train did not, and the new sample run
    is nested under the same model run."""
    assert ran_stages(out) == ["validate", "fit_schedule", "sample", "evaluate"]  # validate checks every param change
    assert json.loads((repo / "models/run.json").read_text())["run_id"] == model_run_id
    new_sample_run = json.loads((repo / "samples/run.json").read_text())["run_id"]
    assert new_sample_run != sample_run_id
    client = mlflow.MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    assert client.get_run(new_sample_run).data.tags["mlflow.parentRunId"] == model_run_id
    assert run_in(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


def assert_bad_param_stops_before_outputs_go(repo: Path) -> None:
    """A bad param stops `dvc repro` before DVC removes any output; fixing it costs nothing."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    outputs = ("models/model.pt", "metrics/train.json", "plots/train_loss.csv", "samples/samples.npz")
    before = {path: (repo / path).read_bytes() for path in outputs}
    lr, params["train"]["lr"] = params["train"]["lr"], -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_in(repo, "dvc", "repro", check=False)
    assert out.returncode != 0 and ran_stages(out.stdout) == ["validate"]
    assert "diffusion validate: error: params.yaml: train.lr: Input should be greater than 0 (got -1)" in out.stderr
    assert {path: (repo / path).read_bytes() for path in outputs} == before
    params["train"]["lr"] = lr
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_in(repo, "dvc", "repro")  # DVC removed data/params.ok; its run cache has it
    assert ran_stages(out.stdout) in ([], ["validate"])
    assert run_in(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


def test_killed_training_resumes_from_its_checkpoint(tmp_path: Path, prepared_repo: Path):
    """kill -9 of the whole `dvc repro` at a seeded step of train (tests/kill_loop.py kills at
    random moments of every stage): `diffusion unlock` and `dvc repro` finish from the last
    checkpoint, and the model equals an uninterrupted training's bit for bit."""
    params = json.loads(json.dumps(TINY_PARAMS))
    params["train"].update(steps=40, checkpoint_every=10, bpd_images=0)
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)

    outcome = kill_and_recover(repo, "train", at_step=random.Random(18).randint(11, 39))
    assert outcome.stage == "train" and outcome.error is None and outcome.outputs
    assert outcome.resumed_from in (10, 20, 30) and 0 <= outcome.steps_lost <= 10
    assert json.loads((repo / "metrics/train.json").read_text())["step"] == 40

    mlflow.set_tracking_uri(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id], "tags.`stage.train` = 'ran'")
    assert len(runs) == 1  # the resumed training logged into the killed run, not a new one
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(5, 41, 5))  # each step once, the repeated ones too

    shutil.rmtree(repo / "checkpoints")
    run_in(repo, "diffusion", "train")  # the same training, uninterrupted
    assert equal(outcome.model, model_tensors(repo))


def test_missing_or_corrupt_dataset_gets_a_clear_error_and_keeps_outputs(tmp_path: Path, prepared_repo: Path):
    repo = copy_repo(prepared_repo, tmp_path / "repo")
    train_file = repo / "data/train.npz"
    data = train_file.read_bytes()
    train_file.write_bytes(data[: len(data) // 2])
    out = run_in(repo, "diffusion", "train", check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        "diffusion train: error: data/train.npz: truncated or corrupt dataset file"
    )
    assert (repo / "data/heldout.npz").exists()
    assert np.load(repo / "data/reference.npz")["features"].shape == (TINY_PARAMS["data"]["reference_images"], 2048)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"data": {"reference_images": 100000}},
         "data.reference_images: 100000 is more than the 4984 training images; allowed 2..4984"),
        ({"sample": {"num_samples": 1}}, "params.yaml: sample.num_samples: Input should be greater than or equal to 2 (got 1)"),
        ({"train": {"lr": float("inf")}}, "params.yaml: train.lr: Input should be a finite number (got inf)"),
    ],
)
def test_params_that_a_later_stage_refuses_stop_at_validate(tmp_path: Path, prepared_repo: Path, change, error):
    """Issue 28: these passed validate, and prepare (or evaluate, or train) refused them after DVC
    had removed its outputs; now validate refuses them and data/* stays as it was."""
    repo = copy_repo(prepared_repo, tmp_path / "repo")
    outputs = ("data/train.npz", "data/heldout.npz", "data/reference.npz", "data/manifest.json")
    before = {path: (repo / path).read_bytes() for path in outputs}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(full_params({**params, **{k: {**params[k], **v} for k, v in change.items()}})))
    out = run_in(repo, "dvc", "repro", check=False)
    assert out.returncode != 0 and ran_stages(out.stdout) == ["validate"]
    assert f"diffusion validate: error: {error}" in out.stderr
    assert {path: (repo / path).read_bytes() for path in outputs} == before


def test_killed_temp_experiment_resumes_when_retried(tmp_path: Path, prepared_repo: Path):
    """`dvc exp run --temp` (a sweep trial, train-pipeline with params) trains in a copy that DVC
    removes; its checkpoints live in the repository's checkpoints/, so a retry resumes (both
    runs to the train stage: what follows it is as in any experiment)."""
    params = json.loads(json.dumps(TINY_PARAMS))
    params["train"].update(steps=80, checkpoint_every=10, bpd_images=0)
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)
    cmd = ["dvc", "exp", "run", "--temp", "--name", "retried", "-S", "train.warmup_steps=6", "train"]
    proc = subprocess.Popen(cmd, cwd=repo, env=pipeline_env(repo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(int(p.stem.split("-")[1]) >= 20 for p in (repo / "checkpoints").glob("*/ckpt-*.pt")):
                break
            assert proc.poll() is None, f"{' '.join(cmd)} exited ({proc.returncode}) before its checkpoint at step 20"
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint at step 20 in the repository's checkpoints/ within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stopped_at = max(int(p.stem.split("-")[1]) for p in (repo / "checkpoints").glob("*/ckpt-*.pt"))
    out = run_in(repo, *cmd[:4], "--name", "retried-again", *cmd[-3:])
    assert f"at step {stopped_at}" in out.stdout
    assert json.loads(run_in(repo, "dvc", "exp", "show", "--json").stdout)  # the experiment is listed


def test_damaged_checkpoint_and_killed_write_are_recovered_by_the_next_run(tmp_path: Path, prepared_repo: Path):
    """As seen on main: 64 bytes overwritten inside the newest checkpoint trained on silently
    into NaN weights, black samples and FID 482.5, and a writer killed mid-write left its
    temp file for good. Now the next `dvc repro` (to the samples) warns in one line, resumes
    from the previous good checkpoint, deletes the temp file, and samples real images."""
    params = json.loads(json.dumps(TINY_PARAMS))
    params["train"].update(steps=20, checkpoint_every=10, bpd_images=0)
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)
    run_in(repo, "dvc", "repro", "train")
    (ckpt_dir,) = (repo / "checkpoints").iterdir()
    overwrite_tensor_bytes(ckpt_dir / "ckpt-00000020.pt", b"\xff" * 64)
    stale = kill_mid_write(ckpt_dir / "ckpt-00000030.pt")

    params["train"]["steps"] = 30
    (repo / "params.yaml").write_text(yaml.safe_dump(full_params(params)))
    out = run_in(repo, "dvc", "repro", "sample")
    (warning,) = [line for line in out.stderr.splitlines() if line.startswith("train: warning:")]
    assert "ckpt-00000020.pt: truncated or corrupt checkpoint (ValueError: entry " in warning
    assert warning.endswith("fails its CRC-32 check); resuming from the older " + str(ckpt_dir / "ckpt-00000010.pt"))
    assert f"train: removed the temp files of killed writes: {stale.name}" in out.stdout
    assert "at step 10" in out.stdout and not stale.exists()
    assert ran_stages(out.stdout) == ["validate", "train", "train_classifier", "fit_schedule", "sample"]

    assert json.loads((repo / "metrics/train.json").read_text())["step"] == 30
    model = PackagedDiffusion.load(repo / "models/model.pt")  # checks every weight is finite
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    images = np.load(repo / "samples/samples.npz")["images"]
    assert (images.reshape(len(images), -1).max(axis=1) > 0).all()  # no black image


def test_locks_of_a_killed_unreaped_dvc_repro_are_released(tmp_path: Path, prepared_repo: Path):
    """kill -9 of the whole `dvc repro` while its parent has not reaped it (a zombie keeps its
    PID): DVC refuses the next run; `diffusion unlock` (run by `make pipeline`) frees exactly
    the dead holder's locks, and the next `dvc repro` resumes."""
    params = json.loads(json.dumps(TINY_PARAMS))
    params["train"].update(steps=60, checkpoint_every=10, bpd_images=0)
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=pipeline_env(repo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((repo / "checkpoints").glob("*/ckpt-*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "train wrote no checkpoint"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)  # not reaped: the zombie keeps its PID
        refused = run_in(repo, "dvc", "repro", check=False)
        assert refused.returncode != 0 and "is busy, it is being blocked by" in refused.stderr + refused.stdout

        unlocked = run_in(repo, "diffusion", "unlock").stdout.strip().splitlines()
        assert len(unlocked) == 1 and re.fullmatch(
            rf"diffusion unlock: released the DVC locks of PID {proc.pid} \(.*dvc repro train\), which no longer runs",
            unlocked[0],
        ), unlocked
        assert run_in(repo, "diffusion", "unlock").stdout == ""  # nothing left to release
        out = run_in(repo, "dvc", "repro", "train")
        assert "resuming from" in out.stdout and "Running stage 'train'" in out.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
