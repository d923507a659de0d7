"""The one module that talks to the MLflow model registry: promotion by alias.

:func:`promote` registers a run's model as a new version of a registered model and
points the ``challenger`` alias at it. ``champion`` moves to it only if its FID was
measured under the same protocol as the champion's (:mod:`diffusion.evaluation.protocol`, the
``fid.protocol.digest`` tag) and is lower beyond the noise: with the confidence its FID's
interval was computed at (``evaluate.confidence``, 0.95), by :func:`improvement_confidence` on
the two FIDs' bootstrap standard errors. A version lower but within the noise is challenger
only. The message says which happened, by how much and with what confidence, and names the
fields in which the protocols differ. MLflow deprecated registry stages:
aliases are all this module uses.

:func:`load_model` (``load_model("models:/<name>@champion")``) is the loader. Models
are data only (:func:`diffusion.tracking.log_packaged_model`): it downloads the
weights-only ``model.pt`` and rebuilds the model with the installed ``diffusion``
package; it reads no MLmodel, imports no code from the store and unpickles nothing. ``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model``
must not be used on a store others can write: they unpickle, and import the code
paths of, whatever the model's files say.

The registered model samples as the FID's images were drawn: promotion reads the
trained weights from the model run's logged model (its weights-only file), sets
``sampling`` to the FID's sampler settings, and logs that as a new model
(``promoted``), an output of the FID's run, which the version points at. The version
is tagged with ``fid``, ``source_run``, ``model_run`` and the protocol.

Which run holds the model whose FID it is (the train stage logs it as ``model``,
:func:`diffusion.tracking.log_packaged_model`), in the order :func:`find_model` asks:

- the FID's run itself: a sweep trial whose train stage ran; or, with ``sample.ema_length``, a run
  the sample stage logged the network it drew from into, as ``model`` (the EMA of that length,
  reconstructed after training; the run's newest ``model``, so in a trial it outranks the trained one);
- a sweep trial whose sample stage came from DVC's run cache names the run that drew its
  images in its tag ``sample.run_id`` (it holds the reconstructed EMA's model, if any);
- a sweep trial whose train stage came from DVC's run cache names it in its tag
  ``train.model_run_id`` (or ``sample.model_run_id``, set by the sample stage);
- a sample run is nested under it.

Two promotions of one registered model never interleave: each holds
:func:`promotion_lock` from choosing the version to setting the aliases.

MLflow is imported inside the functions: ``import diffusion.registry`` stays light.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from diffusion import tracking
from diffusion.errors import UserError
from diffusion.evaluation import protocol

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC = "fid"
SE_METRIC = "fid_se"  # the FID's bootstrap standard error (the evaluate stage's)
CONFIDENCE_TAG = f"{protocol.INTERVAL_TAG_PREFIX}confidence"  # the confidence the evaluate stage's intervals were computed at
DEFAULT_CONFIDENCE = 0.95  # for an FID recorded without it
MODEL_NAME = "model"  # the train stage's log_model name
PROMOTED_NAME = "promoted"  # the model promotion logs: the trained weights with the FID's sampling
# Tags that point from a run to the run holding its model, in the order they are trusted.
MODEL_RUN_TAGS = ("sample.run_id", "train.model_run_id", "sample.model_run_id", "mlflow.parentRunId")
ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
LOCK_SUFFIX = ".promotion-lock"  # the registered model that is the lock of a promotion of <name>
LOCK_TTL_S = 60.0  # a lock not refreshed for this long belongs to a promotion that died
LOCK_WAIT_S = 600.0  # how long a promotion waits for a live one to finish
LOCK_POLL_S = 0.2
MLFLOW_INF = 1e308  # MLflow stores inf as the largest float (1.797e308): a FID at or past it is no measurement


class RegistryError(UserError, RuntimeError):
    """No run, metric or model to promote, a model URI that names none, a promotion lock
    held too long; the message is one line."""


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


def best_run(client: Any, experiment: str, study: str | None = None) -> Any:
    """The finished run of ``experiment`` with the lowest FID; with ``study``, among that sweep's trials."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RegistryError(f"no MLflow experiment '{experiment}' at {client.tracking_uri}")
    query = f"attributes.status = 'FINISHED' and metrics.{METRIC} >= 0"
    if study:
        query += f" and tags.`sweep.study` = '{study}'"
    runs = client.search_runs([exp.experiment_id], query, order_by=[f"metrics.{METRIC} ASC"], max_results=100)
    usable = [r for r in runs if is_measured_fid(r.data.metrics.get(METRIC))]
    if not usable:
        scope = f"sweep '{study}'" if study else f"experiment '{experiment}'"
        if runs:
            raise RegistryError(
                f"no candidate in {scope}: its {len(runs)} finished run(s) with a '{METRIC}' metric record "
                "none that is finite (inf or NaN is a failed measurement): run evaluate again"
            )
        raise RegistryError(f"no finished run with a '{METRIC}' metric in {scope}: run evaluate (or a sweep) first")
    return usable[0]


