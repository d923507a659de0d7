"""Promotion on a real SQLite MLflow store: like-with-like FIDs, the promotion lock, the
registered model's sampling settings; and, at the end, after a real tiny pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import TINY_PARAMS, copy_repo, pipeline_env, run_in
from diffusion import registry, tracking
from diffusion.evaluation import protocol
from diffusion.stages import evaluate
from diffusion.training.checkpoint import CheckpointError, load_checkpoint
from diffusion.training.posthoc_ema import reconstruct
from diffusion.packaged import DEFAULT_SAMPLER, PackagedDiffusion
from diffusion.training.devices import precision_name, resolve_precision

SPEC = {"name": "unet-tiny", "in_channels": 1, "image_size": 8, "learn_sigma": False, "num_classes": None, "overrides": {}}
PROCESS = {"schedule": "cosine", "timesteps": 50, "prediction": "eps", "variance": "fixed_small", "loss": "mse"}
MEASURED = protocol.describe(
    num_samples=48, reference_images=48, reference_sha256="ab" * 32, inception="clean-fid clean, inception-2015-12-05",
    sampler="ddim", steps=5, schedule="linspace", eta=0.0, clip_denoised=True, threshold=None, guidance_scale=1.0,
    guidance_interval=None, precision="fp32", classifier_scale=0.0, classifier_md5=None,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with one model run (a tiny trained model, logged as the train stage logs it)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        torch.manual_seed(0)
        with tracking.stage_run("train", "diffusion", run_name="train-tiny") as run:
            tracking.log_packaged_model(PackagedDiffusion(SPEC, PROCESS))
        yield {"uri": uri, "model_run": run.info.run_id, "root": root}


def fid_run(store, fid: float, recorded: dict | None = MEASURED, *, se: float | None = None, **changes) -> str:
    """A finished sample run nested under the model run: its FID (and its bootstrap standard
    error ``se``) and the protocol it was measured under (``recorded`` with ``changes``; None:
    no protocol tags)."""
    client = MlflowClient(store["uri"])
    experiment = tracking.experiment_id("diffusion", store["uri"])
    run = client.create_run(experiment, tags={"mlflow.parentRunId": store["model_run"]})
    client.log_metric(run.info.run_id, "fid", fid)
    if se is not None:
        client.log_metric(run.info.run_id, "fid_se", se)
        client.set_tag(run.info.run_id, "fid.interval.confidence", "0.95")
    for key, value in protocol.to_tags({**recorded, **changes}).items() if recorded else ():
        client.set_tag(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_champion_moves_only_over_a_version_of_the_same_protocol(store):
    name = "like-with-like"
    first = registry.promote(name, run_id=fid_run(store, 20.0), tracking_uri=store["uri"])
    assert first.champion and first.message.endswith("there was no champion")

    other = registry.promote(name, run_id=fid_run(store, 10.0, steps=4, num_samples=16), tracking_uri=store["uri"])
    assert not other.champion
    assert other.message.endswith(
        f"champion stays v{first.version} (FID 20.000), whose FID was measured under another protocol: "
        "num_samples 16 (vs 48), steps 4 (vs 5)"
    )
    same = registry.promote(name, run_id=fid_run(store, 15.0), tracking_uri=store["uri"])
    assert same.champion and f"it beats v{first.version} (FID 20.000)" in same.message

    client = MlflowClient(store["uri"])
    champion = client.get_model_version_by_alias(name, "champion")
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert champion.version == challenger.version == same.version
    assert protocol.from_tags(champion.tags) == MEASURED
    assert champion.tags["fid.protocol.digest"] == protocol.digest(MEASURED)
    assert protocol.from_tags(client.get_model_version(name, other.version).tags)["steps"] == 4
    assert champion.tags["model_run"] == store["model_run"] and champion.tags["source_run"] == same.run_id

    # The version samples as its FID's images were drawn, while its weights are the trained model's.
    model = registry.load_model(f"models:/{name}@champion", tracking_uri=store["uri"])
    assert model.sampling == {key: MEASURED[key] for key in protocol.SAMPLING}
    assert registry.load_model(f"models:/{name}/{other.version}", tracking_uri=store["uri"]).sampling["steps"] == 4
    trained = registry.load_model(f"runs:/{store['model_run']}/model", tracking_uri=store["uri"])
    for key, weight in trained.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], weight), key
    # Promoting the same run again reuses its version.
    assert registry.promote(name, run_id=same.run_id, tracking_uri=store["uri"]).version == same.version


def test_champion_moves_only_on_an_fid_lower_beyond_the_noise(store):
    name = "beyond-the-noise"
    first = registry.promote(name, run_id=fid_run(store, 40.0, se=0.5), tracking_uri=store["uri"])
    assert first.champion
    # 0.5 lower, each +- 0.5: Phi(0.5 / (0.5 sqrt 2)) = Phi(0.7071) = 0.7602 of being lower, short of 0.95
    close = registry.promote(name, run_id=fid_run(store, 39.5, se=0.5), tracking_uri=store["uri"])
    assert not close.champion
    assert close.message.endswith(
        f"champion stays v{first.version} (FID 40.000 +- 0.500): lower by 0.500 with confidence 0.760, short of 0.95 (within the noise)"
    )
    client = MlflowClient(store["uri"])
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    assert client.get_model_version_by_alias(name, "challenger").version == close.version
    # 2.5 lower: Phi(3.536) = 0.9998
    clear = registry.promote(name, run_id=fid_run(store, 37.5, se=0.5), tracking_uri=store["uri"])
    assert clear.champion and clear.message.endswith(
        f"now champion: it beats v{first.version} (FID 40.000 +- 0.500), lower by 2.500 with confidence 1.000"
    )
    assert client.get_model_version_by_alias(name, "champion").tags["fid_se"] == "0.5"
    assert registry.improvement_confidence(37.5, 0.5, 40.0, 0.5) == pytest.approx(0.99980, abs=1e-5)


def test_the_model_a_sample_run_drew_from_is_the_one_promoted(store):
    """With sample.ema_length the sample stage logs the network it drew from into its own run,
    weights other than the trained ones: promotion registers those, and of two models one run
    logged (a sweep trial's train stage, then its sample stage) the newer; also when the run names
    a model run (a trial whose train stage came from DVC's run cache)."""
    run_id = fid_run(store, 30.0)
    MlflowClient(store["uri"]).set_tag(run_id, "train.model_run_id", store["model_run"])
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(PackagedDiffusion(SPEC, PROCESS))
        tracking.log_packaged_model(nets[-1], run_id=run_id, tracking_uri=store["uri"])
        time.sleep(0.01)  # creation times in ms: the second is the newer
    promotion = registry.promote("sampled", run_id=run_id, tracking_uri=store["uri"])
    assert promotion.model_run_id == run_id
    model = registry.load_model("models:/sampled@champion", tracking_uri=store["uri"])
    for key, weight in nets[1].net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], weight), key


