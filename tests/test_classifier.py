"""The noise-aware classifier (diffusion/models/classifier.py), its training
(diffusion/training/classifier.py), the train_classifier stage and classifier guidance in
the sample stage, on tiny configs and a toy dataset of two classes of distinct images."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_unet import perturb, tiny_unet

from conftest import full_params, section
from diffusion.cli import main
from diffusion.config import ConfigError, parse_params
from diffusion.data.dataset import Dataset, save_dataset
from diffusion.errors import UserError
from diffusion.evaluation import protocol
from diffusion.models.classifier import NoiseAwareClassifier, classifier_from_state, classifier_state, create_classifier
from diffusion.models.factory import create_model
from diffusion.packaged import PackagedDiffusion
from diffusion.process.factory import make_diffusion
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.options import process_identity
from diffusion.process.schedules import make_betas
from diffusion.stages.paths import (
    CLASSIFIER, CLASSIFIER_ACCURACY, CLASSIFIER_DISABLED, HELDOUT_SET, MODEL, SAMPLES, TRAIN_SET,
)
from diffusion.stages.sample import generate, load_classifier
from diffusion.training.checkpoint import load_checkpoint, save_checkpoint
from diffusion.training.classifier import accuracy_by_t, train_classifier
from diffusion.training.loop import seeded_init

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = {"schedule": "cosine", "timesteps": 100, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
TOY_TRAINING = dict(
    classifier=True, classifier_model="classifier-tiny", classifier_steps=60, classifier_batch_size=32,
    classifier_lr=3e-3, classifier_weight_decay=0.0, classifier_log_every=20, classifier_eval_images=200,
    classifier_eval_bins=5, classifier_device="cpu",
)
# Params of an 8 px run of the stages on the toy data.
TOY_PARAMS = {
    "data": {"image_size": 8, "holdout": 200},
    "model": {"name": "unet-tiny", "conditioning": "none"},  # the classifier alone guides
    "diffusion": {"timesteps": 100},
    "guidance": TOY_TRAINING,
    "sample": {"num_samples": 6, "batch_size": 6, "steps": 4, "grid_rows": 2, "device": "cpu", "guidance_scale": 1.0},
}


def toy_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8x8 images: class 0 bright in the top half, class 1 in the bottom half, noisy."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.full((count, 1, 8, 8), 40.0)
    images[labels == 0, :, :4] = 215.0
    images[labels == 1, :, 4:] = 215.0
    return (images + 20 * torch.randn(images.shape, generator=gen)).clamp(0, 255).to(torch.uint8), labels


def toy_process() -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("cosine", 100))


def trained_classifier() -> tuple[NoiseAwareClassifier, list[tuple[int, float]]]:
    images, labels = toy_images(256, seed=0)
    with seeded_init(0):
        net = create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=2)
    cfg = section("guidance", **TOY_TRAINING)
    curve = train_classifier(net, toy_process(), images, labels, cfg, device=torch.device("cpu"), progress=False)
    return net.eval(), curve


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize(("name", "size", "channels"), [("classifier-tiny", 8, 1), ("classifier-small", 28, 1), ("classifier-small", 32, 3)])
def test_logits_have_one_column_a_class_and_a_fresh_classifier_does_not_guide(name: str, size: int, channels: int):
    """Any t, integer or real (the step schedules put t between timesteps); a fresh
    classifier's zero head says 1/K for every class, so its gradient is zero."""
    net = create_classifier(name, in_channels=channels, image_size=size, num_classes=10)
    x = torch.randn(3, channels, size, size, requires_grad=True)
    for t in (torch.tensor([0, 500, 999]), torch.tensor([0.5, 250.25, 998.0])):
        logits = net(x, t)
        assert logits.shape == (3, 10) and torch.equal(logits, torch.zeros(3, 10))
    assert torch.equal(torch.autograd.grad(net(x, t).log_softmax(1)[:, 3].sum(), x)[0], torch.zeros_like(x))


def test_the_trunk_is_the_unets_encoder_half():
    """Built by the U-Net's own encoder(): the classifier's conv_in, down path and middle hold
    the parameters, under the same names and shapes, of the U-Net of the same arguments."""
    net = create_classifier("classifier-small", in_channels=1, image_size=28, num_classes=10)
    unet = create_model("unet-small", in_channels=1, image_size=28, resblock_updown=True)
    trunk = {k: v.shape for k, v in net.state_dict().items() if k.split(".")[0] in ("time_embed", "conv_in", "down", "middle")}
    assert trunk == {k: v.shape for k, v in unet.state_dict().items() if k in trunk}
    assert set(net.state_dict()) - set(trunk) == {
        "norm_out.weight", "norm_out.bias", "pool.positional_embedding", "pool.qkv.weight", "pool.qkv.bias",
        "pool.proj.weight", "pool.proj.bias",
    }
    assert net.pool.positional_embedding.shape == (7 * 7 + 1, 64)  # pooled at the lowest resolution, 7x7


