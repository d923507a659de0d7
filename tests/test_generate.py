"""``diffusion generate`` from a model file, a run and the registry (a real SQLite MLflow
store): the files it writes, labels, seeds, the model's sampling settings as defaults,
and bad arguments as one line before anything is written. Also: the registered model
samples with the settings behind its FID, guidance and labels included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from tiny_unet import perturb, tiny_unet

from diffusion import registry, tracking
from diffusion.cli import main
from diffusion.evaluation import protocol
from diffusion.images import sampling_labels, to_uint8
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = 3
SPEC = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": CLASSES, "overrides": {}}
PROCESS = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
SAMPLING = {**DEFAULT_SAMPLER, "sampler": "ddim", "steps": 3, "schedule": "trailing", "guidance_scale": 2.0}
# The FID's protocol in the store: drawn with 4 DDIM steps on the linspace schedule, guided at 3 for t <= 40.
MEASURED = protocol.describe(
    num_samples=48, reference_images=48, reference_sha256="ab" * 32, inception="clean-fid clean, inception-2015-12-05",
    sampler="ddim", steps=4, schedule="linspace", eta=0.0, clip_denoised=True, threshold=None, guidance_scale=3.0,
    guidance_interval=[0.0, 40.0], precision="fp32", classifier_scale=0.0, classifier_md5=None,
)


def conditional(sampling: dict | None = None, num_classes: int | None = CLASSES) -> PackagedDiffusion:
    spec = {**SPEC, "num_classes": num_classes}
    return PackagedDiffusion(spec, PROCESS, net=tiny_unet(num_classes=num_classes), sampling=sampling)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return conditional(SAMPLING).save(tmp_path_factory.mktemp("model") / "model.pt")


def generate(*args: str) -> int:
    return main(["generate", *map(str, args)])


def read(out: Path) -> dict:
    with np.load(out / "samples.npz", allow_pickle=False) as npz:
        return {"images": npz["images"], "labels": npz["labels"], "sampling": json.loads(str(npz["sampling"])),
                "seed": int(npz["seed"])}


def test_generate_from_a_model_file(model_file, tmp_path, capsys):
    assert generate(model_file, "-n", 5, "--batch-size", 2, "--out", tmp_path / "a") == 0
    assert capsys.readouterr().out.startswith("diffusion generate: 5 images (")
    written = read(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid.png", *(f"image-0000{k}.png" for k in range(5)), "samples.npz"]
    assert written["images"].shape == (5, 1, 8, 8) and written["images"].dtype == np.uint8
    assert written["labels"].tolist() == [0, 1, 2, 0, 1]  # balanced by default
    assert written["sampling"] == SAMPLING and written["seed"] == 0  # the model's settings
    for k in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / f"image-0000{k}.png")), written["images"][k, 0])
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10)  # 3 columns of 8-pixel images with 2-pixel padding

    # The images are the model's samples with its settings (here in batches of 2, 2 and 1).
    packaged = PackagedDiffusion.load(model_file)
    labels = torch.tensor([0, 1, 2, 0, 1])
    first_two = to_uint8(packaged.sample(2, **SAMPLING, labels=labels[:2], seed=0))
    np.testing.assert_array_equal(written["images"][:2], first_two.numpy())

    # A seed reproduces its images; another seed, given labels and given settings change them.
    assert generate(model_file, "-n", 5, "--batch-size", 2, "--out", tmp_path / "again") == 0
    np.testing.assert_array_equal(read(tmp_path / "again")["images"], written["images"])
    assert generate(model_file, "-n", 5, "--batch-size", 2, "--seed", 1, "--out", tmp_path / "seed1") == 0
    assert not np.array_equal(read(tmp_path / "seed1")["images"], written["images"])
    assert generate(model_file, "-n", 3, "--labels", 2, "--steps", 2, "--guidance-scale", 1, "--out", tmp_path / "a") == 0
    relabelled = read(tmp_path / "a")
    assert relabelled["labels"].tolist() == [2, 2, 2]
    assert relabelled["sampling"] == {**SAMPLING, "steps": 2, "guidance_scale": 1.0}
    expected = to_uint8(packaged.sample(3, **relabelled["sampling"], labels=torch.full((3,), 2), seed=0))
    np.testing.assert_array_equal(relabelled["images"], expected.numpy())
    assert sorted(p.name for p in (tmp_path / "a").glob("image-*.png")) == [f"image-0000{k}.png" for k in range(3)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with a class-conditional model logged as train logs it, and its FID run promoted."""
    root = tmp_path_factory.mktemp("generate-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        with tracking.stage_run("train", "diffusion", run_name="train-conditional") as run:
            tracking.log_packaged_model(conditional())
        client = MlflowClient(uri)
        fid_run = client.create_run(tracking.experiment_id("diffusion", uri), tags={"mlflow.parentRunId": run.info.run_id})
        client.log_metric(fid_run.info.run_id, "fid", 12.0)
        for key, value in protocol.to_tags(MEASURED).items():
            client.set_tag(fid_run.info.run_id, key, value)
        client.set_terminated(fid_run.info.run_id)
        assert registry.promote("generate", run_id=fid_run.info.run_id, tracking_uri=uri).champion
    return {"uri": uri, "model_run": run.info.run_id}


def test_the_registered_model_samples_with_its_fids_settings(store):
    """Guidance needs labels: the champion's forward draws balanced labels, as the FID's images were."""
    model = registry.load_model("models:/generate@champion", tracking_uri=store["uri"])
    assert model.sampling == {key: MEASURED[key] for key in protocol.SAMPLING}
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    balanced = sampling_labels(None, 4, CLASSES)
    assert torch.equal(model(noise), model.sample(4, noise=noise, labels=balanced, **model.sampling))
    assert not torch.equal(model(noise), model.sample(4, noise=noise, labels=balanced, **DEFAULT_SAMPLER))
    assert torch.equal(model(noise, labels=torch.full((4,), 2)), model.sample(4, noise=noise, labels=torch.full((4,), 2), **model.sampling))


def test_generate_from_the_registry_and_from_a_run(store, tmp_path, monkeypatch):
    uri = store["uri"]
    assert generate("models:/generate@champion", "-n", 4, "--tracking-uri", uri, "--out", tmp_path / "champion") == 0
    champion = read(tmp_path / "champion")
    assert champion["sampling"] == {key: MEASURED[key] for key in protocol.SAMPLING}  # the FID's settings
    assert champion["images"].shape == (4, 1, 8, 8) and champion["labels"].tolist() == [0, 1, 2, 0]
    model = registry.load_model("models:/generate@champion", tracking_uri=uri)
    expected = to_uint8(model.sample(4, **champion["sampling"], labels=torch.tensor([0, 1, 2, 0]), seed=0))
    np.testing.assert_array_equal(champion["images"], expected.numpy())

    # The trained model of the run, by its id alone (MLFLOW_TRACKING_URI): train's default settings.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert generate(store["model_run"], "-n", 2, "--out", tmp_path / "run") == 0
    assert read(tmp_path / "run")["sampling"] == DEFAULT_SAMPLER
    assert generate(f"runs:/{store['model_run']}/model", "-n", 2, "--out", tmp_path / "uri") == 0
    np.testing.assert_array_equal(read(tmp_path / "uri")["images"], read(tmp_path / "run")["images"])


@pytest.fixture(scope="module")
def unconditional_file(tmp_path_factory) -> Path:
    return conditional(num_classes=None).save(tmp_path_factory.mktemp("unconditional") / "model.pt")


FLOW = {"process": "flow", "schedule": None, "timesteps": 50, "prediction": None, "variance": "fixed_small", "loss": "mse"}


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory) -> Path:
    model = PackagedDiffusion(SPEC, FLOW, net=tiny_unet(num_classes=CLASSES), sampling={**SAMPLING, "sampler": "euler"})
    return model.save(tmp_path_factory.mktemp("flow") / "model.pt")


