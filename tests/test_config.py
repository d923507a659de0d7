"""params.yaml validation: one line naming the key and what is allowed, before any work."""

import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml

from diffusion.sampling import specs as sampler_specs
from diffusion.config import ConfigError, DiffusionParams, Params, SampleParams, load_params, parse_params
from diffusion.process.options import Loss, Prediction, Variance
from diffusion.process.schedules import BETA_SCHEDULES
from conftest import full_params

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_are_valid_and_match_the_defaults_where_documented():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "mnist5k"
    assert params.model.name in __import__("diffusion.models.factory", fromlist=["MODELS"]).MODELS


def test_empty_or_partial_params_are_an_error_not_a_second_set_of_defaults(tmp_path):
    """The committed params.yaml is the one place of the embedded default's numbers."""
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as err:
        load_params(empty)
    assert str(err.value) == f"{empty}: data: missing; every key must be set (the committed params.yaml sets them all)"
    partial = full_params()
    del partial["train"]["steps"]
    with pytest.raises(ConfigError, match=r"params: train\.steps: missing; every key must be set"):
        parse_params(partial)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lrr": 1}}, "train.lrr: unknown key; allowed: steps, batch_size, lr"),
        ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"diffusion": {"schedule": "cosin"}}, "diffusion.schedule: got 'cosin'; input should be 'linear', 'cosine' or 'sigmoid'"),
        ({"diffusion": {"variance": "learned_range"}}, "diffusion.variance: 'learned_range' needs diffusion.loss"),
        ({"diffusion": {"loss": "hybrid"}}, "diffusion.loss: 'hybrid' trains a learned variance"),
        ({"sample": {"steps": 2000}}, "sample.steps: 2000 is more than diffusion.timesteps (1000)"),
        ({"sample": {"sampler": "ddim", "eta": 1.5}}, "sample.eta: 1.5 is outside DDIM's range"),
        ({"sample": {"sampler": "ddpm", "eta": 5.0}}, "sample.eta: 5.0 means nothing to ddpm; use 0, or a sampler that takes eta: ddim"),
        ({"sample": {"use_ema": False}}, "sample.use_ema: unknown key; allowed: num_samples"),
        ({"sample": {"sampler": "euler2"}}, "sample.sampler: got 'euler2'; input should be 'ddpm', 'ddim', 'dpm++2m', 'dpm++3m', 'unipc', 'unipc3', 'ipndm', 'heun', 'euler' or 'sde'"),
        ({"sample": {"sampler": "euler"}}, "sample.sampler: euler steps in the process's own time; process 'ddpm' is a discrete chain: use vp, edm or flow"),
        ({"diffusion": {"zero_terminal_snr": True, "prediction": "eps"}}, "diffusion.prediction: 'eps' cannot recover x0"),
        ({"diffusion": {"schedule": "linear", "timesteps": 10}, "sample": {"steps": 5}}, "diffusion.timesteps: the linear schedule"),
        ({"data": {"image_size": 30}}, "data.image_size: 30 is not divisible by 4"),
        ({"model": {"name": "unet-huge"}}, "model.name: unknown 'unet-huge'; allowed: unet-tiny, unet-small"),
        ({"model": {"overrides": {"depth": 3}}}, "model.overrides: unknown key 'depth' for unet-small (a unet); allowed"),
        ({"model": {"overrides": {"num_res_blocks": "two"}}}, "model.overrides.num_res_blocks: needs an int >= 1 (got 'two')"),
        ({"model": {"overrides": {"channel_mult": []}}}, "model.overrides.channel_mult: needs a non-empty list of ints >= 1 (got [])"),
        ({"model": {"overrides": {"base_channels": 0}}}, "model.overrides.base_channels: needs an int >= 1 (got 0)"),
        ({"model": {"overrides": {"dropout": 1.5}}}, "model.overrides.dropout: needs a number in [0, 1) (got 1.5)"),
        ({"model": {"overrides": {"head_channels": 3}}}, "head_channels=3 does not divide the 64 channels of an attention block"),
        ({"model": {"name": "dit-cpu", "overrides": {"patch_size": 3}}}, "data.image_size: 28 is not divisible by patch_size 3"),
        ({"model": {"name": "dit-cpu", "overrides": {"num_heads": 5}}}, "num_heads=5 does not divide hidden_size 128"),
        ({"model": {"name": "dit-cpu", "overrides": {"num_res_blocks": 2}}}, "model.overrides: unknown key 'num_res_blocks' for dit-cpu (a dit); allowed: depth, hidden_size"),
        ({"model": {"name": "diffit-cpu", "overrides": {"window_size": 4}}}, "window_size: 4 does not tile the 14 x 14 feature map of level 1"),
        ({"model": {"name": "latent-diffit-cpu", "overrides": {"mlp_ratio": 0}}}, "model.overrides.mlp_ratio: needs a finite number > 0 (got 0)"),
        ({"model": {"name": "latent-diffit-cpu", "overrides": {"mlp_ratio": float("inf")}}}, "model.overrides.mlp_ratio: needs a finite number > 0 (got inf)"),
        # YAML's .inf and .nan pass every range check (inf > 0) and failed only in a stage (issue 28)
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number (got inf)"),
        ({"train": {"weight_decay": float("inf")}}, "train.weight_decay: Input should be a finite number (got inf)"),
        ({"sample": {"guidance_scale": float("inf")}}, "sample.guidance_scale: Input should be a finite number (got inf)"),
        ({"sample": {"guidance_interval": [0, float("nan")]}}, "sample.guidance_interval.1: Input should be a finite number (got nan)"),
        ({"vae": {"kl_weight": float("nan")}}, "vae.kl_weight: Input should be a finite number (got nan)"),
        ({"sweep": {"space": {"train.lr": {"type": "float", "low": 0.001, "high": float("inf")}}}}, "sweep.space.train.lr.high: Input should be a finite number (got inf)"),
        # evaluate's FID needs a covariance of the samples' features (issue 28)
        ({"sample": {"num_samples": 1}}, "sample.num_samples: Input should be greater than or equal to 2 (got 1)"),
        # train_vae's held-out MSE and reconstruction grid: ZeroDivisionError after the autoencoder trained
        ({"model": {"space": "latent", "name": "unet-tiny"}, "vae": {"name": "vae-tiny"}, "data": {"holdout": 0}},
         "data.holdout: with model.space latent, train_vae scores and shows the autoencoder on held-out images; allowed: >= 1"),
        # train's bits/dim of no held-out images: ZeroDivisionError after the whole training
        ({"data": {"holdout": 0}, "train": {"val_images": 0}}, "train.bpd_images: 16 held-out images are scored after training, but data.holdout is 0"),
        ({"data": {"holdout": 0}, "train": {"bpd_images": 0}}, "train.val_images: 128 held-out images are scored after training, but data.holdout is 0"),
        ({"sweep": {"space": {"model.name": {"type": "categorical", "choices": ["unet-small", "dit-cpu"]}, "model.overrides.num_res_blocks": {"type": "int", "low": 1, "high": 2}}}}, "sweep.space: 'model.overrides.num_res_blocks' is not an argument of dit-cpu (a dit), a choice of model.name; allowed: depth"),
        ({"sweep": {"space": {"model.name": {"type": "categorical", "choices": ["unet-small", "dit-huge"]}}}}, "sweep.space.model.name: unknown choice 'dit-huge'"),
        ({"model": {"overrides": {"attention_resolutions": [5]}}}, "attention_resolutions: [5] are not feature-map sizes"),
        ({"sweep": {"space": {"train.lrx": {"type": "float", "low": 0.1, "high": 1}}}}, "sweep.space: 'train.lrx': unknown key 'lrx'"),
        ({"sample": {"sampler": "unipc", "schedule": "fitted"}, "sweep": {"space": {"sample.sampler": {"type": "categorical", "choices": ["unipc", "ddpm"]}}}},
         "sweep.space.sample.sampler: choice 'ddpm' with sample.schedule fitted: a fitted schedule is fitted to an ODE solver's answer"),
        ({"extra": {}}, "extra: unknown key; allowed: data, model, text, diffusion"),
        ({"diffusion": {"process": "vp", "schedule": "cosine", "prediction": "eps"}},
         "diffusion.prediction: 'eps' cannot recover x0 where α reaches 0 (process 'vp' on the cosine schedule"),
        ({"diffusion": {"process": "edm"}}, "diffusion.prediction: got 'v'; process 'edm' allows 'x0'"),
        ({"diffusion": {"process": "flow", "prediction": None}}, "diffusion.schedule: got 'cosine'; process 'flow' allows none (null)"),
        ({"diffusion": {"process": "flow", "schedule": None, "prediction": None, "sigma_data": 1.0}},
         "diffusion.sigma_data: 1.0 is EDM's σ_data; process 'flow' uses none"),
        ({"train": {"timestep_sampler": "log-normal"}}, "train.timestep_sampler: got 'log-normal'; process 'ddpm' allows 'uniform', 'loss-aware'"),
        ({"train": {"timestep_mean": 0.5}}, "train.timestep_mean: 0.5 means nothing to the uniform timestep sampler"),
        ({"train": {"loss_weighting": "min-snr"}}, "train.min_snr_gamma: got None with loss_weighting 'min-snr'"),
        ({"sample": {"sampler": "euler"}}, "sample.sampler: euler steps in the process's own time; process 'ddpm' is a discrete chain"),
        ({"sample": {"s_churn": 10.0}}, "sample.s_churn: 10.0 means nothing to ddpm; use 0.0, or a sampler that takes it: heun"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(full_params(raw), "params.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    assert expected in message


def test_a_sweep_over_the_process_validates_each_choice_or_says_what_to_set():
    """params.yaml's schedule and prediction are the ddpm chain's; a sweep over
    ``diffusion.process`` needs them null (each process's own), and one line says so."""
    processes = {"diffusion.process": {"type": "categorical", "choices": ["ddpm", "flow"]}}
    advice = ("where the sweep searches diffusion.process, set diffusion.schedule, diffusion.prediction, "
              "train.timestep_sampler, train.loss_weighting to null (each process's own) and search none of them")
    with pytest.raises(ConfigError) as err:
        parse_params(full_params({"sweep": {"space": processes}}), "params.yaml")
    assert str(err.value) == (
        "params.yaml: sweep.space.diffusion.process: process 'flow': diffusion.prediction: got 'v'; "
        f"process 'flow' allows 'velocity', 'x0'; {advice}"
    )
    per_process = {"diffusion": {"schedule": None, "prediction": None}}
    params = parse_params(full_params({**per_process, "sweep": {"space": processes}}))
    assert params.sweep.space["diffusion.process"].choices == ["ddpm", "flow"]
    for space, why in [
        ({**processes, "diffusion.schedule": {"type": "categorical", "choices": ["linear", "cosine"]}},
         "searched beside it: diffusion.schedule"),
        ({"diffusion.process": {"type": "categorical", "choices": ["ddpm", "sde"]}}, "unknown choice 'sde'"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_params(full_params({**per_process, "sweep": {"space": space}}), "params.yaml")
        assert str(err.value).startswith(f"params.yaml: sweep.space.diffusion.process: {why}") and "\n" not in str(err.value)


def test_allowed_names_are_read_from_the_code_that_implements_them():
    def names(annotation):  # Literal[...] or Literal[...] | None (null: the process's own)
        args = get_args(annotation)
        return get_args(args[0]) if type(None) in args else args

    allowed = {
        key: names(section.model_fields[key].annotation)
        for section, key in ((DiffusionParams, "schedule"), (DiffusionParams, "prediction"),
                             (DiffusionParams, "variance"), (DiffusionParams, "loss"), (SampleParams, "sampler"))
    }
    assert allowed == {
        "schedule": tuple(BETA_SCHEDULES),
        "prediction": tuple(m.value for m in Prediction),
        "variance": tuple(m.value for m in Variance),
        "loss": tuple(m.value for m in Loss),
        "sampler": tuple(sampler_specs.SAMPLER_SPECS),
    }
    assert allowed["schedule"] == ("linear", "cosine", "sigmoid") and allowed["sampler"] == ("ddpm", "ddim", "dpm++2m", "dpm++3m", "unipc", "unipc3", "ipndm", "heun", "euler", "sde")


def test_config_loads_without_torch():
    """params are validated before torch (2 s) loads: the config and its tables are torch-free."""
    code = "import sys, diffusion.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_model_overrides_that_fit_are_accepted():
    params = parse_params(full_params({"model": {"overrides": {"num_res_blocks": 1, "channel_mult": [1, 2]}}}))
    assert params.model.overrides["channel_mult"] == [1, 2]
    assert isinstance(params, Params)


def test_cli_rejects_bad_params_within_two_seconds_before_any_work(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(full_params({"train": {"batch_size": 0}})))
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "diffusion.cli", "train", "--params", str(bad)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 2
    assert out.stderr.strip() == f"diffusion train: error: {bad}: train.batch_size: Input should be greater than or equal to 1 (got 0)"
    assert elapsed < 2.0
    assert list(tmp_path.iterdir()) == [bad]  # nothing written


def test_cli_names_a_missing_dataset_file(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params({"model": {"name": "unet-tiny"}})))
    out = subprocess.run([sys.executable, "-m", "diffusion.cli", "train"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    # the lines before it, if any, are MLflow creating the fresh store that train checks first
    assert out.stderr.strip().splitlines()[-1] == (
        "diffusion train: error: data/train.npz: no such dataset file (the prepare stage writes it)"
    )


def test_unreadable_params_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_validate_stage_refuses_cuda_without_cuda(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(full_params({"sample": {"device": "cuda"}})))
    out = subprocess.run(
        [sys.executable, "-m", "diffusion.cli", "validate", "--params", str(params)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "diffusion validate: error: sample.device: 'cuda' was asked for but CUDA is not available on this machine; "
        "allowed here: 'auto', 'cpu'"
    )
    assert list(tmp_path.iterdir()) == [params]  # data/params.ok not written

    params.write_text(yaml.safe_dump(full_params({"sample": {"device": "auto"}})))
    subprocess.run([sys.executable, "-m", "diffusion.cli", "validate", "--params", str(params)], cwd=tmp_path, check=True)
    assert (tmp_path / "data" / "params.ok").read_text() == "params.yaml is valid on this machine\n"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": {"space": "latent", "name": "unet-tiny"}, "vae": {"name": "vae-tiny", "device": "cuda"},
          "train": {"hflip": False}}, "vae.device"),
        ({"guidance": {"classifier": True, "classifier_device": "cuda"}}, "guidance.classifier_device"),
    ],
)
def test_validate_checks_the_autoencoders_and_the_classifiers_device(tmp_path, monkeypatch, raw, key):
    """The stages that use them (train_vae and encode, train_classifier) are refused up front too;
    where nothing uses the device (pixel space, no classifier), it is not checked."""
    from diffusion.errors import UserError
    from diffusion.stages import validate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"^{key}: 'cuda' was asked for but CUDA is not available on this machine"):
        validate.run(parse_params(full_params(raw)))
    assert not (tmp_path / "data").exists()
    unused = {"vae.device": {"vae": {"device": "cuda"}}, "guidance.classifier_device": {"guidance": {"classifier_device": "cuda"}}}
    validate.run(parse_params(full_params(unused[key])))
    assert (tmp_path / "data" / "params.ok").is_file()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"conditioning": "none"}, "sample": {"guidance_scale": 3.0}}, "sample.guidance_scale: 3.0 guides a conditional model; set model.conditioning: class or text"),
        ({"sample": {"guidance_scale": -1.0}}, "sample.guidance_scale: Input should be greater than or equal to 0"),
        ({"model": {"conditioning": "none"}, "sample": {"guidance_scale": 1.0, "labels": [1, 2]}}, "sample.labels: labels need model.conditioning: class or guidance.classifier"),
        ({"model": {"conditioning": "class"}, "sample": {"labels": [-1]}}, "sample.labels: got [-1]; allowed: a non-empty list"),
        ({"model": {"conditioning": "class"}, "sample": {"guidance_interval": [500, 1000]}},
         "sample.guidance_interval: got [500.0, 1000.0]; allowed: [lo, hi] with 0 <= lo <= hi <= 999"),
        ({"sample": {"schedule": "cosine"}}, "sample.schedule: got 'cosine'; input should be 'linspace', 'trailing', 'log-snr', 'karras' or 'fitted'"),
        ({"sample": {"schedule": "fitted", "sampler": "ddpm"}},
         "sample.schedule: a fitted schedule is fitted to an ODE solver's answer, and ddpm with fresh noise every step draws noise; allowed: ddim, dpm++2m"),
        ({"sample": {"schedule": "fitted", "sampler": "ddim", "eta": 0.5}}, "sample.schedule: a fitted schedule is fitted to an ODE solver's answer, and ddim with eta 0.5 draws noise"),
        ({"sample": {"schedule": "fitted", "sampler": "heun", "s_churn": 40.0}}, "sample.schedule: a fitted schedule is fitted to an ODE solver's answer, and heun with s_churn draws noise"),
        ({"sample": {"schedule": "fitted", "sampler": "unipc"}, "fit_schedule": {"reference_steps": 2000}},
         "fit_schedule.reference_steps: 2000 is more than diffusion.timesteps (1000); allowed 2..1000"),
        ({"fit_schedule": {"start": "fitted"}}, "fit_schedule.start: got 'fitted'; input should be 'linspace', 'trailing', 'log-snr' or 'karras'"),
        ({"train": {"p_uncond": 1.0}}, "train.p_uncond: Input should be less than 1"),
        ({"evaluate": {"bootstrap_replicates": 10}}, "evaluate.bootstrap_replicates: Input should be greater than or equal to 20"),
        ({"evaluate": {"confidence": 1.0}}, "evaluate.confidence: Input should be less than 1"),
        ({"guidance": {"classifier_scale": -2}}, "guidance.classifier_scale: Input should be greater than or equal to 0"),
    ],
)
def test_guidance_and_schedule_params_give_one_line(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(full_params(raw))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_conditional_model_takes_guidance_an_interval_and_labels():
    params = parse_params(full_params({
        "model": {"conditioning": "class"},
        "sample": {"guidance_scale": 4.0, "guidance_interval": [100, 800], "labels": [3, 7], "schedule": "karras"},
    }))
    assert params.sample.guidance_scale == 4.0 and params.sample.guidance_interval == (100.0, 800.0)
    assert params.sample.labels == [3, 7] and params.sample.schedule == "karras"


def test_one_merge_takes_sections_and_dotted_keys():
    """merge_params is the one merge: tests' sections and a sweep trial's dotted keys alike."""
    from diffusion.config import merge_params

    base = {"train": {"lr": 0.002, "steps": 10}, "model": {"overrides": {"depth": 2}}}
    nested = merge_params(base, {"train": {"lr": 0.001}, "model": {"overrides": {"width": 3}}})
    dotted = merge_params(base, {"train.lr": 0.001, "model.overrides": {"width": 3}})
    assert nested == dotted == {"train": {"lr": 0.001, "steps": 10}, "model": {"overrides": {"width": 3}}}
    assert merge_params(base, {"model.overrides.width": 3})["model"]["overrides"] == {"depth": 2, "width": 3}
    assert merge_params(base, {"sample.steps": 5})["sample"] == {"steps": 5}
    assert base == {"train": {"lr": 0.002, "steps": 10}, "model": {"overrides": {"depth": 2}}}
    with pytest.raises(ConfigError, match="^train.lr.x: 'lr' is not a section$"):
        merge_params(base, {"train.lr.x": 1})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"reference_images": 100000}, "data.reference_images: 100000 is more than the 4984 training images; allowed 2..4984"),
        ({"holdout": 5000}, "data.holdout: 5000 leaves no training images of the 5000; allowed 0..4999"),
        ({"source": "imagefolder", "root": "folder", "holdout": 1, "reference_images": 3},
         "data.reference_images: 3 is more than the 2 training images; allowed 2..2"),
        ({"source": "fashion-mnist", "root": "idx", "holdout": 10, "reference_images": 2},
         "data.holdout: 10 leaves no training images of the 10; allowed 0..9"),
    ],
)
def test_validate_checks_the_split_against_the_sources_size(tmp_path, monkeypatch, data, expected):
    """validate refuses what prepare would (issue 28: prepare refused reference_images 100000 after
    DVC had removed data/*): the same rule (diffusion.data.sizes.check_split) on the number of
    images the source holds: mnist5k's 5000, an image folder's files, flat idx files' header."""
    from PIL import Image

    from diffusion.data.dataset import DatasetError
    from diffusion.stages import validate

    monkeypatch.chdir(tmp_path)
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + bytes(8))
    (tmp_path / "idx" / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big"))
    base = {"holdout": 16, "reference_images": 48}
    k = {"evaluate": {"prdc_k": 1}}  # a k-th neighbour among 2 reference images
    with pytest.raises(DatasetError) as err:
        validate.run(parse_params(full_params({"data": {**base, **data}, **k})))
    assert str(err.value) == expected
    assert not (tmp_path / "data").exists()
    fits = {**data, "holdout": 1, "reference_images": 2}
    validate.run(parse_params(full_params({"data": {**base, **fits}, **k})))
    assert (tmp_path / "data" / "params.ok").is_file()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"source": "mnist5k", "root": "folder"}, "data.root: source 'mnist5k' is embedded and takes no root; got 'folder', allowed null"),
        ({"source": "imagefolder", "root": None}, "data.root: source 'imagefolder' needs a folder of class sub-folders; got null"),
        ({"source": "cifar10", "root": "nowhere"}, "data.root: nowhere: no such folder"),
    ],
)
def test_validate_checks_data_root_as_prepare_does(tmp_path, monkeypatch, data, expected):
    """The root rules of prepare's sources (diffusion.data.sizes.source_root, one function for both)
    stop `dvc repro` at validate, before DVC removes data/*."""
    from diffusion.data.dataset import DatasetError
    from diffusion.stages import validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError) as err:
        validate.run(parse_params(full_params({"data": data})))
    assert str(err.value) == expected
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sample": {"labels": [3, 10]}}, "sample.labels: 10 is not a class of this model; allowed 0..9"),
        ({"data": {"source": "imagefolder", "root": "folder", "holdout": 1, "reference_images": 2},
          "evaluate": {"prdc_k": 1}, "sample": {"labels": [1]}}, "sample.labels: 1 is not a class of this model; allowed 0..0"),
        ({"data": {"source": "imagefolder", "root": "folder", "holdout": 1, "reference_images": 2},
          "evaluate": {"prdc_k": 1}, "guidance": {"classifier": True, "classifier_eval_images": 1}},
         "guidance.classifier: data.source imagefolder holds 1 class; a classifier needs 2 or more (or set guidance.classifier: false)"),
    ],
)
def test_validate_checks_labels_and_the_classifier_against_the_sources_classes(tmp_path, monkeypatch, changes, expected):
    """sample refused a label past the model's classes, train_classifier a source of one class,
    after DVC removed their outputs; validate applies the same rules (diffusion.data.sizes) to
    the source's classes: mnist5k's 10, an image folder's sub-folders."""
    from PIL import Image

    from diffusion.data.dataset import DatasetError
    from diffusion.stages import validate

    monkeypatch.chdir(tmp_path)
    for name in ("a/1.png", "a/2.png", "a/3.png"):
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name)
    with pytest.raises(DatasetError) as err:
        validate.run(parse_params(full_params(changes)))
    assert str(err.value) == expected
    assert not (tmp_path / "data").exists()


def test_validate_checks_a_pretrained_autoencoders_channels_against_the_sources(tmp_path, monkeypatch):
    """train_vae refused an RGB autoencoder for MNIST after DVC removed models/vae.pt; validate
    applies its rule (diffusion.data.sizes.check_autoencoder_channels) to the source's channels."""
    import json

    from diffusion.data.dataset import DatasetError
    from diffusion.stages import validate

    monkeypatch.chdir(tmp_path)
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "act_fn": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    latent = {"model": {"space": "latent", "name": "unet-tiny"}, "vae": {"pretrained": str(tmp_path)}}
    with pytest.raises(DatasetError) as err:
        validate.run(parse_params(full_params(latent)))
    assert str(err.value) == (
        f"vae.pretrained: {tmp_path} encodes 3-channel images, data.source mnist5k holds 1-channel ones; "
        "use an autoencoder of 1 channels"
    )
    assert not (tmp_path / "data").exists()
    (tmp_path / "config.json").write_text(json.dumps(config | {"in_channels": 1, "out_channels": 1}))
    validate.run(parse_params(full_params(latent)))
    assert (tmp_path / "data" / "params.ok").is_file()
