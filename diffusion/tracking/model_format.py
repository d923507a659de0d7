"""The data-only MLflow model: how a trained model is logged to the store and read back.

A logged model's files are ``model.pt``, the file of
:meth:`~diffusion.packaged.PackagedDiffusion.save` (weights, configs and sampling; read with
``torch.load(weights_only=True)``), and ``MLmodel``, whose ``diffusion`` flavour lists them
with the configs and the signature for the UI. No pickle, no code, no ``python_function``
or ``pytorch`` flavour: MLflow's loaders have nothing to run, and
:func:`diffusion.registry.load_model` rebuilds the model with the installed ``diffusion``
package. The sha256 of ``model.pt`` is a tag of the model in the tracking store, which
:func:`load_packaged_model` checks.

Every call goes through a client of the store it is given (default
:func:`~diffusion.tracking.store.tracking_uri`): MLflow's global URI is never set here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion.files import file_digest
from diffusion.tracking.store import load_mlflow, mlflow_client

MODEL_FILE = "model.pt"  # the weights-only file of a logged model
LEGACY_MODEL_FILE = "extra_files/model.pt"  # where models logged with the pytorch flavour's pickle kept it
WEIGHTS_SHA256_TAG = "diffusion.weights.sha256"  # the model's tag of that file's sha256
FLAVOR = "diffusion"


def log_packaged_model(packaged, name: str = "model", *, run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Log a :class:`~diffusion.packaged.PackagedDiffusion` as an MLflow model of data only,
    an output of ``run_id`` (default: the active run) in its experiment; returns the model id.
    Its ``MLmodel`` signature: x_T float32 [N, C, H, W] -> samples in [-1, 1], decoded for a
    latent model."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights = packaged.save(Path(tmp) / MODEL_FILE)
        configs = {"model_spec": packaged.model_spec, "process": packaged.process, "sampling": packaged.sampling}
        if packaged.autoencoder_spec is not None:
            configs["autoencoder"] = packaged.autoencoder_spec
        return _log_data_model(
            weights, name, packaged.image_shape, packaged.output_shape, configs,
            loader="diffusion.registry.load_model", run_id=run_id, tracking_uri=tracking_uri,
        )


def log_autoencoder(weights: str | Path, config: Mapping[str, Any], image_shape: tuple[int, ...], latent_shape: tuple[int, ...],
                    name: str = "autoencoder") -> str:
    """Log ``models/vae.pt`` (:func:`diffusion.packaged.save_autoencoder`) into the active run
    as a data-only MLflow model (images [N, C, H, W] -> latents), as :func:`log_packaged_model`
    does the diffusion model; returns the model id."""
    return _log_data_model(
        Path(weights), name, image_shape, latent_shape, {"config": dict(config)},
        loader="diffusion.packaged.load_autoencoder",
    )


def _log_data_model(
    weights: Path, name: str, input_shape: tuple[int, ...], output_shape: tuple[int, ...], configs: Mapping[str, Any], *,
    loader: str, run_id: str | None = None, tracking_uri: str | None = None,
) -> str:
    """Log the weights file ``weights`` as MLflow model ``name`` of the run, as
    ``mlflow.models.Model.log`` does (a logged model with the run's params, an output of the
    run, the run's step-0 metrics linked to it, READY once its files are up): ``model.pt``
    and an ``MLmodel`` whose ``diffusion`` flavour names the loader and the configs."""
    import tempfile

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from mlflow.tracking.context.registry import resolve_tags

    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id or load_mlflow().active_run().info.run_id)
    run_id = run.info.run_id
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags=resolve_tags({WEIGHTS_SHA256_TAG: file_digest(weights)}),
        params=run.data.params,
        model_type=FLAVOR,
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        final = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, dataset_name=m.dataset_name,
                   dataset_digest=m.dataset_digest, run_id=run_id)
            for key in run.data.metrics
            for m in client.get_metric_history(run_id, key)
            if m.step == 0 and m.model_id is None
        ]
        if final:
            client.log_batch(run_id, metrics=final)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            described = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                              model_id=model.model_id)
            _save_data_only_model(folder, described, weights=weights, shapes=(input_shape, output_shape),
                                  configs=configs, loader=loader)
            client.log_model_artifacts(model.model_id, str(folder))
    except Exception:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _save_data_only_model(
    path: Path, mlflow_model: Any, *, weights: Path, shapes: tuple[tuple[int, ...], tuple[int, ...]],
    configs: Mapping[str, Any], loader: str,
) -> None:
    """Write a model's folder: ``model.pt`` and ``MLmodel``."""
    import shutil

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import diffusion

    path.mkdir(parents=True)
    shutil.copyfile(weights, path / MODEL_FILE)
    inputs, outputs = (Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]) for shape in shapes)
    mlflow_model.signature = ModelSignature(inputs=inputs, outputs=outputs)
    mlflow_model.add_flavor(
        FLAVOR,
        weights=MODEL_FILE,
        format="torch.save of tensors and plain data; read with torch.load(weights_only=True)",
        loader=loader,
        diffusion_version=diffusion.__version__,
        **json.loads(json.dumps(configs)),
    )
    mlflow_model.save(str(path / "MLmodel"))


def load_packaged_model(model_id: str, *, tracking_uri: str | None = None):
    """The :class:`~diffusion.packaged.PackagedDiffusion` of logged model ``model_id``, from
    its weights-only ``model.pt`` alone (``extra_files/model.pt`` in a model logged with
    the pickle of the pytorch flavour, which is never read); None when it has neither.

    Nothing else is downloaded and nothing is unpickled: a file that would run code is a
    one-line :class:`~diffusion.training.checkpoint.CheckpointError`, and so is a ``model.pt``
    whose sha256 differs from the one tagged on the model when it was logged.
    """
    import tempfile

    from diffusion.packaged import PackagedDiffusion
    from diffusion.training.checkpoint import CheckpointError

    artifacts = load_mlflow().artifacts
    client = mlflow_client(tracking_uri)
    store = client.tracking_uri
    logged = client.get_logged_model(model_id)
    for relative in (MODEL_FILE, LEGACY_MODEL_FILE):
        uri = f"{logged.artifact_location}/{relative}"
        folder, _, file = uri.rpartition("/")
        if file in {Path(a.path).name for a in artifacts.list_artifacts(artifact_uri=folder, tracking_uri=store)}:
            break
    else:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=store)
        recorded, digest = logged.tags.get(WEIGHTS_SHA256_TAG), file_digest(local)
        if recorded and digest != recorded:
            raise CheckpointError(
                f"{uri}: refused: its sha256 {digest} is not the {recorded} tagged on "
                f"model {model_id} when it was logged (the file was replaced since)"
            )
        try:
            return PackagedDiffusion.load(local)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(str(local), uri)) from None