def test_bad_classifier_arguments_are_one_line():
    with pytest.raises(ValueError, match=r"^classifier name: unknown 'classifier-huge'; allowed: classifier-tiny, classifier-small$"):
        create_classifier("classifier-huge", in_channels=1, image_size=8, num_classes=2)
    with pytest.raises(ValueError, match=r"^num_classes: got 1; allowed: an int >= 2"):
        create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=1)
    with pytest.raises(ValueError, match=r"^data.image_size: 30 is not divisible by 4"):
        create_classifier("classifier-small", in_channels=1, image_size=30, num_classes=2)


def test_the_file_form_rebuilds_the_classifier():
    net = perturb(create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=3))
    state = classifier_state(net, process={"schedule": "cosine"})
    back = classifier_from_state(state)
    assert not back.training and state["process"] == {"schedule": "cosine"}
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 60])
    assert torch.equal(back(x, t), net.eval()(x, t))


# ---------------------------------------------------------------- training


def test_training_on_noised_toy_images_is_accurate_at_small_t_and_near_chance_at_large_t():
    """60 steps of batch 32 (a few seconds): held-out accuracy 1.0 while x_t still shows the
    image, lower where it is mostly noise (the last fifth of the cosine schedule's t)."""
    start = time.perf_counter()
    net, curve = trained_classifier()
    assert time.perf_counter() - start < 20
    assert [step for step, _ in curve] == [20, 40, 60] and curve[-1][1] < 0.5 * curve[0][1]
    heldout, labels = toy_images(200, seed=1)
    accuracy = accuracy_by_t(net, toy_process(), heldout, labels, bins=5, batch_size=100, seed=0)
    assert [(lo, hi) for lo, hi, _ in accuracy] == [(0, 19), (20, 39), (40, 59), (60, 79), (80, 99)]
    assert accuracy[0][2] >= 0.98 and accuracy[1][2] >= 0.98
    assert accuracy[-1][2] < accuracy[0][2] - 0.1


def test_training_refuses_labels_outside_the_classes():
    images, labels = toy_images(8, seed=0)
    net = create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=2)
    with pytest.raises(ValueError, match=r"^labels: need one label in 0..1 per image; got \(8,\)$"):
        train_classifier(net, toy_process(), images, labels + 1, section("guidance", **TOY_TRAINING), device=torch.device("cpu"))