def test_a_run_without_a_protocol_is_not_promoted(store):
    run_id = fid_run(store, 5.0, recorded=None)
    expected = rf"^run {run_id} records no FID protocol \(tag fid.protocol.digest\): run evaluate again$"
    with pytest.raises(registry.RegistryError, match=expected):
        registry.promote("no-protocol", run_id=run_id, tracking_uri=store["uri"])


def test_a_registry_error_is_one_line_from_the_diffusion_command(tmp_path, monkeypatch, capsys):
    """A RegistryError that reaches the ``diffusion`` command (a stage registering its model,
    say) is a UserError like every other: one line, no traceback, exit 1."""
    from conftest import full_params
    from diffusion.cli import main
    from diffusion.errors import UserError
    from diffusion.stages import validate

    def refused(params):
        raise registry.RegistryError("registered model 'autoencoder': held by another promotion; try again later")

    monkeypatch.setattr(validate, "run", refused)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params()))
    assert main(["validate"]) == 1
    assert capsys.readouterr().err == (
        "diffusion validate: error: registered model 'autoencoder': held by another promotion; try again later\n"
    )
    assert issubclass(registry.RegistryError, UserError)


def test_tracking_and_the_registry_load_no_mlflow_dvc_prefect_or_optuna_on_import():
    code = ("import sys, diffusion, diffusion.tracking, diffusion.registry; "
            "print(sorted(m for m in ('mlflow', 'dvc', 'prefect', 'optuna') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_given_store_is_used_without_setting_mlflow_s_global_uri(store, tmp_path):
    """Loading a model from a store named by URI, and a metric log's background thread,
    use a client of that store: MLflow's global URI (and ``MLFLOW_TRACKING_URI``) stay
    what they were."""
    from diffusion.tracking.metric_log import MetricLog

    elsewhere = (tmp_path / "elsewhere").as_uri()  # never contacted
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(elsewhere)
    try:
        assert registry.load_model(f"runs:/{store['model_run']}/model", tracking_uri=store["uri"]).sampling
        run_id = MlflowClient(store["uri"]).create_run(tracking.experiment_id("diffusion", store["uri"])).info.run_id
        with MetricLog(run_id, tmp_path, tracking_uri=store["uri"]) as log:
            log(1, {"loss": 0.5})
        assert log.unsent == 0 and [m.value for m in MlflowClient(store["uri"]).get_metric_history(run_id, "loss")] == [0.5]
        assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def test_a_version_is_registered_in_the_store_named_by_uri_whatever_the_global_one(store, tmp_path, monkeypatch):
    """As seen through `diffusion promote` in a fresh clone: with no MLFLOW_TRACKING_URI, MLflow's
    SQL registry looked the promoted model up in the default store (./mlflow.db) and refused it,
    'Logged model with ID ... not found'. Promotion registers in the store it is given, and MLflow's
    global URI and MLFLOW_TRACKING_URI are as they were after."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    run_id = fid_run(store, 25.0)
    result = registry.promote("given-store", run_id=run_id, tracking_uri=store["uri"])
    version = MlflowClient(store["uri"]).get_model_version_by_alias("given-store", registry.CHAMPION)
    assert result.champion and result.version == version.version and version.run_id == run_id
    assert "MLFLOW_TRACKING_URI" not in os.environ and not (tmp_path / "mlflow.db").exists()


# A promotion in its own process. It reads the champion, then sleeps (FID 20 longer than
# FID 10) before deciding: without the lock both would read "no champion", and FID 20,
# setting the alias last, would win.
PROMOTE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from diffusion import registry

    name, run_id, fid, sync = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
    read_champion = registry.champion
    def slow_champion(client, name):
        current = read_champion(client, name)
        time.sleep(2.0 if fid > 10 else 0.5)
        return current
    registry.champion = slow_champion
    (sync / f"ready-{fid:g}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
    print(registry.promote(name, run_id=run_id).message)
    """
)