def is_measured_fid(fid: float | None) -> bool:
    """A FID that ranks a model: finite and below :data:`MLFLOW_INF`, MLflow's stand-in for inf."""
    return fid is not None and math.isfinite(fid) and abs(fid) < MLFLOW_INF


def _logged_model_id(client: Any, run_id: str, name: str = MODEL_NAME) -> str | None:
    """The id of the model the run logged as ``name`` (the newest one), if it logged one."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    named = [model for model in (client.get_logged_model(o.model_id) for o in outputs) if model.name == name]
    return max(named, key=lambda model: model.creation_timestamp).model_id if named else None


def find_model(client: Any, run: Any) -> tuple[str, str]:
    """(model run id, logged model id) for ``run``: its own model or the one its tags point at (module doc)."""
    candidates = [run.info.run_id] + [run.data.tags.get(tag) for tag in MODEL_RUN_TAGS]
    for run_id in dict.fromkeys(c for c in candidates if c):
        model_id = _logged_model_id(client, run_id)
        if model_id:
            return run_id, model_id
    raise RegistryError(
        f"run {run.info.run_id} has no logged '{MODEL_NAME}' and names no run that has one "
        "(train with tracking.log_model: true)"
    )


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, *, ttl: float = LOCK_TTL_S, wait: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` while the block runs: one
    promotion of ``name`` at a time, across processes and hosts that share the store.

    The lock is the registered model ``<name>.promotion-lock``: creating a registered
    model is atomic in every MLflow store (the name is unique, so a second create fails
    with RESOURCE_ALREADY_EXISTS). Its holder pushes the lock's tag ``expires`` (epoch
    seconds) ``ttl`` ahead every ``ttl / 4`` s and deletes the lock at the end. A lock
    past its expiry belongs to a promotion that died: the next promotion deletes it, if
    its ``holder`` tag is unchanged, and takes it. Hosts' clocks must agree to well
    within ``ttl``. :class:`RegistryError` after ``wait`` s behind a live holder.
    """
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder, "expires": f"{time.time() + ttl:.3f}"},
                description=f"Held while a promotion of '{name}' runs; deleted when it ends.",
            )
            break
        except MlflowException as err:
            if err.error_code not in ALREADY_EXISTS:
                raise
        held_by = _expire(client, lock, ttl)
        if held_by and time.monotonic() > deadline:
            raise RegistryError(f"registered model '{name}': {held_by} has held {lock} for over {wait:g} s; try again later")
        time.sleep(LOCK_POLL_S)

    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(ttl / 4):
            try:
                client.set_registered_model_tag(lock, "expires", f"{time.time() + ttl:.3f}")
            except MlflowException:
                return

    thread = threading.Thread(target=refresh, name=f"{lock}-refresh", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _release(client, lock, holder)


def _expire(client: Any, lock: str, ttl: float) -> str | None:
    """Delete ``lock`` if it has expired; the holder of a live lock, None when there is none now."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException:
        return None  # released meanwhile
    expires = float(model.tags.get("expires", model.creation_timestamp / 1000 + ttl))
    if time.time() <= expires:
        return model.tags.get("holder", "another promotion")
    _release(client, lock, model.tags.get("holder"))
    return None


def _release(client: Any, lock: str, holder: str | None) -> None:
    """Delete ``lock`` if ``holder`` still holds it."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_registered_model(lock).tags.get("holder") == holder:
            client.delete_registered_model(lock)
    except MlflowException:
        pass  # gone already


def _version_for(client: Any, name: str, run: Any, model_id: str, measured: dict[str, Any], tags: dict[str, str]) -> Any:
    """The version registered from ``run`` before, else a new one: ``model_id``'s weights
    sampling with the settings of ``measured``, logged as a model of ``run``."""
    from mlflow.exceptions import MlflowException

    from diffusion.packaged import PackagedDiffusion

    try:
        client.create_registered_model(name, description="Image diffusion models; aliases: champion, challenger.")
    except MlflowException as err:
        if err.error_code not in ALREADY_EXISTS:
            raise
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("source_run") == run.info.run_id:
            return version
    trained = tracking.load_packaged_model(model_id, tracking_uri=client.tracking_uri)
    if trained is None:
        raise RegistryError(
            f"model {model_id} of run {tags['model_run']} has no weights-only file "
            f"({tracking.MODEL_FILE}; it was logged before models carried one): train again to promote it"
        )
    sampling = {key: measured[key] for key in protocol.SAMPLING}
    packaged = PackagedDiffusion(
        trained.model_spec, trained.process, net=trained.net, sampling=sampling,
        autoencoder=trained.autoencoder_spec, decoder=trained.autoencoder,
    )
    promoted_id = tracking.log_packaged_model(packaged, PROMOTED_NAME, run_id=run.info.run_id, tracking_uri=client.tracking_uri)
    return _create_version(client, name, promoted_id, run_id=run.info.run_id, tags=tags)


def register_version(
    name: str, model_id: str, *, tags: dict[str, str], description: str, tracking_uri: str | None = None,
) -> Any:
    """A new version of registered model ``name`` (created when missing) from logged model ``model_id``."""
    from mlflow.exceptions import MlflowException

    client = tracking.mlflow_client(tracking_uri)
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code not in ALREADY_EXISTS:
            raise
    return _create_version(client, name, model_id, run_id=client.get_logged_model(model_id).source_run_id, tags=tags)


def _create_version(client: Any, name: str, model_id: str, *, run_id: str, tags: dict[str, str]) -> Any:
    """A version of ``name`` from logged model ``model_id`` in the store of ``client`` (MLflow's
    SQL registry looks the model up in the global URI's store: :func:`tracking.global_tracking_uri`)."""
    with tracking.global_tracking_uri(client.tracking_uri):
        return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id)