TEXT_ENCODER = {"name": "char-transformer", "width": 16, "depth": 1, "heads": 2, "max_length": 24}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A text-conditional unet-tiny (a char-transformer learned with it), perturbed off its zero-initialised layers."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PackagedDiffusion({**SPEC, "num_classes": None, "text_encoder": TEXT_ENCODER}, PROCESS, sampling=SAMPLING)
    perturb(model.net)
    return model.save(tmp_path_factory.mktemp("text") / "model.pt")


def test_generate_from_a_text_model_draws_each_image_for_its_prompt(text_file, tmp_path):
    """--prompt and the lines of --prompts FILE (blank ones skipped), in that order, cycle over the
    images: image k is the model's sample for prompt k mod 2
    from seed (0, k), guided by the model's scale against the empty caption; another prompt draws another image."""
    (tmp_path / "prompts.txt").write_text("a thick seven\n\n")
    assert generate(text_file, "-n", 4, "--prompt", "a thin two", "--prompts", tmp_path / "prompts.txt", "--batch-size", 3,
                    "--out", tmp_path / "t") == 0
    with np.load(tmp_path / "t" / "samples.npz", allow_pickle=False) as npz:
        prompts, images, sampling = [str(p) for p in npz["prompts"]], npz["images"], json.loads(str(npz["sampling"]))
    assert prompts == ["a thin two", "a thick seven"] * 2 and sampling["guidance_scale"] == 2.0
    packaged = PackagedDiffusion.load(text_file)
    assert packaged.conditioning == "text" and packaged.model_spec["text_encoder"] == {**TEXT_ENCODER, "mlp_ratio": 4.0}  # its defaults too
    expected = to_uint8(packaged.sample(4, **sampling, labels=packaged.tokenize(prompts), seed=0))
    np.testing.assert_array_equal(images, expected.numpy())
    assert not np.array_equal(images[0], images[2]) or not np.array_equal(images[1], images[3])  # own seeds
    unclipped = {**sampling, "clip_denoised": False}  # this untrained network's x̂_0 lies far outside [-1, 1]
    asked = packaged.sample(4, **unclipped, labels=packaged.tokenize(prompts), seed=0)
    other = packaged.sample(4, **unclipped, labels=packaged.tokenize(["a large eight"] * 4), seed=0)
    assert ((asked - other).abs().amax(dim=(1, 2, 3)) > 1e-3).all()  # the prompt changes every image