def test_concurrent_promotions_end_with_the_lower_fid_as_champion(store, tmp_path):
    name = "concurrent"
    runs = {10.0: fid_run(store, 10.0), 20.0: fid_run(store, 20.0)}
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    children = [
        subprocess.Popen([sys.executable, "-c", PROMOTE, name, run_id, str(fid), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for fid, run_id in runs.items()
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{fid:g}").exists() for fid in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs

    client = MlflowClient(store["uri"])
    versions = {v.tags["source_run"]: v.version for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == set(runs.values())  # one version each
    assert client.get_model_version_by_alias(name, "champion").version == versions[runs[10.0]]
    challenger = client.get_model_version_by_alias(name, "challenger").version
    last = max(versions.values(), key=int)  # the later promotion created the later version and set challenger last
    assert challenger == last
    messages = " | ".join(out for out, _ in outputs)
    assert "there was no champion" in messages and ("does not beat" in messages or "now champion" in messages)
    assert not client.search_registered_models(f"name = '{name}{registry.LOCK_SUFFIX}'")  # released


def test_a_dead_promotions_lock_expires_and_a_live_one_is_waited_for(store):
    client = MlflowClient(store["uri"])
    lock = f"stale{registry.LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={"holder": "gone pid 1", "expires": f"{time.time() - 1:.3f}"})
    assert registry.promote("stale", run_id=fid_run(store, 30.0), tracking_uri=store["uri"]).champion
    assert not client.search_registered_models(f"name = '{lock}'")

    with registry.promotion_lock(client, "busy"):
        expected = r"^registered model 'busy': .* pid \d+ \w+ has held busy.promotion-lock for over 0.5 s; try again later$"
        with pytest.raises(registry.RegistryError, match=expected):
            with registry.promotion_lock(client, "busy", wait=0.5):
                pass
    assert not client.search_registered_models(f"name = 'busy{registry.LOCK_SUFFIX}'")

    # A holder that works longer than the lock's time to live keeps it alive.
    with registry.promotion_lock(client, "slow", ttl=0.4):
        time.sleep(1.2)
        expires = float(client.get_registered_model(f"slow{registry.LOCK_SUFFIX}").tags["expires"])
        assert expires > time.time()



# --------------------------------------------------------------------------- tampered models


class RunsOnUnpickle:
    """A pickle payload: unpickling it creates the file ``path`` (it calls ``open(path, "w")``)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def champion_model_id(client: MlflowClient, name: str) -> str:
    """The logged model that ``name``'s champion version is (the SQLite store keeps it in the source)."""
    return client.get_model_version_by_alias(name, "champion").source.removeprefix("models:/")


def artifact_folder(client: MlflowClient, model_id: str) -> Path:
    """The local folder of a logged model's files: what a writer of the artifact store can change."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(client.get_logged_model(model_id).artifact_location))


def pickled_pytorch_flavour(folder: Path, payload: Path) -> None:
    """Make ``folder`` an MLflow pytorch-flavour model (serialization_format pickle) whose
    pickle is ``RunsOnUnpickle(payload)``: what the train stage logged before, doctored."""
    (folder / "data").mkdir(exist_ok=True)
    torch.save(RunsOnUnpickle(payload), folder / "data" / "model.pth")
    (folder / "data" / "pickle_module_info.txt").write_text("pickle")
    flavour = {"pytorch": {"model_data": "data", "pytorch_version": str(torch.__version__), "serialization_format": "pickle"}}
    (folder / "MLmodel").write_text(yaml.safe_dump({"artifact_path": "model", "flavors": flavour}))


def legacy_model(store, name: str, trained: PackagedDiffusion, payload: Path) -> None:
    """A version of ``name`` as models were logged before: the pytorch flavour's pickle (here
    the payload) with the weights-only file beside it in ``extra_files/model.pt``; champion."""
    import tempfile

    client = MlflowClient(store["uri"])
    experiment = tracking.experiment_id("diffusion", store["uri"])
    model = client.create_logged_model(experiment, name="promoted", source_run_id=store["model_run"])
    with tempfile.TemporaryDirectory() as tmp:
        pickled_pytorch_flavour(Path(tmp), payload)
        trained.save(Path(tmp) / tracking.LEGACY_MODEL_FILE)
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"models:/{model.model_id}", run_id=store["model_run"], model_id=model.model_id)
    client.set_registered_model_alias(name, "champion", version.version)


@pytest.mark.parametrize("layout", ["data-only", "pytorch flavour (before)"])
def test_a_model_whose_pickle_was_replaced_loads_without_running_it(store, tmp_path, layout):
    """As logged before, every machine that loaded ``models:/...`` with ``mlflow.pytorch.load_model``
    unpickled the model's ``data/model.pth``: whoever could write the artifact store ran
    code there. Here a store writer replaces the pickle with one that creates a marker file.
    MLflow's loader runs it; :func:`registry.load_model` reads only the weights-only file."""
    name, marker = f"tampered-{layout.split()[0]}", tmp_path / "marker"
    client = MlflowClient(store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    trained = registry.load_model(f"runs:/{store['model_run']}/model", tracking_uri=store["uri"])
    if layout == "data-only":
        registry.promote(name, run_id=fid_run(store, 20.0), tracking_uri=store["uri"])
        model_id = champion_model_id(client, name)
        folder = artifact_folder(client, model_id)
        assert {p.name for p in folder.iterdir()} == {"MLmodel", tracking.MODEL_FILE}  # no pickle, no code
        with pytest.raises(MlflowException, match="does not have the \"pytorch\" flavor"):
            mlflow.pytorch.load_model(f"models:/{name}@champion")  # nothing for MLflow's loader to run
        pickled_pytorch_flavour(folder, marker)  # the store writer's doing
    else:
        legacy_model(store, name, trained, marker)

    with pytest.raises(Exception):  # the payload is no model, but it ran
        mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert marker.exists(), "the payload does not run: this test would prove nothing"
    marker.unlink()

    model = registry.load_model(f"models:/{name}@champion", tracking_uri=store["uri"])
    assert not marker.exists()
    for key, weight in trained.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], weight), key
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert model(noise).shape == (1, 1, 8, 8) and not marker.exists()


def test_a_weights_file_that_would_run_code_is_refused_in_one_line(store, tmp_path):
    """A store writer replaces ``model.pt`` itself with a file that carries a pickle payload:
    the sha256 tagged on the model (in the tracking store) refuses it; a writer of the
    tracking store too (or a model logged before the tag) meets weights-only loading,
    which refuses the payload without running it."""
    name, marker = "tampered-weights", tmp_path / "marker"
    registry.promote(name, run_id=fid_run(store, 20.0), tracking_uri=store["uri"])
    client = MlflowClient(store["uri"])
    model_id = champion_model_id(client, name)
    weights = artifact_folder(client, model_id) / tracking.MODEL_FILE
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "sampling": RunsOnUnpickle(marker)}, weights)
    uri = client.get_logged_model(model_id).artifact_location + "/" + tracking.MODEL_FILE

    digest = rf"^{re.escape(uri)}: refused: its sha256 [0-9a-f]{{64}} is not the [0-9a-f]{{64}} tagged on model {model_id} when it was logged \(the file was replaced since\)$"
    with pytest.raises(CheckpointError, match=digest):
        registry.load_model(f"models:/{name}@champion", tracking_uri=store["uri"])
    client.delete_logged_model_tag(model_id, tracking.WEIGHTS_SHA256_TAG)
    refused = r": refused: not a weights-only file \(its pickle calls io\.open, which would run code; nothing of it ran\)$"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(uri)}{refused}"):
        registry.load_model(f"models:/{name}@champion", tracking_uri=store["uri"])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(weights))}{refused}"):  # models/model.pt is read the same way
        PackagedDiffusion.load(weights)
    assert not marker.exists()


