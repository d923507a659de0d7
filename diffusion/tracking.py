"""The one place that talks to MLflow.

Runs follow DVC's data lineage (README, "Tracking"):

- ``train`` opens a run (the *model run*): params of data/model/diffusion/train,
  the dataset, per-step metrics, system metrics, the model. Its id is written to
  ``models/run.json``, a DVC output, so a stage restored from DVC's run cache brings
  back the id of the run that really trained it and creates no duplicate run.
- ``sample`` opens a run nested under the model run: sample/evaluate params, the
  grid. ``evaluate`` logs FID/KID into that run and mirrors them onto its parent.
- An orchestrator (a Prefect flow, a sweep trial) that owns a run sets
  ``MLFLOW_RUN_ID``; every stage then logs into that run instead, and tags it with
  the model run it used.

The default store is SQLite in ``mlflow/`` at the repository root (database and
artifacts, git-ignored); ``MLFLOW_TRACKING_URI`` points elsewhere (a server).

The experiment carries a saved runs-table view, ``FID`` (:func:`runs_view`): the
runs sorted by FID, with FID, KID and the final loss as columns. MLflow's UI (3.17)
lists it under Runs -> Views and opens it from a link with
``?viewStateShareKey=fid``. No experiment tag or setting makes the UI open an
experiment on its runs: 3.17 shows GenAI (traces) or model training (runs) by its
sidebar toggle, kept per browser (README, "The MLflow UI").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# System metrics (CPU, memory, GPU) every 5 s, each sample logged at once, so short
# stages show them too; either can be overridden by the environment.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")

RUN_ID_ENV = "MLFLOW_RUN_ID"
STORE_DIR = "mlflow"
# The saved view of the runs table: the UI keeps each as an experiment tag
# mlflow.sharedViewState.<id> (its js bundle: saved views, share keys).
RUNS_VIEW_ID = "fid"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
RUNS_VIEW_METRICS = ("fid", "kid", "final_loss")


def repo_root() -> Path:
    """The repository root: DVC's, else git's, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def default_tracking_uri(root: Path | None = None) -> str:
    store = (root or repo_root()) / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _mlflow():
    """mlflow, pointed at ``MLFLOW_TRACKING_URI`` or the repository's store (the environment
    wins over an earlier ``mlflow.set_tracking_uri`` in the same process)."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    return mlflow


def runs_view() -> str:
    """The ``FID`` view of the runs table as the MLflow UI saves a view: a JSON envelope
    (name, createdAt in ms, state) whose state is the JSON of the table's sort and columns."""
    state = {
        "orderByKey": "metrics.`fid`",
        "orderByAsc": True,
        "selectedColumns": [f"metrics.`{metric}`" for metric in RUNS_VIEW_METRICS],
    }
    return json.dumps({"name": "FID", "createdAt": int(time.time() * 1000), "state": json.dumps(state)})


