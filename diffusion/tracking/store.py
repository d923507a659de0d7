"""The MLflow tracking store: its URI (worked out here and nowhere else), a client of it,
whether it answers, and the experiment runs go to.

:func:`tracking_uri` is the store of every caller (the stages, the registry, the flows):
``MLFLOW_TRACKING_URI`` (a server, or a SQLite file: a relative ``sqlite:///`` path is
made absolute against the repository, since ``dvc exp run --temp`` runs the stages in a
copy of it), else SQLite in ``mlflow/`` at the repository root (database and artifacts,
git-ignored). Callers pass the URI, or a client of it (:func:`mlflow_client`), to what
they call; only a stage's run (:func:`diffusion.tracking.runs.stage_run`, in the stage's
main thread) points MLflow's global URI at it, for MLflow's fluent API.

A store that does not answer (docs/tracking.md; RELIABILITY.md): a stage checks it
before any work (:func:`check_store`) and stops in seconds with one line naming the
URI, where MLflow's own HTTP retries would take about 4 minutes a call. The same check
stops, in one line each, a SQLite store this user cannot write and an experiment in
MLflow's trash.

A SQLite store is created, and its schema migrated, once, under an exclusive lock
beside the file (:func:`prepare_store`, in :func:`mlflow_client`): MLflow migrates a new
file on its first use without one, and two stages that start at once (``dvc queue start
-j 2``) left it half-migrated for good. A half-migrated file is one line saying what to do.

The experiment carries a saved runs-table view, ``FID`` (:func:`runs_view`): the
runs sorted by FID, with FID, KID and the final loss as columns. MLflow's UI (3.17)
lists it under Runs -> Views and opens it from a link with
``?viewStateShareKey=fid``. No experiment tag or setting makes the UI open an
experiment on its runs: 3.17 shows GenAI (traces) or model training (runs) by its
sidebar toggle, kept per browser (docs/tracking.md, "The MLflow UI").
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusion.errors import UserError
from diffusion.tracking.provenance import repo_root

URI_ENV = "MLFLOW_TRACKING_URI"
STORE_DIR = "mlflow"
# The saved view of the runs table: the UI keeps each as an experiment tag
# mlflow.sharedViewState.<id> (its js bundle: saved views, share keys).
RUNS_VIEW_ID = "fid"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
RUNS_VIEW_METRICS = ("fid", "kid", "final_loss")


def load_mlflow():
    """``mlflow``; imported the first time with its telemetry off unless the environment says
    otherwise (MLflow reads ``MLFLOW_DISABLE_TELEMETRY`` when it is imported)."""
    if "mlflow" not in sys.modules:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def default_tracking_uri(root: Path | None = None) -> str:
    """The SQLite store in ``mlflow/`` of ``root`` (default: this repository), created if missing."""
    store = (root or repo_root()) / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def tracking_uri(root: Path | None = None) -> str:
    """The store runs go to, without contacting it: ``MLFLOW_TRACKING_URI``, a relative
    ``sqlite:///`` path made absolute against ``root`` (default: this repository), else
    :func:`default_tracking_uri`."""
    uri = os.environ.get(URI_ENV)
    if not uri:
        return default_tracking_uri(root.resolve() if root else None)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{((root or repo_root()) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (and so ``MLFLOW_TRACKING_URI``) is ``uri`` while the block
    runs, both as they were after. For the MLflow calls that reach a store through a client of
    the global URI whatever client they were called on: the SQL registry store's
    ``create_model_version`` looks a ``models:/<id>`` source up with ``MlflowClient()`` (a TODO
    in MLflow's code), so without this a version registered in a store named by URI is refused
    as not found, or registered from another store's model of that id."""
    from mlflow.tracking._tracking_service import utils

    mlflow = load_mlflow()
    variable, explicit = os.environ.get(URI_ENV), utils._tracking_uri  # set_tracking_uri(None) unsets both
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit)
        if variable is not None:
            os.environ[URI_ENV] = variable