def test_a_logged_model_whose_weights_were_deleted_names_the_missing_file(store, tmp_path):
    """``model.pt`` deleted from the artifact store was blamed on the model's origin ("it was
    not logged by this project"); the weights' sha256 tag says it was: the file is missing."""
    name = "deleted-weights"
    registry.promote(name, run_id=fid_run(store, 20.0), tracking_uri=store["uri"])
    client = MlflowClient(store["uri"])
    model_id = champion_model_id(client, name)
    (artifact_folder(client, model_id) / tracking.MODEL_FILE).unlink()
    location = client.get_logged_model(model_id).artifact_location
    missing = (rf"^models:/{name}@champion: {re.escape(location)}/model\.pt is missing: model {model_id} was logged "
               r"with it by this project, and the file was deleted from the artifact store since$")
    with pytest.raises(registry.RegistryError, match=missing):
        registry.load_model(f"models:/{name}@champion", tracking_uri=store["uri"])

    # A model that another program logged, with no weights-only file ever: its origin is the reason.
    experiment = tracking.experiment_id("diffusion", store["uri"])
    foreign = client.create_logged_model(experiment, name="foreign", source_run_id=store["model_run"])
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"artifact_path": "model", "flavors": {}}))
    client.log_model_artifacts(foreign.model_id, str(tmp_path))
    client.finalize_logged_model(foreign.model_id, "READY")
    with pytest.raises(registry.RegistryError, match=rf"has no weights-only model\.pt: it was not logged by this project$"):
        registry.load_model(f"models:/{foreign.model_id}", tracking_uri=store["uri"])