FITTED_SAMPLING = {**SAMPLING, "sampler": "euler", "schedule": "fitted", "timesteps": [1.0, 0.4, 0.1]}


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory) -> Path:
    model = PackagedDiffusion(SPEC, FLOW, net=tiny_unet(num_classes=CLASSES), sampling=FITTED_SAMPLING)
    return model.save(tmp_path_factory.mktemp("fitted") / "model.pt")


def test_a_model_with_a_fitted_schedule_samples_on_its_times(fitted_file, tmp_path):
    """A model that carries a fitted schedule (as a promoted one does) samples on those times,
    and records them; naming a formula instead drops them."""
    assert generate(fitted_file, "-n", 2, "--out", tmp_path / "fitted") == 0
    written = read(tmp_path / "fitted")
    assert written["sampling"] == FITTED_SAMPLING
    packaged = PackagedDiffusion.load(fitted_file)
    labels = torch.tensor([0, 1])
    expected = packaged.sample(2, labels=labels, seed=0)
    np.testing.assert_array_equal(written["images"], to_uint8(expected).numpy())
    assert not torch.equal(expected, packaged.sample(2, labels=labels, seed=0, schedule="linspace"))
    assert generate(fitted_file, "-n", 2, "--schedule", "log-snr", "--out", tmp_path / "formula") == 0
    assert read(tmp_path / "formula")["sampling"] == {**FITTED_SAMPLING, "schedule": "log-snr", "timesteps": None}