def mlflow_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` of the tracking and registry store at ``uri`` (default :func:`tracking_uri`),
    a SQLite store created first if new (:func:`prepare_store`)."""
    uri = uri or tracking_uri()
    prepare_store(uri)
    return load_mlflow().MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------- creating a SQLite store

class StoreSchemaError(UserError):
    """A SQLite store whose schema MLflow cannot use as it is; one line saying what to do."""


_prepared: set[str] = set()  # the SQLite URIs this process has found healthy


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@functools.cache
def _schema_head() -> str:
    """The schema revision this MLflow creates and expects (the head of its alembic migrations)."""
    load_mlflow()
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _tables_and_revisions(db: Path, mode: str) -> tuple[set[str], list[str]]:
    """The tables of the SQLite file ``db`` and its alembic revisions, opened in ``mode`` (rw, ro)."""
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode={mode}", uri=True, timeout=60)) as con:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revisions = [rev for (rev,) in con.execute("SELECT version_num FROM alembic_version")] \
            if "alembic_version" in tables else []
    return tables, revisions


def _schema_state(db: Path) -> str | None:
    """``"new"`` for a store MLflow will create (no file, or no table), None for one at this
    MLflow's schema, else what is wrong with it; read with the stdlib's sqlite3, without MLflow."""
    if not db.is_file():
        return "new"
    # Read-write where it can be: a writer killed mid-transaction leaves a hot journal, which only a
    # connection that may write rolls back (read-only, SQLite says "attempt to write a readonly database").
    try:
        tables, revisions = _tables_and_revisions(db, "rw")
    except sqlite3.OperationalError:
        tables, revisions = _tables_and_revisions(db, "ro")
    if not tables - {"alembic_version"} and not revisions:
        return "new"
    left = sorted(name for name in tables if name.startswith("_alembic_tmp_"))
    revision = ", ".join(revisions) or "none"
    if left:
        return f"half-migrated: tables {', '.join(left)} of a migration that stopped half-way, revision {revision}"
    if len(revisions) != 1:
        return f"half-migrated: tables but schema revision {revision}, its creation stopped half-way"
    if revisions[0] != _schema_head():
        return (f"at schema revision {revisions[0]}, where this MLflow's is {_schema_head()}: a migration "
                "stopped half-way, or another MLflow version made it")
    return None


@contextlib.contextmanager
def _creation_lock(db: Path) -> Iterator[None]:
    """Hold the exclusive lock ``<db>.lock`` (flock) for the block: one process creates a store.
    Where the folder cannot hold the lock (read-only), the block runs without it: nothing can be
    created there either."""
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_store(uri: str) -> None:
    """Create and migrate the SQLite store at ``uri`` once, under :func:`_creation_lock`, if it is
    new; :class:`StoreSchemaError` (one line) for a half-migrated one. Other stores: nothing."""
    db = sqlite_file(uri)
    if db is None or uri in _prepared:
        return
    if _schema_state(db) is not None:  # new, or half-way: another process may be creating it now
        with _creation_lock(db):
            state = _schema_state(db)
            if state == "new":
                load_mlflow().MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # MLflow migrates it
            elif state is not None:
                raise StoreSchemaError(
                    f"the MLflow store {db} is {state}. Move it aside (mv {db} {db}.broken) and run again to "
                    f"start a new store; to keep its runs instead, back it up, drop any _alembic_tmp_* table "
                    f"and run `mlflow db upgrade {uri}`"
                )
    _prepared.add(uri)


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


def reason(err: BaseException) -> str:
    """The gist of a failed store call, one line: ``[Errno 111] Connection refused`` out of
    MLflow's paragraph about urllib3's retries, else the exception's first line."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text) or re.search(r"[\w ]*timed out", text)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class StoreReadOnlyError(UserError):
    """A SQLite store this user cannot write; one line naming the file and what to do."""


class ExperimentDeletedError(UserError):
    """The stage's experiment is in MLflow's trash; one line saying how to restore it."""


def _check_writable(uri: str) -> None:
    """:class:`StoreReadOnlyError` where a stage could not write the SQLite store at ``uri``: the
    file, or its folder (SQLite writes its journal beside it), is read-only to this user."""
    db = sqlite_file(uri)
    if db is None:
        return
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a store not made yet: the folder it would be made in
    for path in (db, db.parent) if db.exists() else (folder,):
        if os.access(path, os.W_OK):
            continue
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        why = "on a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else f"not writable by {user}"
        what = "the file" if path == db else "its folder, where SQLite writes its journal,"
        raise StoreReadOnlyError(
            f"the MLflow tracking store {db} is read-only: {what} is {why}; a stage writes its runs "
            "there: make it writable for this user, or point MLFLOW_TRACKING_URI at a store you can write"
        )


def check_store(uri: str | None = None, experiment: str | None = None) -> str:
    """Check, within seconds, that the tracking store at ``uri`` (default :func:`tracking_uri`)
    answers, that a stage can write it (a SQLite file) and that ``experiment``, if given, is
    not in MLflow's trash, and return its URI. Stages call it before they load anything:
    :class:`StoreUnreachableError`, :class:`StoreReadOnlyError`, :class:`StoreSchemaError` or
    :class:`ExperimentDeletedError` names the URI and what to do."""
    uri = uri or tracking_uri()
    _check_writable(uri)
    try:
        with fail_fast():
            client = mlflow_client(uri)
            client.search_experiments(max_results=1)
            exp = client.get_experiment_by_name(experiment) if experiment else None
    except UserError:
        raise
    except Exception as err:  # any failure means the stage cannot track: say so and stop
        raise StoreUnreachableError(
            f"the MLflow tracking store {uri} does not answer ({reason(err)}): start it, or point "
            "MLFLOW_TRACKING_URI at one that runs (unset, runs go to mlflow/ in the repository)"
        ) from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ExperimentDeletedError(
            f"the MLflow experiment '{experiment}' (id {exp.experiment_id}) of the store {uri} is deleted (in "
            f"MLflow's trash, with its runs): restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments "
            f"restore --experiment-id {exp.experiment_id}`, or set tracking.experiment to another name"
        )
    return uri


def store_answers(uri: str | None = None) -> bool:
    """Does the tracking store answer now (:func:`check_store`, without raising)?"""
    try:
        check_store(uri)
    except StoreUnreachableError:
        return False
    return True


# ---------------------------------------------------------------- the experiment

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
    """The experiment ``name`` of the store at ``tracking_uri`` (default :func:`tracking_uri`),
    created with its artifacts beside a local SQLite store; it has the ``FID`` runs view
    (one created before that gets it)."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if RUNS_VIEW_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, runs_view())
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = (Path(client.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={RUNS_VIEW_TAG: runs_view()})