def test_a_run_whose_fid_is_infinite_is_no_candidate(store):
    """MLflow stores ``fid = inf`` as 1.797e308, which is finite: such a run was registered
    and its FID printed with 309 digits. It is no candidate, named or chosen."""
    client = MlflowClient(store["uri"])
    infinite = fid_run(store, float("inf"))
    assert client.get_run(infinite).data.metrics["fid"] > 1e308  # the stand-in, not inf
    with pytest.raises(registry.RegistryError, match=rf"^run {infinite} has no finite 'fid' metric \(.*\): run evaluate first$"):
        registry.promote("infinite", run_id=infinite, tracking_uri=store["uri"])

    client.set_tag(infinite, "sweep.study", "all-infinite")
    expected = (r"^no candidate in sweep 'all-infinite': its 1 finished run\(s\) with a 'fid' metric record none that "
                r"is finite \(inf or NaN is a failed measurement\): run evaluate again$")
    with pytest.raises(registry.RegistryError, match=expected):
        registry.promote("infinite", study="all-infinite", tracking_uri=store["uri"])
    finite = fid_run(store, 30.0)
    client.set_tag(finite, "sweep.study", "all-infinite")
    promoted = registry.promote("infinite", study="all-infinite", tracking_uri=store["uri"])
    assert promoted.run_id == finite and "(FID 30.000," in promoted.message