# ---------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"guidance": {"classifier_model": "classifier-huge"}}, "guidance.classifier_model: got 'classifier-huge'; input should be 'classifier-tiny' or 'classifier-small'"),
        ({"guidance": {"classifier_lr": 0}}, "guidance.classifier_lr: Input should be greater than 0 (got 0)"),
        ({"guidance": {"classifier_eval_bins": 0}}, "guidance.classifier_eval_bins: Input should be greater than or equal to 1 (got 0)"),
        ({"guidance": {"classifier": True}, "data": {"image_size": 10}, "model": {"name": "unet-tiny"}},
         "guidance.classifier_model: 'classifier-small' does not fit: data.image_size: 10 is not divisible by 4, the "
         "down-sampling of channel_mult [1, 2, 2]; allowed multiples of 4 (or fewer channel_mult levels)"),
        ({"guidance": {"classifier": True}, "data": {"holdout": 0}}, "data.holdout: the classifier's accuracy curve needs held-out images; allowed: >= 1"),
        ({"guidance": {"classifier": True, "classifier_eval_bins": 20}, "diffusion": {"timesteps": 10, "schedule": "cosine"}, "sample": {"steps": 5}},
         "guidance.classifier_eval_bins: 20 is more than diffusion.timesteps (10); allowed 1..10"),
    ],
)
def test_bad_classifier_params_are_one_line_naming_the_key(changes, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(full_params(changes), "params.yaml")
    assert str(err.value) == f"params.yaml: {expected}"


def test_the_classifier_shape_rules_apply_only_when_it_is_trained():
    parse_params(full_params({
        "data": {"image_size": 10, "holdout": 0}, "model": {"name": "unet-tiny"}, "train": {"bpd_images": 0, "val_images": 0},
    }))


# ---------------------------------------------------------------- the stage


def test_the_disabled_stage_writes_only_its_marker_and_loads_no_torch(tmp_path: Path):
    """``diffusion train_classifier`` with guidance.classifier false: the marker and an empty
    plot, in the time of the command's start, with neither torch nor MLflow imported."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params()))
    code = (
        "import sys, time; from diffusion.cli import main; start = time.perf_counter(); code = main(['train_classifier']); "
        "print(code, round(time.perf_counter() - start, 3), sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    status, seconds, loaded = out.stdout.split(maxsplit=2)
    assert status == "0" and loaded.strip() == "[]" and float(seconds) < 2.0, out.stdout
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([str(CLASSIFIER), str(CLASSIFIER_ACCURACY), "params.yaml"])
    assert (tmp_path / CLASSIFIER).read_bytes() == CLASSIFIER_DISABLED
    assert (tmp_path / CLASSIFIER_ACCURACY).read_text() == "t_lo,t_hi,accuracy\n"


def write_toy_data(root: Path) -> None:
    for path, (images, labels) in ((TRAIN_SET, toy_images(256, seed=0)), (HELDOUT_SET, toy_images(200, seed=1))):
        save_dataset(root / path, Dataset(images, labels, ["top", "bottom"], "imagefolder", "file:///toy"))


@pytest.fixture
def toy_repo(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    write_toy_data(tmp_path)
    return tmp_path


def test_the_enabled_stage_trains_writes_the_classifier_and_logs_accuracy_against_t(toy_repo: Path):
    import mlflow

    from diffusion.stages import train_classifier as stage

    stage.run(parse_params(full_params(TOY_PARAMS)))
    state = load_checkpoint(CLASSIFIER)
    assert state["process"] == {"process": "ddpm", "schedule": "cosine", "timesteps": 100, "zero_terminal_snr": False}
    assert classifier_from_state(state).num_classes == 2
    rows = CLASSIFIER_ACCURACY.read_text().splitlines()
    assert rows[0] == "t_lo,t_hi,accuracy" and len(rows) == 6 and float(rows[1].split(",")[2]) >= 0.98

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id])
    assert run.info.run_name == "classifier-classifier-tiny" and run.data.params["guidance.classifier_steps"] == "60"
    history = client.get_metric_history(run.info.run_id, "accuracy_vs_t")
    assert sorted(m.step for m in history) == [0, 20, 40, 60, 80]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "classifier_loss")] == [20, 40, 60]
    assert 0.5 < run.data.metrics["classifier_accuracy"] <= 1


# ---------------------------------------------------------------- guiding the sample stage


def unconditional_model() -> PackagedDiffusion:
    spec = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None}
    return PackagedDiffusion(spec, PROCESS, net=tiny_unet())


def test_an_unconditional_model_is_guided_towards_balanced_labels_of_the_classifiers_classes():
    """The unconditional network is called without labels; a fresh classifier changes no
    image, a trained one changes them."""
    packaged, params = unconditional_model(), parse_params(full_params(TOY_PARAMS))
    plain, no_labels = generate(packaged, params, torch.device("cpu"))
    fresh = create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=2).requires_grad_(False)
    unguided, labels = generate(packaged, params, torch.device("cpu"), fresh)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1] and no_labels.tolist() == [0] * 6
    assert torch.equal(unguided, plain)
    scaled = parse_params(full_params(TOY_PARAMS | {"guidance": TOY_TRAINING | {"classifier_scale": 50.0}}))
    guided, _ = generate(packaged, scaled, torch.device("cpu"), perturb(fresh, seed=3))
    assert (guided.int() - plain.int()).abs().max() > 0


def test_the_sample_stage_guides_with_the_classifier_and_records_it_for_the_fid_protocol(toy_repo: Path):
    unconditional_model().save(MODEL)
    net = perturb(create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=2))
    save_checkpoint(CLASSIFIER, classifier_state(net, process={"schedule": "cosine", "timesteps": 100, "zero_terminal_snr": False}))
    Path("params.yaml").write_text(yaml.safe_dump(full_params(TOY_PARAMS)))
    assert main(["sample"]) == 0
    with np.load(SAMPLES) as npz:
        sampling, labels = json.loads(str(npz["sampling"])), npz["labels"]
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    md5 = hashlib.md5(CLASSIFIER.read_bytes()).hexdigest()
    assert sampling["classifier_scale"] == 1.0 and sampling["classifier_md5"] == md5
    measured = protocol.describe(num_samples=6, reference_images=6, reference_sha256="ab" * 32, inception="i", **sampling)
    assert protocol.from_tags(protocol.to_tags(measured)) == measured

    # At scale 0 nothing guides, and the samples say so.
    Path("params.yaml").write_text(yaml.safe_dump(full_params(TOY_PARAMS | {"guidance": TOY_TRAINING | {"classifier_scale": 0.0}})))
    assert main(["sample"]) == 0
    with np.load(SAMPLES) as npz:
        sampling = json.loads(str(npz["sampling"]))
    assert sampling["classifier_scale"] == 0.0 and sampling["classifier_md5"] is None


def test_a_classifier_that_does_not_fit_the_model_is_one_line(toy_repo: Path):
    packaged = unconditional_model()
    CLASSIFIER.parent.mkdir(parents=True, exist_ok=True)
    CLASSIFIER.write_bytes(CLASSIFIER_DISABLED)
    with pytest.raises(UserError, match=r"^guidance.classifier: models/classifier.pt holds no classifier \(train_classifier ran with guidance.classifier false\): run `dvc repro train_classifier`$"):
        load_classifier(packaged, torch.device("cpu"))
    net = create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=3)
    save_checkpoint(CLASSIFIER, classifier_state(net, process={"schedule": "linear", "timesteps": 100}))
    with pytest.raises(UserError, match=r"^guidance.classifier: models/classifier.pt was trained on diffusion \{'schedule': 'linear'\}, the model on \{'schedule': 'cosine'\}: run `dvc repro train_classifier`$"):
        load_classifier(packaged, torch.device("cpu"))
    save_checkpoint(CLASSIFIER, {"state_dict": net.state_dict()})
    with pytest.raises(UserError, match=r"^guidance.classifier: models/classifier.pt is not a classifier file \(train_classifier writes one\)$"):
        load_classifier(packaged, torch.device("cpu"))
    save_checkpoint(CLASSIFIER, classifier_state(net, process={"schedule": "cosine", "timesteps": 100}))
    conditional = PackagedDiffusion({**packaged.model_spec, "num_classes": 2}, PROCESS, net=tiny_unet(num_classes=2))
    with pytest.raises(UserError, match=r"^guidance.classifier: models/classifier.pt tells 3 classes apart, the model 2: run `dvc repro train_classifier`$"):
        load_classifier(conditional, torch.device("cpu"))


# ---------------------------------------------------------------- continuous processes


@pytest.mark.parametrize("process", ["flow", "edm", "vp"])
def test_a_classifier_on_a_continuous_process_trains_on_its_times_and_guides_to_finite_samples(toy_repo: Path, process: str):
    """On a continuous process the classifier trains at t uniform on [t_min, t_max], its accuracy
    bins split that range, the stage's check takes it for a model of that process (and one line
    for a ddpm model), and its gradient, told the process's network time, guides the euler
    sampler to finite images other than the unguided ones."""
    section_ = {"process": process, "schedule": None, "timesteps": 100, "prediction": None,
                "variance": "fixed_small", "loss": "mse", "sigma_data": 0.5}
    diffusion = make_diffusion(section_)
    images, labels = toy_images(64, seed=0)
    with seeded_init(0):
        net = create_classifier("classifier-tiny", in_channels=1, image_size=8, num_classes=2)
    cfg = section("guidance", **{**TOY_TRAINING, "classifier_steps": 6, "classifier_log_every": 3})
    curve = train_classifier(net, diffusion, images, labels, cfg, device=torch.device("cpu"), progress=False)
    assert [step for step, _ in curve] == [3, 6] and all(np.isfinite(loss) for _, loss in curve)
    accuracy = accuracy_by_t(net, diffusion, images[:16], labels[:16], bins=2, batch_size=16, seed=0)
    t_min, t_max = diffusion.process.t_min, diffusion.process.t_max
    edges = [value for lo, hi, _ in accuracy for value in (lo, hi)]
    assert edges == pytest.approx([t_min, (t_min + t_max) / 2, (t_min + t_max) / 2, t_max])

    spec = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None}
    packaged = PackagedDiffusion(spec, section_, net=tiny_unet())
    save_checkpoint(CLASSIFIER, classifier_state(perturb(net.eval(), seed=3), process=process_identity(section_)))
    classifier = load_classifier(packaged, torch.device("cpu"))
    told = []

    def recording(x, t):
        told.append(t)
        return classifier(x, t)

    settings = dict(sampler="euler", steps=3, seed=0, clip_denoised=False)
    plain = packaged.sample(2, **settings)
    guided = packaged.sample(2, **settings, labels=torch.tensor([0, 1]), classifier=recording, classifier_scale=50.0)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
    first = packaged.diffusion.process.network_time(torch.full((2,), t_max, dtype=torch.float64))
    assert len(told) == 3 and torch.equal(told[0], first)  # the first step is at t_max
    with pytest.raises(UserError, match=r"^guidance.classifier: models/classifier.pt was trained on diffusion \{'process': "):
        load_classifier(unconditional_model(), torch.device("cpu"))
