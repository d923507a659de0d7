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

A store that does not answer (README, "Tracking"; RELIABILITY.md):

- a stage checks it before any work (:func:`check_store`) and stops in seconds with
  one line naming the URI; MLflow's own HTTP retries would take about 4 minutes a call;
- once training runs, its metrics go through a :class:`MetricLog`: a file first, then
  the store from a background thread, so an outage neither holds training up nor loses
  a point; what the store never got stays in the file for the next training to send;
- a run id that the store lacks (a deleted ``mlflow.db``, another server) is not
  resumed: the stage logs into a new run, tagged with what it continues, and says so;
- every run a stage owns is tagged with its host and pid, and a stage that starts marks
  the RUNNING runs of its kind whose process is gone (``kill -9``) KILLED.

The experiment carries a saved runs-table view, ``FID`` (:func:`runs_view`): the
runs sorted by FID, with FID, KID and the final loss as columns. MLflow's UI (3.17)
lists it under Runs -> Views and opens it from a link with
``?viewStateShareKey=fid``. No experiment tag or setting makes the UI open an
experiment on its runs: 3.17 shows GenAI (traces) or model training (runs) by its
sidebar toggle, kept per browser (README, "The MLflow UI").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from diffusion.errors import UserError
from diffusion.files import file_digest

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


# ---------------------------------------------------------------- reaching the store

FAST_FAIL = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
"""MLflow's HTTP limits (it reads them from the environment at every request) where a
store that is down must cost seconds: the check before a stage, the sending of training
metrics, the end of a run. MLflow's defaults (7 retries with backoff, 120 s) take about
4 minutes a call; the model upload keeps them (or the user's)."""


class StoreUnreachableError(UserError):
    """The tracking store does not answer; one line naming its URI and what to do."""


class RunFileError(UserError):
    """A ``run.json`` that does not hold a run id; the message names the file."""


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """:data:`FAST_FAIL` in the environment for the block (every thread sees it), then back."""
    saved = {key: os.environ.get(key) for key in FAST_FAIL}
    os.environ.update(FAST_FAIL)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(err: BaseException) -> str:
    """The gist of a failed store call, one line: ``[Errno 111] Connection refused`` out of
    MLflow's paragraph about urllib3's retries, else the exception's first line."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text) or re.search(r"[\w ]*timed out", text)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def tracking_uri() -> str:
    """The store runs go to (``MLFLOW_TRACKING_URI``, else the repository's), without contacting it."""
    return _mlflow().get_tracking_uri()


def check_store() -> str:
    """Check, within seconds, that the tracking store answers, and return its URI. Stages call
    it before they load anything: :class:`StoreUnreachableError` names the URI and what to do."""
    mlflow = _mlflow()
    uri = mlflow.get_tracking_uri()
    try:
        with fail_fast():
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure means the stage cannot track: say so and stop
        raise StoreUnreachableError(
            f"the MLflow tracking store {uri} does not answer ({_reason(err)}): start it, or point "
            "MLFLOW_TRACKING_URI at one that runs (unset, runs go to mlflow/ in the repository)"
        ) from None
    return uri


def store_answers() -> bool:
    """Does the tracking store answer now (:func:`check_store`, without raising)?"""
    try:
        check_store()
    except StoreUnreachableError:
        return False
    return True


def _run_in_store(client, run_id: str) -> bool:
    """Is ``run_id`` a live (not deleted) run of the client's store?"""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


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
    return file_digest(path, "md5")


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


# ---------------------------------------------------------------- stage runs

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


def _end_run(run_id: str, status: str) -> None:
    """End the active run ``run_id`` (if it still is: :func:`end_run_offline` may have ended it)
    with ``status``, under :data:`FAST_FAIL`; a store that does not answer is one warning line."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        with fail_fast():
            mlflow.end_run(status)
    except Exception as err:  # the stage's work is done; the run stays RUNNING in the store
        print(f"tracking: warning: could not mark run {run_id} {status} in the MLflow store "
              f"{mlflow.get_tracking_uri()} ({_reason(err)})", file=sys.stderr, flush=True)


def end_run_offline(status: str = "FINISHED") -> None:
    """End the active run when the store is down, without waiting on it: one try under
    :data:`FAST_FAIL`, silent if it fails (the caller says what stays unlogged)."""
    mlflow = _mlflow()
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
    """Open the MLflow run a stage logs into (see the module docstring).

    The orchestrator's run (``MLFLOW_RUN_ID``) wins; then ``resume_run_id`` (a
    stage resumed after a kill continues its run); else a new run, nested under
    ``parent_run_id`` when given. A ``resume_run_id`` or ``parent_run_id`` that the store
    lacks is a one-line warning: the stage logs into a new run (tagged
    ``resumed_from_run``), or one not nested. ``resume_tags`` go on a run that is not the
    resumed one (what it continues: a checkpoint). The run is tagged with the stage, the
    git commit, the dvc.lock hashes and, unless the orchestrator owns it, this host and
    pid; first, the RUNNING runs of the stage whose process is gone are marked KILLED. On
    an exception the run ends FAILED. Ending a run never waits long on a dead store.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    uri = mlflow.get_tracking_uri()
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
            experiment_id=experiment_id(experiment),
            run_name=run_name,
            tags=tags,
            log_system_metrics=system_metrics,
        )
    try:
        yield run
    except BaseException:
        _end_run(run.info.run_id, "FAILED" if not owned_id else "RUNNING")
        raise
    else:
        # An orchestrator's run stays open for the orchestrator to end.
        _end_run(run.info.run_id, "FINISHED" if not owned_id else "RUNNING")


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