def champion(client: Any, name: str) -> Any | None:
    """The model version ``champion`` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def improvement_confidence(fid: float, se: float, previous_fid: float, previous_se: float) -> float:
    """How sure it is that an FID of ``fid`` +- ``se`` is lower than ``previous_fid`` +- ``previous_se``:
    ``Phi((previous_fid - fid) / sqrt(se^2 + previous_se^2))``, the two FIDs independent and
    normal with their bootstrap standard errors (:func:`diffusion.evaluation.metrics.fid_bootstrap`).
    Both errors include the reference's sampling error, which two FIDs of one protocol share
    (one reference file), so this errs towards keeping the champion. Without errors (FIDs
    recorded before they were measured): 1 when lower, else 0."""
    spread = math.hypot(se, previous_se)
    if spread == 0:
        return float(fid < previous_fid)
    return 0.5 * math.erfc((fid - previous_fid) / (spread * math.sqrt(2)))


def _plus_minus(fid: float, se: float) -> str:
    return f"FID {fid:.3f} +- {se:.3f}" if se else f"FID {fid:.3f}"


def _recorded_protocol(tags: dict[str, str], where: str) -> dict[str, Any] | None:
    try:
        return protocol.from_tags(tags)
    except protocol.ProtocolError as err:
        raise RegistryError(f"{where}: {err}") from None


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

    client = tracking.mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id) if run_id else best_run(client, experiment, study)
    except MlflowException as err:
        raise RegistryError(f"run {run_id}: {err.message}") from None
    fid = run.data.metrics.get(METRIC)
    if not is_measured_fid(fid):
        raise RegistryError(f"run {run.info.run_id} has no finite '{METRIC}' metric ({fid}): run evaluate first")
    measured = _recorded_protocol(run.data.tags, f"run {run.info.run_id}")
    if measured is None:
        raise RegistryError(f"run {run.info.run_id} records no FID protocol (tag {protocol.DIGEST_TAG}): run evaluate again")
    se = run.data.metrics.get(SE_METRIC, 0.0)
    needed = float(run.data.tags.get(CONFIDENCE_TAG, DEFAULT_CONFIDENCE))
    model_run_id, model_id = find_model(client, run)
    tags = {
        METRIC: repr(fid), SE_METRIC: repr(se), "source_run": run.info.run_id, "model_run": model_run_id,
        **protocol.to_tags(measured),
    }
    if "sweep.study" in run.data.tags:
        tags |= {"sweep.study": run.data.tags["sweep.study"], "sweep.trial": run.data.tags.get("sweep.trial", "")}

    with promotion_lock(client, name):
        version = _version_for(client, name, run, model_id, measured, tags)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        current = champion(client, name)
        this = f"{name} v{version.version} ({_plus_minus(fid, se)}, run {run.info.run_id})"
        previous_fid = float(current.tags.get(METRIC, "inf")) if current else None
        previous_se = float(current.tags.get(SE_METRIC, 0.0)) if current else 0.0
        if current is None:
            wins, message = True, f"{this} is challenger and champion: there was no champion"
        elif current.version == version.version:
            wins, message = True, f"{this} is challenger and already champion"
        else:
            measured_before = is_measured_fid(previous_fid)
            theirs = f"v{current.version} ({_plus_minus(previous_fid, previous_se)})" if measured_before else f"v{current.version} (no FID)"
            differ = protocol.differences(measured, _recorded_protocol(current.tags, f"{name} v{current.version}"))
            confidence = improvement_confidence(fid, se, previous_fid, previous_se) if measured_before else 1.0
            wins = not differ and confidence >= needed
            lower = f", lower by {previous_fid - fid:.3f} with confidence {confidence:.3f}" if measured_before else ""
            if differ:
                message = (
                    f"{this} is challenger; champion stays {theirs}, "
                    f"whose FID was measured under another protocol: {', '.join(differ)}"
                )
            elif wins:
                message = f"{this} is challenger and now champion: it beats {theirs}{lower}"
            elif fid < previous_fid:
                message = f"{this} is challenger; champion stays {theirs}: {lower.removeprefix(', ')}, short of {needed} (within the noise)"
            else:
                message = f"{this} is challenger; champion stays {theirs}, which it does not beat"
        if wins:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    return Promotion(
        name=name,
        version=version.version,
        fid=fid,
        run_id=run.info.run_id,
        model_run_id=model_run_id,
        champion=wins,
        previous_champion=current.version if current else None,
        previous_fid=previous_fid,
        message=message,
    )


URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, models:/<model id> or runs:/<run id>/<model name>"


def load_model(uri: str, *, tracking_uri: str | None = None, map_location: str = "cpu") -> Any:
    """The :class:`~diffusion.packaged.PackagedDiffusion` that ``uri`` names (one of
    :data:`URI_FORMS`), e.g. ``load_model("models:/diffusion@champion")``.

    The safe loader (module docstring): only the model's weights-only ``model.pt`` is
    downloaded, checked against the sha256 tagged on the model, and read with
    ``torch.load(weights_only=True)``; the network is rebuilt by the installed
    ``diffusion`` package. :class:`RegistryError` (one line) when ``uri`` names no
    model or one without that file; :class:`~diffusion.training.checkpoint.CheckpointError`
    (one line) when the file would run code or was replaced.
    """
    client = tracking.mlflow_client(tracking_uri)
    model_id = _model_id(client, uri)
    packaged = tracking.load_packaged_model(model_id, tracking_uri=client.tracking_uri)
    if packaged is None:
        logged = client.get_logged_model(model_id)
        if tracking.WEIGHTS_SHA256_TAG in logged.tags or logged.model_type == tracking.model_format.FLAVOR:
            raise RegistryError(
                f"{uri}: {logged.artifact_location}/{tracking.MODEL_FILE} is missing: model {model_id} was logged "
                "with it by this project, and the file was deleted from the artifact store since"
            )
        raise RegistryError(f"{uri}: model {model_id} has no weights-only {tracking.MODEL_FILE}: it was not logged by this project")
    return packaged.to(map_location)


def _model_id(client: Any, uri: str) -> str:
    """The logged model id that ``uri`` names, read from the tracking and registry store only."""
    from mlflow.exceptions import MlflowException

    scheme, _, rest = uri.partition(":/")
    try:
        if scheme == "models" and "@" in rest:
            version = client.get_model_version_by_alias(*rest.split("@", 1))
        elif scheme == "models" and "/" in rest:
            version = client.get_model_version(*rest.split("/", 1))
        elif scheme == "models" and rest:
            return client.get_logged_model(rest).model_id
        elif scheme == "runs" and "/" in rest:
            run_id, name = rest.split("/", 1)
            model_id = _logged_model_id(client, run_id, name)
            if model_id is None:
                raise RegistryError(f"{uri}: run {run_id} logged no model '{name}'")
            return model_id
        else:
            raise RegistryError(f"{uri}: not a model URI; expected {URI_FORMS}")
    except MlflowException as err:
        raise RegistryError(f"{uri}: {(err.message.strip().splitlines() or [err.error_code])[0]}") from None
    source = version.source or ""
    if version.model_id or (source.startswith("models:/") and "/" not in source.removeprefix("models:/")):
        return version.model_id or source.removeprefix("models:/")  # stores fill in one or the other
    raise RegistryError(f"{uri}: version {version.version} is not a logged model (its source is {version.source})")
