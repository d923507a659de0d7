"""Distributed training and sampling, for real: ``diffusion train`` / ``diffusion sample``
launching 2 gloo processes on the CPU (``train.distributed``, ``sample.distributed``) in a
real git + DVC repository, against one process with the same global batch.

One process computes the batch of 16 as two micro-batches of 8 (``train.micro_batch_size``),
each rank of two processes its 8: every forward and backward pass is then the same
computation, and the two gradients are summed once either way (a scale by 1/2 is exact), so
the trajectories are equal bit for bit by construction, on any machine and in any precision."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from conftest import TINY_PARAMS, copy_repo, full_params, pipeline_env, run_in

STEPS = 20
# Dropout off: it draws from each rank's own stream (by design), the one draw that differs
# from a single process. The loss-aware sampler learns from the all-gathered losses.
PARAMS = {
    **TINY_PARAMS,
    "model": {"name": "unet-tiny", "overrides": {"dropout": 0.0}},
    "train": {
        **TINY_PARAMS["train"], "steps": STEPS, "checkpoint_every": 10, "bpd_images": 0, "val_every": 10,
        "val_images": 16, "timestep_sampler": "loss-aware", "micro_batch_size": 8,
    },
    "sample": {**TINY_PARAMS["sample"], "num_samples": 10, "batch_size": 4, "steps": 3},
    "tracking": {"log_model": False},
}


# One thread a process, as the launcher gives each of 2 ranks on 2 cores: a kernel's reductions
# may split their sums by thread, so equal computations need equal thread counts.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def set_processes(repo: Path, section: str, processes: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section]["distributed"] = processes
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def loss_curve(repo: Path) -> np.ndarray:
    with open(repo / "plots/train_loss.csv") as fh:
        return np.array([[float(row["step"]), float(row["loss"])] for row in csv.DictReader(fh)])


def newest_checkpoint(repo: Path) -> dict:
    (path,) = sorted((repo / "checkpoints").glob(f"*/ckpt-*{STEPS}.pt"))
    return torch.load(path, weights_only=True)


def denoised(repo: Path) -> torch.Tensor:
    """What the trained EMA network of ``models/model.pt`` predicts for fixed inputs."""
    from diffusion.packaged import PackagedDiffusion

    net = PackagedDiffusion.load(repo / "models/model.pt").net.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=generator)
    with torch.no_grad():
        return net(x, torch.arange(0, 80, 10), y=torch.arange(8))


def train_fresh(repo: Path, processes: int) -> tuple[np.ndarray, dict, subprocess.CompletedProcess]:
    """``diffusion train`` from scratch as ``processes`` processes: its loss curve and last checkpoint."""
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    set_processes(repo, "train", processes)
    out = run_in(repo, "diffusion", "train", env=ONE_THREAD)
    return loss_curve(repo), newest_checkpoint(repo), out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prepared_repo) -> Path:
    repo = copy_repo(prepared_repo, tmp_path_factory.mktemp("ddp") / "repo", PARAMS)
    run_in(repo, "dvc", "repro", "prepare")
    return repo


@pytest.fixture(scope="module")
def trained(repo) -> dict:
    """One process, then 2 processes, from scratch: loss curves, last checkpoints, predictions."""
    single_curve, single, _ = train_fresh(repo, 1)
    single_output = denoised(repo)
    ddp_curve, ddp, out = train_fresh(repo, 2)
    return {"single": (single_curve, single, single_output), "ddp": (ddp_curve, ddp, denoised(repo), out)}


def test_two_processes_follow_one_process_with_the_same_global_batch(repo, trained):
    import mlflow

    single_curve, single, single_output = trained["single"]
    ddp_curve, ddp, ddp_output, out = trained["ddp"]

    # Bit for bit (the module's docstring says why): the loss curve, the weights, the EMA, the
    # optimiser's moments, what the network computes, and the loss-aware sampler's history.
    assert ddp_curve[:, 0].tolist() == list(range(5, STEPS + 1, 5))
    np.testing.assert_array_equal(ddp_curve, single_curve)
    assert ddp["step"] == single["step"] == STEPS
    for name, a, b in (("model", ddp["model"], single["model"]), ("ema", ddp["ema"]["model"], single["ema"]["model"])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    moments = [(a[k], b[k]) for a, b in zip(ddp["optimizer"]["state"].values(), single["optimizer"]["state"].values())
               for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert torch.equal(ddp_output, single_output)
    assert torch.equal(ddp["timestep_sampler"]["counts"], single["timestep_sampler"]["counts"])
    assert torch.equal(ddp["timestep_sampler"]["history"], single["timestep_sampler"]["history"])
    assert len(ddp["rng_ranks"]) == 2 and "rng_ranks" not in single  # each rank's dropout stream, for resume
    assert ddp["val_curve"] == single["val_curve"]

    # Rank 0 alone logged: one point per log step in one new run.
    client = mlflow.MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id], "attributes.run_name = 'train-unet-tiny'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    newest = max(runs, key=lambda r: r.info.start_time)
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "loss")] == list(range(5, STEPS + 1, 5))
    assert json.loads((repo / "metrics/train.json").read_text())["step"] == STEPS
    assert out.stdout.count("resuming") == 0


def test_a_killed_rank_fails_the_job_cleanly_and_the_next_run_resumes(repo, trained):
    _, uninterrupted, _, _ = trained["ddp"]
    shutil.rmtree(repo / "checkpoints")
    proc = subprocess.Popen(
        ["diffusion", "train"], cwd=repo, env=pipeline_env(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((repo / "checkpoints").glob("*/ckpt-*10.pt")):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint at step 10"
            time.sleep(0.05)
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        victim = next(p for p in ranks if "RANK=1" in "\n".join(f"{k}={v}" for k, v in p.environ().items()))
        victim.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    line = f"train.distributed: rank 1 of 2 (pid {victim.pid}) was killed by SIGKILL; the other ranks were stopped"
    assert line in stderr
    assert "Traceback" not in stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)  # no rank outlives the job
    stopped = max(int(p.stem.split("-")[1]) for p in (repo / "checkpoints").glob("*/ckpt-*.pt"))
    assert 10 <= stopped < STEPS

    out = run_in(repo, "diffusion", "train")
    assert "resuming from" in out.stdout and f"at step {stopped}" in out.stdout
    resumed = newest_checkpoint(repo)
    for key, tensor in uninterrupted["model"].items():  # bit for bit: gloo's all-reduce is deterministic
        assert torch.equal(resumed["model"][key], tensor), key
    assert resumed["loss_curve"] == uninterrupted["loss_curve"]


def test_samples_do_not_depend_on_the_number_of_processes(repo):
    run_in(repo, "diffusion", "sample")
    single = np.load(repo / "samples/samples.npz")
    set_processes(repo, "sample", 2)
    run_in(repo, "diffusion", "sample")
    sharded = np.load(repo / "samples/samples.npz")
    assert sharded["images"].shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(sharded["labels"], single["labels"])
    diff = np.abs(sharded["images"].astype(int) - single["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001  # the same images (a rounding step at most)


def test_batches_that_do_not_split_over_the_processes_are_one_line():
    from diffusion.config import ConfigError, parse_params

    params = full_params({**PARAMS, "train": {**PARAMS["train"], "batch_size": 15, "distributed": 2}})
    with pytest.raises(ConfigError, match=r"^params.yaml: train.batch_size: 15 does not split evenly over train.distributed 2 processes; allowed: a multiple of 2$"):
        parse_params(params, "params.yaml")


def _train_with_nan_on_rank_1(rank: int, port: int, folder: str, said) -> None:
    """One rank of a 2-process gloo job whose rank 1 alone trains on NaN latents."""
    import os

    from conftest import section
    from diffusion.models.factory import create_model
    from diffusion.process.gaussian import GaussianDiffusion
    from diffusion.process.schedules import make_betas
    from diffusion.training import distributed
    from diffusion.training.loop import NonFiniteLossError, train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    current = distributed.world()
    latents = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    if rank == 1:
        latents[:] = float("nan")
    cfg = section("train", steps=5, batch_size=4, checkpoint_every=5, log_every=1, device="cpu", precision="fp32", bpd_images=0)
    with distributed.process_group(current):
        model = create_model("unet-tiny", in_channels=1, image_size=8, learn_sigma=False, num_classes=None)
        diffusion = GaussianDiffusion(make_betas("cosine", 20, False), prediction="eps", variance="fixed_small", loss="mse")
        try:
            train(model, diffusion, latents, None, cfg, checkpoint_dir=folder, world=current, progress=False)
            said.put((rank, "trained on"))
        except NonFiniteLossError as err:
            said.put((rank, str(err)))


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The check is agreed: the loss terms are averaged over the ranks before it, so no rank
    goes on (and hangs in the next all-reduce) while another stops."""
    import torch.multiprocessing as mp

    from diffusion.training.launch import free_port

    said = mp.get_context("spawn").Queue()
    mp.start_processes(
        _train_with_nan_on_rank_1, args=(free_port(), str(tmp_path / "ckpt"), said), nprocs=2, start_method="spawn",
    )
    messages = dict(said.get(timeout=10) for _ in range(2))
    assert messages[0] == messages[1]
    assert messages[0].startswith("step 1: non-finite loss (nan); training stopped without saving")
    assert not list((tmp_path / "ckpt").glob("ckpt-*.pt"))