def experiment_id(name: str, tracking_uri: str | None = None) -> str:
    """The experiment (of the store at ``tracking_uri``, default the active one), created
    with its artifacts beside a local SQLite store; it has the ``FID`` runs view (one
    created before that gets it)."""
    mlflow = _mlflow()
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if RUNS_VIEW_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, runs_view())
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={RUNS_VIEW_TAG: runs_view()})


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``; lists and dicts as JSON."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return flat


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_lock_hashes(root: Path | None = None) -> dict[str, str]:
    """``dvc.lock`` as tags: ``dvc.<stage>.<path>`` -> md5 of every dep and out recorded so far."""
    lock = (root or repo_root()) / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    tags = {}
    for stage, entry in (data.get("stages") or {}).items():
        for item in (entry.get("deps") or []) + (entry.get("outs") or []):
            if "md5" in item:
                tags[f"dvc.{stage}.{item['path']}"] = item["md5"]
    return tags


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes: the hash DVC records for a file output."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_run_id(path: str | Path) -> str | None:
    path = Path(path)
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def write_run_id(path: str | Path, run_id: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    run_name: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Open the MLflow run a stage logs into (see the module docstring).

    The orchestrator's run (``MLFLOW_RUN_ID``) wins; then ``resume_run_id`` (a
    stage resumed after a kill continues its run); else a new run, nested under
    ``parent_run_id`` when given. The run is tagged with the stage, the git commit
    and the dvc.lock hashes. On an exception the run ends FAILED.
    """
    mlflow = _mlflow()
    owned_id = os.environ.get(RUN_ID_ENV)
    if resume_run_id and not owned_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
    elif owned_id:
        run = mlflow.start_run(run_id=owned_id, log_system_metrics=system_metrics)
        if parent_run_id and parent_run_id != owned_id:
            mlflow.set_tag(f"{stage}.model_run_id", parent_run_id)
    else:
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        run = mlflow.start_run(
            experiment_id=experiment_id(experiment),
            run_name=run_name,
            tags=tags,
            log_system_metrics=system_metrics,
        )
    commit = git_commit()
    tags = {f"stage.{stage}": "ran", **dvc_lock_hashes()}
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    mlflow.set_tags(tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run("FAILED" if not owned_id else "RUNNING")
        raise
    else:
        # An orchestrator's run stays open for the orchestrator to end.
        mlflow.end_run("FINISHED" if not owned_id else "RUNNING")


def log_params(params: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log a (nested) params mapping flattened, in batches MLflow accepts."""
    mlflow = _mlflow()
    flat = flatten(params)
    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log metrics to the active run, or to ``run_id`` (a parent mirrored from a child)."""
    mlflow = _mlflow()
    if run_id is None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        return
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step or 0)


def set_tags(tags: Mapping[str, str], run_id: str | None = None) -> None:
    """Set tags on the active run, or on ``run_id``."""
    mlflow = _mlflow()
    if run_id is None:
        mlflow.set_tags(dict(tags))
        return
    from mlflow.entities import RunTag

    mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_dataset(path: str | Path, *, name: str, source: str, images, labels, context: str = "training") -> None:
    """The dataset as an MLflow dataset: its DVC hash (md5 of the file) as digest, its source."""
    mlflow = _mlflow()
    import numpy as np

    digest = file_md5(path)
    ds = mlflow.data.from_numpy(
        np.asarray(images).reshape(len(images), -1),
        targets=np.asarray(labels),
        source=source,
        name=name,
        digest=digest[:36],
    )
    mlflow.log_input(ds, context=context, tags={"dvc_md5": digest, "path": str(path)})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path)


def log_dict(data: dict, artifact_file: str) -> None:
    _mlflow().log_dict(data, artifact_file)


def log_image(image, artifact_file: str) -> None:
    _mlflow().log_image(image, artifact_file)


def active_run_id() -> str:
    return _mlflow().active_run().info.run_id


@contextlib.contextmanager
def _store(tracking_uri: str | None) -> Iterator[Any]:
    """``mlflow`` pointed at ``tracking_uri`` for the block (default: the active store), then back."""
    mlflow = _mlflow()
    previous = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


# A logged model (log_packaged_model): its weights-only file, the tag of that file's sha256, its flavour.
MODEL_FILE = "model.pt"
LEGACY_MODEL_FILE = "extra_files/model.pt"  # where models logged with the pytorch flavour's pickle kept it
WEIGHTS_SHA256_TAG = "diffusion.weights.sha256"
FLAVOR = "diffusion"


def log_packaged_model(packaged, name: str = "model", *, run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Log a :class:`~diffusion.packaged.PackagedDiffusion` as an MLflow model of data only,
    an output of ``run_id`` (default: the active run) in its experiment; returns the model id.

    Its files are ``model.pt``, the file of :meth:`~diffusion.packaged.PackagedDiffusion.save`
    (weights, configs and sampling; read with ``torch.load(weights_only=True)``), and
    ``MLmodel``, whose ``diffusion`` flavour lists them with the configs and the
    signature (x_T float32 [N, C, H, W] -> samples in [-1, 1]) for the UI. No pickle,
    no code, no ``python_function`` or ``pytorch`` flavour: MLflow's loaders have nothing
    to run, and :func:`diffusion.registry.load_model` rebuilds the model with the
    installed ``diffusion`` package. The sha256 of ``model.pt`` is a tag of the model in
    the tracking store, which :func:`load_packaged_model` checks.
    """
    import tempfile
    from types import SimpleNamespace

    from mlflow.models import Model

    with _store(tracking_uri) as mlflow, tempfile.TemporaryDirectory() as tmp:
        weights = packaged.save(Path(tmp) / MODEL_FILE)
        run = mlflow.MlflowClient().get_run(run_id or mlflow.active_run().info.run_id)
        model = mlflow.initialize_logged_model(
            name=name,
            source_run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            params=run.data.params,
            tags={WEIGHTS_SHA256_TAG: _file_sha256(weights)},
            model_type=FLAVOR,
        )
        Model.log(
            None,
            SimpleNamespace(save_model=_save_data_only_model),
            name=name,
            run_id=run.info.run_id,
            model_id=model.model_id,
            packaged=packaged,
            weights=weights,
        )
    return model.model_id


