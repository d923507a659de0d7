"""The MLflow run a stage logs into, the process that holds it open, and what goes into it.

Runs follow DVC's data lineage (docs/tracking.md, "Tracking"):

- ``train`` opens a run (the *model run*): params of data/model/diffusion/train,
  the dataset, per-step metrics, system metrics, the model. Its id is written to
  ``models/run.json``, a DVC output, so a stage restored from DVC's run cache brings
  back the id of the run that really trained it and creates no duplicate run.
- ``sample`` opens a run nested under the model run: sample/evaluate params, the
  grid. ``evaluate`` logs FID/KID into that run and mirrors them onto its parent.
- An orchestrator (a Prefect flow, a sweep trial) that owns a run sets
  ``MLFLOW_RUN_ID``; every stage then logs into that run instead, and tags it with
  the model run it used.

A run id that the store lacks (a deleted ``mlflow.db``, another server) is not resumed:
the stage logs into a new run, tagged with what it continues, and says so. Every run a
stage owns is tagged with its host and pid, and a stage that starts marks the RUNNING
runs of its kind whose process is gone (``kill -9``) KILLED. Ending a run never waits
long on a store that is down (:data:`~diffusion.tracking.store.FAST_FAIL`).

The helpers after :func:`stage_run` log into the run it opened (MLflow's active run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusion.errors import UserError
from diffusion.files import atomic_write_text
from diffusion.tracking.provenance import dvc_lock_hashes, file_md5, git_commit
from diffusion.tracking.store import experiment_id, fail_fast, load_mlflow, mlflow_client, reason, tracking_uri

RUN_ID_ENV = "MLFLOW_RUN_ID"
SYSTEM_METRICS_INTERVAL_S = 5  # CPU, memory, GPU every 5 s (MLflow's default: 10), so short stages show them
SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # set, it wins


class RunFileError(UserError):
    """A ``run.json`` that does not hold a run id; the message names the file."""


def read_run_id(path: str | Path) -> str | None:
    """The run id in a ``run.json`` of :func:`write_run_id`; None when there is no such file,
    :class:`RunFileError` (one line) when it holds no run id."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFileError(f"{path}: not a run file ({type(err).__name__}: {err})") from None
    if not isinstance(run_id, str) or not run_id:
        raise RunFileError(f"{path}: not a run file (run_id is {run_id!r})")
    return run_id


def write_run_id(path: str | Path, run_id: str) -> None:
    atomic_write_text(path, json.dumps({"run_id": run_id}) + "\n")


# ---------------------------------------------------------------- the process that holds a run

HOST_TAG, PID_TAG, PID_START_TAG = "stage.host", "stage.pid", "stage.pid_start"
"""Tags of the process that holds a run open: a run left RUNNING whose process is gone was killed."""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux's ``/proc``), ``"zombie"``
    for one that has exited and is not reaped yet; None where ``/proc`` cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime 22
    return "zombie" if fields[0] == "Z" else fields[19]


def _process_tags() -> dict[str, str]:
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    started = _process_start(os.getpid())
    if started:
        tags[PID_START_TAG] = started
    return tags


def _process_alive(tags: Mapping[str, str]) -> bool:
    """Is the process that :func:`_process_tags` describes still running (not a later one with its pid)?"""
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = _process_start(pid)
    return started != "zombie" and (started is None or tags.get(PID_START_TAG) in (None, started))


