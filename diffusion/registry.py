"""The one module that talks to the MLflow model registry: promotion by alias.

:func:`promote` registers a run's model as a new version of a registered model,
tagged with its FID and the runs it came from, and points the ``challenger`` alias
at it. ``champion`` moves to it only if its FID is lower than the current
champion's; the message says which happened. Registry stages are deprecated in
MLflow 3: aliases are all this module uses, and ``models:/<name>@champion`` loads
with ``mlflow.pytorch.load_model`` and samples.

Which run holds the model (the train stage logs it at artifact path ``model``,
:func:`diffusion.tracking.log_packaged_model`):

- the run that trained it: a model run, or a sweep trial whose train stage ran;
- a sweep trial whose train stage came from DVC's run cache names it in its tag
  ``train.model_run_id`` (or ``sample.model_run_id``, set by the sample stage);
- a sample run is nested under it.

MLflow is imported inside the functions: ``import diffusion.registry`` stays light.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC = "fid"
MODEL_NAME = "model"  # the train stage's log_model name
# Tags that point from a run to the run holding its model, in the order they are trusted.
MODEL_RUN_TAGS = ("train.model_run_id", "sample.model_run_id", "mlflow.parentRunId")
# The source run's params that produced its FID, copied onto the version.
SAMPLE_PARAMS = ("sample.sampler", "sample.steps", "sample.eta", "sample.num_samples")


class RegistryError(RuntimeError):
    """No run, metric or model to promote; the message is one line."""


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    fid: float
    run_id: str  # the run whose FID this is
    model_run_id: str  # the run that holds the model
    champion: bool  # does ``champion`` point at this version now
    previous_champion: str | None  # the version that was champion before, if any
    previous_fid: float | None
    message: str


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    if not tracking_uri:
        from diffusion.tracking import default_tracking_uri

        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def best_run(client: Any, experiment: str, study: str | None = None) -> Any:
    """The finished run of ``experiment`` with the lowest FID; with ``study``, among that sweep's trials."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RegistryError(f"no MLflow experiment '{experiment}' at {client.tracking_uri}")
    query = f"attributes.status = 'FINISHED' and metrics.{METRIC} >= 0"
    if study:
        query += f" and tags.`sweep.study` = '{study}'"
    runs = client.search_runs([exp.experiment_id], query, order_by=[f"metrics.{METRIC} ASC"], max_results=100)
    runs = [r for r in runs if math.isfinite(r.data.metrics.get(METRIC, math.nan))]
    if not runs:
        scope = f"sweep '{study}'" if study else f"experiment '{experiment}'"
        raise RegistryError(f"no finished run with a '{METRIC}' metric in {scope}: run evaluate (or a sweep) first")
    return runs[0]


def _logged_model_id(client: Any, run_id: str) -> str | None:
    """The id of the model the run logged as ``model``, if it logged one."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        if client.get_logged_model(output.model_id).name == MODEL_NAME:
            return output.model_id
    return None


def find_model(client: Any, run: Any) -> tuple[str, str]:
    """(model run id, logged model id) for ``run``: its own model or the one its tags point at."""
    candidates = [run.data.tags.get(MODEL_RUN_TAGS[0]), run.info.run_id]
    candidates += [run.data.tags.get(tag) for tag in MODEL_RUN_TAGS[1:]]
    for run_id in dict.fromkeys(c for c in candidates if c):
        model_id = _logged_model_id(client, run_id)
        if model_id:
            return run_id, model_id
    raise RegistryError(
        f"run {run.info.run_id} has no logged '{MODEL_NAME}' and names no run that has one "
        "(train with tracking.log_model: true)"
    )


def _version_for(client: Any, name: str, run_id: str, model_id: str, tags: dict[str, str]) -> Any:
    """The version registered from ``run_id`` before, else a new one."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Image diffusion models; aliases: champion, challenger.")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("source_run") == run_id:
            return version
    return client.create_model_version(name, f"models:/{model_id}", run_id=tags["model_run"], tags=tags, model_id=model_id)


def champion(client: Any, name: str) -> tuple[str, float] | None:
    """(version, FID) of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return version.version, float(version.tags.get(METRIC, "inf"))


def promote(
    name: str = "diffusion",
    *,
    run_id: str | None = None,
    study: str | None = None,
    experiment: str = "diffusion",
    tracking_uri: str | None = None,
) -> Promotion:
    """Register ``run_id``'s model (default: the best run by FID) as ``challenger``; maybe ``champion``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id) if run_id else best_run(client, experiment, study)
    except MlflowException as err:
        raise RegistryError(f"run {run_id}: {err.message}") from None
    fid = run.data.metrics.get(METRIC)
    if fid is None or not math.isfinite(fid):
        raise RegistryError(f"run {run.info.run_id} has no finite '{METRIC}' metric: run evaluate first")
    model_run_id, model_id = find_model(client, run)
    tags = {METRIC: repr(fid), "source_run": run.info.run_id, "model_run": model_run_id}
    tags |= {key: run.data.params[key] for key in SAMPLE_PARAMS if key in run.data.params}
    if "sweep.study" in run.data.tags:
        tags |= {"sweep.study": run.data.tags["sweep.study"], "sweep.trial": run.data.tags.get("sweep.trial", "")}
    version = _version_for(client, name, run.info.run_id, model_id, tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)

    current = champion(client, name)
    this = f"{name} v{version.version} (FID {fid:.3f}, run {run.info.run_id})"
    if current is None:
        wins, message = True, f"{this} is challenger and champion: there was no champion"
    elif current[0] == version.version:
        wins, message = True, f"{this} is challenger and already champion"
    elif fid < current[1]:
        wins, message = True, f"{this} is challenger and now champion: it beats v{current[0]} (FID {current[1]:.3f})"
    else:
        wins = False
        message = f"{this} is challenger; champion stays v{current[0]} (FID {current[1]:.3f}), which it does not beat"
    if wins:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Promotion(
        name=name,
        version=version.version,
        fid=fid,
        run_id=run.info.run_id,
        model_run_id=model_run_id,
        champion=wins,
        previous_champion=current[0] if current else None,
        previous_fid=current[1] if current else None,
        message=message,
    )