# ---------------------------------------------------------------- metrics that outlive an outage

UNSENT_FILE = "unsent-metrics-{run_id}.jsonl"
"""A :class:`MetricLog`'s file: the points of the run that the store does not have yet."""
SEND_RETRY_S = 5.0  # between tries while the store does not answer
CLOSE_WAIT_S = 30.0  # the most that closing a MetricLog waits for its last send
MAX_BATCH = 1000  # MLflow's limit on the metrics of one log_batch


class MetricLog:
    """The per-step metrics of a running stage, ``log(step, metrics)``, sent to run ``run_id``
    by a background thread: a store that is slow or down never holds the caller up.

    Each point is appended to ``<folder>/unsent-metrics-<run_id>.jsonl`` (a JSON line) before
    it is queued, and leaves that file once the store has it: a ``kill -9`` loses no point,
    and after an outage the file holds what the store missed. Sends are batched, under
    :data:`FAST_FAIL` limits, retried every :data:`SEND_RETRY_S` s while the store is down.
    Opening the log of a run sends first what its file still holds (a killed or offline
    training's points), and a point is dropped if the run already has that key at that
    step or later: a training resumed from a checkpoint repeats the steps after it, and
    each (key, step) is logged once. Use it as a context manager; :attr:`unsent` is then
    how many points the store did not get (still in :attr:`path`).
    """

    def __init__(self, run_id: str, folder: str | Path) -> None:
        self.run_id = run_id
        self.path = Path(folder) / UNSENT_FILE.format(run_id=run_id)
        self.unsent = 0
        self.error: str | None = None  # why the last send failed
        self._pending: list[dict[str, Any]] = []
        self._newest: dict[str, int] = {}  # key -> newest step logged (sent or pending)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._limits = fail_fast()

    def __enter__(self) -> MetricLog:
        mlflow = _mlflow()
        self._client = mlflow.MlflowClient(mlflow.get_tracking_uri())
        with fail_fast(), contextlib.suppress(Exception):  # down now: all the file holds is pending
            run = self._client.get_run(self.run_id)
            for key in run.data.metrics:
                if not key.startswith("system/"):
                    self._newest[key] = max(m.step for m in self._client.get_metric_history(self.run_id, key))
        for point in self._read():
            if point["step"] > self._newest.get(point["key"], -1):
                self._pending.append(point)
        for point in self._pending:
            self._newest[point["key"]] = max(point["step"], self._newest.get(point["key"], -1))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._rewrite()
        self._limits.__enter__()  # for the sender and MLflow's system-metrics thread, until close()
        self._thread = threading.Thread(target=self._send_loop, name="diffusion-metrics", daemon=True)
        self._thread.start()
        self._wake.set()
        return self

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        points = [
            {"key": key, "value": float(value), "timestamp": now, "step": int(step)}
            for key, value in metrics.items()
            if step > self._newest.get(key, -1)
        ]
        if not points:
            return
        for point in points:
            self._newest[point["key"]] = point["step"]
        with self._lock:
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(point) + "\n" for point in points))
            self._pending.extend(points)
        self._wake.set()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> int:
        """Send what is left (waiting at most :data:`CLOSE_WAIT_S` s) and stop; returns :attr:`unsent`."""
        if self._thread is not None:
            self._closing.set()
            self._wake.set()
            self._thread.join(CLOSE_WAIT_S)
            self._thread = None
            self._limits.__exit__(None, None, None)
        with self._lock:
            self.unsent = len(self._pending)
        return self.unsent

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        points = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a kill mid-append
                point = json.loads(line)
                if isinstance(point, dict) and {"key", "value", "timestamp", "step"} <= point.keys():
                    points.append(point)
        return points

    def _rewrite(self) -> None:
        """The file := the pending points (called holding the lock); no file when none is pending."""
        if not self._pending:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(f".{self.path.name}.sending")
        tmp.write_text("".join(json.dumps(point) + "\n" for point in self._pending))
        os.replace(tmp, self.path)

    def _send(self) -> bool:
        """Send the pending points in batches; False when the store refused or did not answer."""
        from mlflow.entities import Metric

        while True:
            with self._lock:
                batch = self._pending[:MAX_BATCH]
            if not batch:
                return True
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(**point) for point in batch])
            except Exception as err:  # down, or refusing: the points wait in the file
                self.error = _reason(err)
                return False
            with self._lock:
                del self._pending[: len(batch)]
                self._rewrite()

    def _send_loop(self) -> None:
        while not self._closing.is_set():
            if self._send():
                self._wake.wait()
                self._wake.clear()
            else:
                self._closing.wait(SEND_RETRY_S)
        self._send()  # the last try, at close


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
    signature (x_T float32 [N, C, H, W] -> samples in [-1, 1], decoded for a latent model)
    for the UI. No pickle, no code, no ``python_function`` or ``pytorch`` flavour: MLflow's
    loaders have nothing to run, and :func:`diffusion.registry.load_model` rebuilds the model
    with the installed ``diffusion`` package. The sha256 of ``model.pt`` is a tag of the model
    in the tracking store, which :func:`load_packaged_model` checks.
    """
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
    """Log the weights file ``weights`` as MLflow model ``name`` of the run: ``model.pt`` and an
    ``MLmodel`` whose ``diffusion`` flavour names the loader and the configs."""
    from types import SimpleNamespace

    from mlflow.models import Model

    with _store(tracking_uri) as mlflow:
        run = mlflow.MlflowClient().get_run(run_id or mlflow.active_run().info.run_id)
        model = mlflow.initialize_logged_model(
            name=name,
            source_run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            params=run.data.params,
            tags={WEIGHTS_SHA256_TAG: file_digest(weights)},
            model_type=FLAVOR,
        )
        Model.log(
            None,
            SimpleNamespace(save_model=_save_data_only_model),
            name=name,
            run_id=run.info.run_id,
            model_id=model.model_id,
            weights=weights,
            shapes=(input_shape, output_shape),
            configs=configs,
            loader=loader,
        )
    return model.model_id


def _save_data_only_model(
    path: str, mlflow_model: Any, *, weights: Path, shapes: tuple[tuple[int, ...], tuple[int, ...]],
    configs: Mapping[str, Any], loader: str,
) -> None:
    """What ``mlflow.models.Model.log`` calls to write a model's folder: ``model.pt`` and ``MLmodel``."""
    import shutil

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import diffusion

    Path(path).mkdir(parents=True)
    shutil.copyfile(weights, Path(path) / MODEL_FILE)
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
    mlflow_model.save(str(Path(path) / "MLmodel"))


def load_packaged_model(model_id: str, *, tracking_uri: str | None = None):
    """The :class:`~diffusion.packaged.PackagedDiffusion` of logged model ``model_id``, from
    its weights-only ``model.pt`` alone (``extra_files/model.pt`` in a model logged with
    the pickle of the pytorch flavour, which is never read); None when it has neither.

    Nothing else is downloaded and nothing is unpickled: a file that would run code is a
    one-line :class:`~diffusion.training.checkpoint.CheckpointError`, and so is a ``model.pt``
    whose sha256 differs from the one tagged on the model when it was logged.
    """
    import tempfile

    from diffusion.training.checkpoint import CheckpointError
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