def _end_orphans(client, stage: str, experiment: str, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs of ``stage`` opened on this host by a process that is gone
    (killed with SIGKILL, it could not end its run), except ``keep`` (about to be resumed)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`stage.{stage}` = 'ran' and tags.`{HOST_TAG}` = '{host}'"
    for run in client.search_runs([exp.experiment_id], query):
        tags = run.data.tags
        if run.info.run_id == keep or PID_TAG not in tags or _process_alive(tags):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"{stage}: run {run.info.run_id} was left RUNNING by pid {tags[PID_TAG]} on {host}, which is gone: "
              "marked KILLED", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- opening and ending a stage's run

def _run_in_store(client, run_id: str) -> bool:
    """Is ``run_id`` a live (not deleted) run of the client's store?"""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _end_run(run_id: str, status: str) -> None:
    """End the active run ``run_id`` (if it still is: :func:`end_run_offline` may have ended it)
    with ``status``, under :data:`FAST_FAIL`; a store that does not answer is one warning line."""
    mlflow = load_mlflow()
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        with fail_fast():
            mlflow.end_run(status)
    except Exception as err:  # the stage's work is done; the run stays RUNNING in the store
        print(f"tracking: warning: could not mark run {run_id} {status} in the MLflow store "
              f"{mlflow.get_tracking_uri()} ({reason(err)})", file=sys.stderr, flush=True)


def end_run_offline(status: str = "FINISHED") -> None:
    """End the active run when the store is down, without waiting on it: one try under
    :data:`FAST_FAIL`, silent if it fails (the caller says what stays unlogged)."""
    mlflow = load_mlflow()
    with contextlib.suppress(Exception), fail_fast():
        mlflow.end_run(status)  # pops the run before it calls the store, so it is ended here either way


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    resume_tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Open the MLflow run a stage logs into (see the module docstring), in the store of
    :func:`~diffusion.tracking.store.tracking_uri`, which becomes MLflow's global URI: call it
    from the stage's main thread.

    The orchestrator's run (``MLFLOW_RUN_ID``) wins; then ``resume_run_id`` (a
    stage resumed after a kill continues its run); else a new run, nested under
    ``parent_run_id`` when given. A ``resume_run_id`` or ``parent_run_id`` that the store
    lacks is a one-line warning: the stage logs into a new run (tagged
    ``resumed_from_run``), or one not nested. ``resume_tags`` go on a run that is not the
    resumed one (what it continues: a checkpoint). The run is tagged with the stage, the
    git commit, the dvc.lock hashes and, unless the orchestrator owns it, this host and
    pid; first, the RUNNING runs of the stage whose process is gone are marked KILLED. On
    an exception the run ends FAILED, KILLED when SIGINT or SIGTERM stopped the stage. Ending
    a run never waits long on a dead store.
    """
    mlflow = load_mlflow()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # for the fluent API (the active run, system metrics) of this stage
    if system_metrics and not os.environ.get(SYSTEM_METRICS_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    client = mlflow_client(uri)
    owned_id = os.environ.get(RUN_ID_ENV)
    asked = resume_run_id
    tags = {f"stage.{stage}": "ran", **dvc_lock_hashes()}
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    if not owned_id:
        tags.update(_process_tags())
        _end_orphans(client, stage, experiment, keep=resume_run_id)
        if resume_run_id and not _run_in_store(client, resume_run_id):
            noted = "".join(f", tagged {key}={value}" for key, value in (resume_tags or {}).items())
            print(f"{stage}: warning: run {resume_run_id} is not in the MLflow store {uri}; "
                  f"logging into a new run{noted}", file=sys.stderr, flush=True)
            tags["resumed_from_run"] = resume_run_id
            resume_run_id = None
        if parent_run_id and not _run_in_store(client, parent_run_id):
            print(f"{stage}: warning: model run {parent_run_id} is not in the MLflow store {uri}; "
                  "this run is not nested under it", file=sys.stderr, flush=True)
            parent_run_id = None
    opened = owned_id or resume_run_id
    if resume_tags and (opened is None or opened != asked):
        tags.update(resume_tags)
    if owned_id:
        run = mlflow.start_run(run_id=owned_id, tags=tags, log_system_metrics=system_metrics)
        if parent_run_id and parent_run_id != owned_id:
            mlflow.set_tag(f"{stage}.model_run_id", parent_run_id)
    elif resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, tags=tags, log_system_metrics=system_metrics)
    else:
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.start_run(
            experiment_id=experiment_id(experiment, uri),
            run_name=run_name,
            tags=tags,
            log_system_metrics=system_metrics,
        )
    try:
        yield run
    except BaseException as err:
        # Stopped by SIGINT or SIGTERM (diffusion.interrupt): KILLED, MLflow's status of an interrupted run.
        ended = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        _end_run(run.info.run_id, ended if not owned_id else "RUNNING")
        raise
    else:
        # An orchestrator's run stays open for the orchestrator to end.
        _end_run(run.info.run_id, "FINISHED" if not owned_id else "RUNNING")


# ---------------------------------------------------------------- what goes into the run

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


def log_params(params: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log a (nested) params mapping flattened, in batches MLflow accepts."""
    from mlflow.entities import Param

    run_id = run_id or load_mlflow().active_run().info.run_id
    items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
    client = mlflow_client()
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log metrics to the active run, or to ``run_id`` (a parent mirrored from a child)."""
    if run_id is None:
        load_mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        return
    client = mlflow_client()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step or 0)


def set_tags(tags: Mapping[str, str], run_id: str | None = None) -> None:
    """Set tags on the active run, or on ``run_id``."""
    if run_id is None:
        load_mlflow().set_tags(dict(tags))
        return
    from mlflow.entities import RunTag

    mlflow_client().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_dataset(
    path: str | Path, *, name: str, source: str, images, labels, captions: Sequence[str] | None = None, context: str = "training",
) -> None:
    """The dataset as an MLflow dataset: its DVC hash (md5 of the file) as digest, its source;
    with captions, its features are the flattened images and the captions (a string feature)."""
    import numpy as np

    mlflow = load_mlflow()
    digest = file_md5(path)
    features = np.asarray(images).reshape(len(images), -1)
    if captions is not None:
        features = {"images": features, "captions": np.array(captions, dtype=str).reshape(-1)}
    ds = mlflow.data.from_numpy(
        features,
        targets=np.asarray(labels),
        source=source,
        name=name,
        digest=digest[:36],
    )
    mlflow.log_input(ds, context=context, tags={"dvc_md5": digest, "path": str(path)})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    load_mlflow().log_artifact(str(path), artifact_path)


def log_image(image, artifact_file: str) -> None:
    """A uint8 ``[H, W, C]`` array as the active run's PNG ``artifact_file``."""
    load_mlflow().log_image(image, artifact_file=artifact_file)


def mirror_to_parent(metrics: Mapping[str, float], tags: Mapping[str, str] | None = None) -> None:
    """Copy metrics (and the tags that go with them, an FID's protocol) of a nested
    (sample) run onto its parent (model) run.

    Not under an orchestrator: there the parent is a sweep, not the model run.
    """
    if os.environ.get(RUN_ID_ENV):
        return
    parent = load_mlflow().active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        log_metrics(metrics, run_id=parent)
        if tags:
            set_tags(tags, run_id=parent)