@pytest.mark.integration
def test_the_champion_of_a_real_pipeline_samples_with_its_fids_settings(tmp_path, prepared_repo):
    """dvc repro of the tiny pipeline, then promote: the FID's protocol is recorded and the
    registered model samples with the sample params behind that FID. The network is a
    transformer, latent DiffiT (the registry holds any family; tests/test_transformers.py
    runs the other two through the pipeline), on the flow-matching process (train, sample with
    euler, evaluate, promote: the pipeline's run on a continuous process), whose MLflow run,
    protocol and registered model record it; and on a schedule fitted to it (fit_schedule),
    whose times the samples, the protocol and the champion carry; from the EMA of length 0.1
    reconstructed after training (sample.ema_length), whose weights the champion holds. No
    bits/dim: that is the ODE's, slow at 28 px."""
    sample = {
        **TINY_PARAMS["sample"], "eta": 0.0, "clip_denoised": False, "sampler": "euler", "schedule": "fitted", "ema_length": 0.1,
    }
    flow = {**TINY_PARAMS["diffusion"], "process": "flow", "schedule": None, "prediction": None}
    repo = copy_repo(prepared_repo, tmp_path / "repo", {
        **TINY_PARAMS, "sample": sample, "model": {"name": "latent-diffit-tiny"}, "diffusion": flow,
        "train": {**TINY_PARAMS["train"], "bpd_images": 0},
        "fit_schedule": {"calibration_images": 2, "reference_steps": 6, "max_solves": 6},
    })
    run_in(repo, "dvc", "repro")
    fit = json.loads((repo / "models/schedule.json").read_text())
    assert (fit["schedule"], fit["sampler"], fit["steps"], fit["process"]) == ("fitted", "euler", sample["steps"], "flow")
    assert fit["distance"] <= fit["start_distance"] and fit["solves"] <= 6 and len(fit["timesteps"]) == sample["steps"]
    uri = pipeline_env(repo)["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    sample_run = client.get_run(json.loads((repo / "samples/run.json").read_text())["run_id"])
    model_run = client.get_run(json.loads((repo / "models/run.json").read_text())["run_id"])

    # The protocol: in metrics/protocol.json, on the sample run, mirrored onto the model run.
    manifest = json.loads((repo / "data/manifest.json").read_text())
    recorded = json.loads((repo / "metrics/protocol.json").read_text())
    assert recorded == {
        "num_samples": sample["num_samples"], "reference_images": TINY_PARAMS["data"]["reference_images"],
        "reference_sha256": manifest["sha256"]["reference"], "inception": "clean-fid clean, inception-2015-12-05",
        "sampler": "euler", "steps": sample["steps"], "eta": 0.0, "clip_denoised": False, "threshold": None,
        "schedule": "fitted", "timesteps": fit["timesteps"], "guidance_scale": 2.0, "guidance_interval": None,
        "precision": precision_name(resolve_precision("auto", torch.device("cpu"))),  # what sample.precision auto ran
        "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0,
        "classifier_scale": 0.0, "classifier_md5": None,  # no classifier guided
        "process": "flow",
        "prompts_sha256": None,  # a class-conditional model: no prompts
        "digest": recorded["digest"],
        "interval": {"method": evaluate.INTERVAL_METHOD, "replicates": 20, "confidence": 0.95},  # how fid_low/high were computed
        "digits": {"classifier_md5": tracking.file_md5(repo / "models/digit_classifier.pt"),  # the text metrics' classifier
                   "heldout_accuracy": recorded["digits"]["heldout_accuracy"]},
    }
    assert model_run.data.params["diffusion.process"] == "flow" and sample_run.data.tags["fid.protocol.process"] == "flow"
    assert protocol.from_tags(sample_run.data.tags) == {k: v for k, v in recorded.items() if k not in ("digest", "interval", "digits")}
    assert sample_run.data.tags["fid.protocol.digest"] == recorded["digest"] == model_run.data.tags["fid.protocol.digest"]

    result = run_in(repo, "diffusion", "promote", "--run-id", sample_run.info.run_id)
    assert "challenger and champion" in result.stdout
    model = registry.load_model("models:/diffusion@champion", tracking_uri=uri)
    assert type(model.net).__name__ == "LatentDiffiT" and model.model_spec["name"] == "latent-diffit-tiny"
    assert model.process["process"] == model.diffusion.process.name == "flow"  # it samples on its own process
    reconstructed = reconstruct(load_checkpoint(repo / "models/ema_snapshots.pt")["snapshots"], 0.1)
    torch.testing.assert_close(model.net.state_dict(), reconstructed)  # the weights the FID measured
    trained = PackagedDiffusion.load(repo / "models/model.pt").net.state_dict()  # the EMA of train.ema_decay
    assert any(not torch.equal(reconstructed[key], weight) for key, weight in trained.items())
    params = sample_run.data.params
    expected = {
        "sampler": params["sample.sampler"], "steps": int(params["sample.steps"]), "eta": float(params["sample.eta"]),
        "clip_denoised": params["sample.clip_denoised"] == "True", "threshold": None, "schedule": params["sample.schedule"],
        "timesteps": fit["timesteps"], "guidance_scale": float(params["sample.guidance_scale"]), "guidance_interval": None,
        "precision": recorded["precision"], "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0,
    }
    assert params["sample.threshold"] == "None" and params["sample.guidance_interval"] == "None"
    assert model.sampling == expected  # the classifier's fields are the protocol's, not the model's
    assert expected == {
        "sampler": "euler", "steps": sample["steps"], "eta": 0.0, "clip_denoised": False, "threshold": None,
        "schedule": "fitted", "timesteps": fit["timesteps"], "guidance_scale": 2.0, "guidance_interval": None,
        "precision": recorded["precision"], "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0,
    }
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])  # forward's balanced labels for two images

    def seeded(draw):  # ddpm draws fresh noise each step: the same global seed for both calls
        torch.manual_seed(1)
        return draw()

    images = seeded(lambda: model(noise))
    assert torch.equal(images, seeded(lambda: model.sample(2, noise=noise, labels=labels, **expected)))
    assert not torch.equal(images, seeded(lambda: model.sample(2, noise=noise, labels=labels, **DEFAULT_SAMPLER)))