def test_generate_from_a_flow_model_file(flow_file, tmp_path):
    """A model of a continuous process samples on it, with its own sampler (euler) or another;
    its steps have no bound (it has no timestep count), churn goes to heun."""
    assert generate(flow_file, "-n", 3, "--out", tmp_path / "flow") == 0
    written = read(tmp_path / "flow")
    assert written["sampling"] == {**SAMPLING, "sampler": "euler"}
    packaged = PackagedDiffusion.load(flow_file)
    assert packaged.diffusion.process.name == "flow"
    expected = to_uint8(packaged.sample(3, **written["sampling"], labels=torch.tensor([0, 1, 2]), seed=0))
    np.testing.assert_array_equal(written["images"], expected.numpy())
    for args in (["--sampler", "sde", "--steps", 60], ["--sampler", "heun", "--s-churn", 10, "--s-tmax", 5]):
        assert generate(flow_file, "-n", 2, *args, "--out", tmp_path / "more") == 0
        assert read(tmp_path / "more")["images"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("model", "args", "code", "message"),
    [
        ("conditional", ["--sampler", "nope"], 2,
         "argument --sampler: invalid choice: 'nope' (choose from 'ddpm', 'ddim', 'dpm++2m', 'dpm++3m', 'unipc', 'unipc3', 'ipndm', 'heun', 'euler', 'sde')"),
        ("conditional", ["--sampler", "euler"], 1,
         "--sampler: euler steps in the process's own time; process 'ddpm' is a discrete chain: use vp, edm or flow"),
        ("conditional", ["--s-churn", "5"], 1, "--s-churn: 5.0 means nothing to ddim; use 0.0, or a sampler that takes it: heun"),
        ("conditional", ["--s-churn", "-1"], 1, "--s-churn: got -1.0; allowed: 0.0 or more"),
        ("conditional", ["--sampler", "heun", "--s-tmin", "2", "--s-tmax", "1"], 1, "--s-tmin: 2.0 is above --s-tmax 1.0"),
        ("conditional", ["--guidance-interval", "0", "50"], 1,
         "--guidance-interval: got [0.0, 50.0]; allowed 0 <= LO <= HI <= 49 (the process's times)"),
        ("flow", ["--guidance-interval", "0", "2"], 1,
         "--guidance-interval: got [0.0, 2.0]; allowed 0 <= LO <= HI <= 1 (the process's times)"),
        ("conditional", ["-n", "0"], 1, "--num-images: got 0; allowed: 1 or more"),
        ("conditional", ["--schedule", "fitted"], 1,
         "--schedule: fitted needs a model that carries a fitted schedule (sample.schedule fitted before it was promoted); "
         "this one has none: name linspace, trailing, log-snr or karras"),
        ("fitted", ["--steps", "4"], 1,
         "--schedule: the model's schedule was fitted for euler at 3 steps, not euler at 4: drop --sampler/--steps, or name another --schedule"),
        ("conditional", ["--labels", "3"], 1, "--labels: 3 is not a class of this model; allowed 0..2"),
        ("conditional", ["--steps", "51"], 1, "--steps: 51 is more than the model's 50 timesteps; allowed 1..50"),
        ("conditional", ["--guidance-interval", "5", "2"], 1, "--guidance-interval: got [5.0, 2.0]; allowed: LO HI with 0 <= LO <= HI"),
        ("conditional", ["--sampler", "ddpm", "--eta", "0.5"], 1, "--eta: 0.5 means nothing to ddpm; use 0, or a sampler that takes eta: ddim"),
        ("unconditional", ["--guidance-scale", "3"], 1,
         "--guidance-scale: 3.0 guides a conditional model, and this one is unconditional; allowed: 1 (no guidance)"),
        ("unconditional", ["--labels", "1"], 1, "--labels: this model is unconditional, not class-conditional; leave --labels out"),
        ("conditional", ["--prompt", "a two"], 1,
         "--prompt: this model is class-conditional, not text-conditional; leave --prompt and --prompts out"),
        ("conditional", ["--prompts", "<tmp>/none.txt"], 1,
         "--prompts: <tmp>/none.txt: cannot be read (No such file or directory); allowed: a UTF-8 text file, one prompt a line"),
        ("conditional", ["--prompts", "/dev/null"], 1, "--prompts: /dev/null: holds no prompt; allowed: a UTF-8 text file, one prompt a line"),
        ("text", [], 1, '--prompt: this model is text-conditional; give --prompt "a caption" (repeatable) or --prompts FILE'),
        ("text", ["--prompt", "a two", "--labels", "1"], 1, "--labels: this model is text-conditional, not class-conditional; leave --labels out"),
        ("missing.pt", [], 1, f"model: missing.pt: no such file, and not a run id or a model URI ({registry.URI_FORMS})"),
        ("conditional", ["--sampler", "ddim", "--eta", "5"], 1, "--eta: 5.0 is outside DDIM's range; allowed 0..1"),
        ("conditional", ["--eta", "1.5"], 1, "--eta: 1.5 is outside DDIM's range; allowed 0..1"),  # the model's DDIM
        ("conditional", ["--sampler", "dpm++2m", "--eta", "0.5"], 1,
         "--eta: 0.5 means nothing to dpm++2m; use 0, or a sampler that takes eta: ddim"),
        # <tmp>/afile is a regular file: root, who ignores permissions, cannot make a folder in it either.
        ("conditional", ["--out", "<tmp>/afile"], 1, "--out: <tmp>/afile: is a file, not a folder; name a folder to write the images in"),
        ("conditional", ["--out", "<tmp>/afile/out"], 1,
         "--out: <tmp>/afile/out: cannot write there (Not a directory); allowed: a folder you can write"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_is_written(
    model_file, unconditional_file, flow_file, fitted_file, text_file, tmp_path, capsys, monkeypatch, model, args, code, message
):
    def sampled(*args, **kwargs):
        raise AssertionError("sampled images for bad arguments")

    monkeypatch.setattr("diffusion.images.generate_images", sampled)
    (tmp_path / "afile").write_text("not a folder")
    source = {"conditional": model_file, "unconditional": unconditional_file, "flow": flow_file, "fitted": fitted_file,
              "text": text_file}.get(model, model)
    args = [arg.replace("<tmp>", str(tmp_path)) for arg in args]
    assert generate(source, "--out", tmp_path / "out", *args) == code  # the last --out counts
    assert capsys.readouterr().err == f"diffusion generate: error: {message.replace('<tmp>', str(tmp_path))}\n"
    assert [path.name for path in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "not a folder"


def test_a_model_uri_the_store_lacks_is_one_line(store, tmp_path, capsys):
    assert generate("models:/generate@nope", "--tracking-uri", store["uri"], "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith("diffusion generate: error: model: models:/generate@nope: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