def _save_data_only_model(path: str, mlflow_model: Any, *, packaged, weights: Path) -> None:
    """What ``mlflow.models.Model.log`` calls to write a model's folder: ``model.pt`` and ``MLmodel``."""
    import shutil

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import diffusion

    Path(path).mkdir(parents=True)
    shutil.copyfile(weights, Path(path) / MODEL_FILE)
    images = Schema([TensorSpec(np.dtype(np.float32), (-1, *packaged.image_shape))])
    mlflow_model.signature = ModelSignature(inputs=images, outputs=images)
    mlflow_model.add_flavor(
        FLAVOR,
        weights=MODEL_FILE,
        format="torch.save of tensors and plain data; read with torch.load(weights_only=True)",
        loader="diffusion.registry.load_model",
        diffusion_version=diffusion.__version__,
        **json.loads(json.dumps({"model_spec": packaged.model_spec, "process": packaged.process, "sampling": packaged.sampling})),
    )
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_packaged_model(model_id: str, *, tracking_uri: str | None = None):
    """The :class:`~diffusion.packaged.PackagedDiffusion` of logged model ``model_id``, from
    its weights-only ``model.pt`` alone (``extra_files/model.pt`` in a model logged with
    the pickle of the pytorch flavour, which is never read); None when it has neither.

    Nothing else is downloaded and nothing is unpickled: a file that would run code is a
    one-line :class:`~diffusion.checkpoint.CheckpointError`, and so is a ``model.pt``
    whose sha256 differs from the one tagged on the model when it was logged.
    """
    import tempfile

    from diffusion.checkpoint import CheckpointError
    from diffusion.packaged import PackagedDiffusion

    with _store(tracking_uri) as mlflow, tempfile.TemporaryDirectory() as tmp:
        logged = mlflow.get_logged_model(model_id)
        for relative in (MODEL_FILE, LEGACY_MODEL_FILE):
            uri = f"{logged.artifact_location}/{relative}"
            folder, _, file = uri.rpartition("/")
            if file in {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=folder)}:
                break
        else:
            return None
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        recorded, digest = logged.tags.get(WEIGHTS_SHA256_TAG), _file_sha256(local)
        if recorded and digest != recorded:
            raise CheckpointError(
                f"{uri}: refused: its sha256 {digest} is not the {recorded} tagged on "
                f"model {model_id} when it was logged (the file was replaced since)"
            )
        try:
            return PackagedDiffusion.load(local)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(str(local), uri)) from None


def mirror_to_parent(metrics: Mapping[str, float], tags: Mapping[str, str] | None = None) -> None:
    """Copy metrics (and the tags that go with them, an FID's protocol) of a nested
    (sample) run onto its parent (model) run.

    Not under an orchestrator: there the parent is a sweep, not the model run.
    """
    if os.environ.get(RUN_ID_ENV):
        return
    mlflow = _mlflow()
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        log_metrics(metrics, run_id=parent)
        if tags:
            set_tags(tags, run_id=parent)
