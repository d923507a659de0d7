"""The sweep's Optuna study: where it is stored, what it searches, what it minimises.

- **Storage**: ``sweep.storage``: a journal file in ``.optuna/`` by default, an RDB URL
  (``sqlite:///...``, ``postgresql://...``) or ``journal:<path>`` for many workers.
  Opening a study of an existing name continues it.
- **Workers that die** (RDB storages; Optuna's journal storage has no heartbeats): each
  running trial's heartbeat is recorded every ``sweep.heartbeat_s`` (:class:`Heartbeat`).
  Before each ask, trials :data:`GRACE_BEATS` heartbeats late are failed and retried up to
  ``sweep.trial_retries`` times (``RetryHeartbeatStaleTrialCallback``, :func:`ask`).
- **A cap across workers**: ``sweep.max_trials``, as Optuna's ``MaxTrialsCallback`` but
  checked before each ask and counting the running trials of every worker too
  (:func:`trials_counted`). A failed trial does not count: its retry does, once.
- **A store that restarts**: every storage call of the flow waits out a lost database
  connection for up to :data:`STORE_OUTAGE_S` (:func:`through_outage`).
- **Search space**: one ``suggest_*`` per dimension of ``sweep.space``, less the
  dimensions that mean nothing for the config (:func:`searched_space`: guidance for an
  unconditional model, eta or EDM's churn for a sampler that does not take it, U-Net
  arguments for a transformer).
- **Objectives**: ``fid`` (``metrics/evaluate.json``); ``sampling_cost``, the sampler's
  network evaluations per image (:func:`diffusion.sampling.specs.network_evaluations`);
  ``text_error``, how far a text-conditional model's images are from their prompts
  (:func:`diffusion.evaluation.text_faithfulness.text_faithfulness`: 1 - the mean of the named
  digit's accuracy and the attributes' agreement).
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from diffusion.config import Params, SearchDim, SweepParams
from diffusion.models.configs import FAMILY_OF, family
from diffusion.sampling.specs import CHURN_OPTIONS, SAMPLER_SPECS, network_evaluations
from flows.pruning import make_pruner

STUDY_DIR = Path(".optuna")
JOURNAL = "journal.log"
# A running trial whose heartbeat is this many intervals old belongs to a dead worker.
GRACE_BEATS = 3
# How long a storage call waits for a database that went away (a restart) to come back.
STORE_OUTAGE_S = 120.0
OUTAGE_POLL_S = 2.0
# The states sweep.max_trials counts: a trial that took or takes a slot.
COUNTED_STATES = ("COMPLETE", "PRUNED", "RUNNING")

T = TypeVar("T")


def open_storage(
    storage: str | None, root: Path, cfg: SweepParams, on_stale: Callable[[Any, Any], None] | None = None
) -> Any:
    """``None`` or ``journal:<path>``: a journal file (relative to the repo); else Optuna's RDB storage.

    An RDB storage checks each pooled connection before use (a restarted database
    server cut them) and records heartbeats every ``cfg.heartbeat_s``: a trial
    :data:`GRACE_BEATS` beats late is failed, ``on_stale(study, trial)`` is called, and
    the trial is retried up to ``cfg.trial_retries`` times.
    """
    import optuna

    if storage is not None and not storage.startswith("journal:"):
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.trial_retries)

        def stale(study: Any, trial: Any) -> None:
            if on_stale is not None:
                on_stale(study, trial)
            retry(study, trial)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=cfg.heartbeat_s,
                grace_period=GRACE_BEATS * cfg.heartbeat_s, heartbeat_stale_trial_callback=stale,
            )
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage.removeprefix("journal:")) if storage else STUDY_DIR / JOURNAL
    path = path if path.is_absolute() else root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(
    cfg: SweepParams, root: Path, study_name: str, storage: str | None, concurrency: int,
    on_stale: Callable[[Any, Any], None] | None = None,
):
    """Create the study, or load it when one of that name exists (its trials go on counting).

    ``on_stale(study, trial)``: called for each trial failed for its dead worker (:func:`open_storage`).
    """
    import optuna

    return through_outage(lambda: optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage, root, cfg, on_stale),
        directions=["minimize"] * len(cfg.objectives),
        sampler=optuna.samplers.TPESampler(constant_liar=concurrency > 1),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    ))


def _lost_connection(err: BaseException) -> bool:
    """The database went away (Optuna wraps SQLAlchemy's error): the call may succeed later."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import InterfaceError, OperationalError

    cause = err.__cause__ if isinstance(err, StorageInternalError) else err
    return isinstance(cause, (OperationalError, InterfaceError))


def through_outage(call: Callable[[], T], log: Callable[[str], Any] | None = None) -> T:
    """``call()``, again every :data:`OUTAGE_POLL_S` while the database is unreachable, for up to
    :data:`STORE_OUTAGE_S`; any other error, or a longer outage, is raised."""
    deadline = time.monotonic() + STORE_OUTAGE_S
    while True:
        try:
            return call()
        except Exception as err:
            if not _lost_connection(err) or time.monotonic() > deadline:
                raise
            if log is not None:
                log(f"optuna storage unreachable ({type(err.__cause__ or err).__name__}); retrying")
            time.sleep(OUTAGE_POLL_S)


def ask(study: Any, max_trials: int | None, log: Callable[[str], Any]) -> Any:
    """A new trial, or None once the study has ``max_trials`` (:func:`trials_counted`).

    First, as ``study.optimize`` does, the trials of dead workers are failed (and so retried).
    """
    import optuna

    with warnings.catch_warnings():  # "heartbeat ... supposed to be used with Study.optimize": ask/tell keeps its own
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        through_outage(lambda: optuna.storages.fail_stale_trials(study), log)
        if max_trials is not None and (counted := trials_counted(study)) >= max_trials:
            log(f"sweep.max_trials: the study has {counted} trials (complete, pruned, running) of {max_trials}; "
                "no more from this run")
            return None
        return through_outage(study.ask, log)


def retried_trial(trial: Any) -> int | None:
    """The number of the trial that ``trial`` retries (its first try, whose worker died), or None."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial.storage.get_trial(trial._trial_id))


def trials_counted(study: Any) -> int:
    """The study's trials that count against ``sweep.max_trials``, on every worker: complete,
    pruned and running. A failed one does not: its retry, when it runs, counts once."""
    from optuna.trial import TrialState

    states = tuple(TrialState[name] for name in COUNTED_STATES)
    return len(through_outage(lambda: study.get_trials(deepcopy=False, states=states)))


class Heartbeat:
    """Records a running trial's heartbeat every interval from a thread (a storage without
    heartbeats: nothing), until :meth:`stop`. A database away for a while delays beats; it
    does not end them."""

    def __init__(self, trial: Any, log: Callable[[str], Any]) -> None:
        storage = trial.storage
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread = None
        if interval is not None:
            def beat() -> None:
                while True:
                    through_outage(lambda: storage.record_heartbeat(trial._trial_id), log)
                    if self._stop.wait(interval):
                        return

            self._thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _label(choice: Any) -> Any:
    """Optuna's categorical choices are scalars: a list choice (``channel_mult``) travels as JSON."""
    return json.dumps(choice) if isinstance(choice, (list, dict)) else choice


SUGGEST: dict[str, Callable[[Any, str, SearchDim], Any]] = {
    "categorical": lambda trial, key, dim: {_label(c): c for c in dim.choices}[
        trial.suggest_categorical(key, [_label(c) for c in dim.choices])
    ],
    "int": lambda trial, key, dim: trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log),
    "float": lambda trial, key, dim: trial.suggest_float(key, dim.low, dim.high, log=dim.log),
}


# key -> (the param it acts through, whether that param's value lets it act, why not). A
# dimension whose param the space itself searches is kept: some trials may use it.
NEEDS: dict[str, tuple[str, Callable[[Params], bool], str]] = {
    key: ("model.conditioning", lambda params: params.model.conditioning != "none",
          "classifier-free guidance needs a conditional model, and model.conditioning is none")
    for key in ("sample.guidance_scale", "sample.guidance_interval")
} | {
    "sample.eta": ("sample.sampler", lambda params: SAMPLER_SPECS[params.sample.sampler].takes_eta,
                   f"the samplers that take eta are {', '.join(k for k, v in SAMPLER_SPECS.items() if v.takes_eta)}, "
                   "and sample.sampler is not one of them"),
} | {
    f"sample.{key}": ("sample.sampler", lambda params, key=key: key in SAMPLER_SPECS[params.sample.sampler].options,
                      f"the samplers that take {key} are {', '.join(k for k, v in SAMPLER_SPECS.items() if key in v.options)}, "
                      "and sample.sampler is not one of them")
    for key in CHURN_OPTIONS
}


def searched_space(params: Params) -> tuple[dict[str, SearchDim], dict[str, str]]:
    """``sweep.space`` less the dimensions that have no meaning for ``params`` (:data:`NEEDS`),
    and those dropped, each with why."""
    space, dropped = dict(params.sweep.space), {}
    for key, (through, acts, why) in NEEDS.items():
        if key in space and through not in space and not acts(params):
            dropped[key] = why
            del space[key]
    if "model.name" not in space:  # else every choice takes them (diffusion.config checks)
        name, takes = params.model.name, family(params.model.name).overridable
        for key in [k for k in space if k.startswith("model.overrides.")]:
            if key.removeprefix("model.overrides.") not in takes:
                dropped[key] = f"{name} (a {FAMILY_OF[name]}) has no such argument; it takes {', '.join(takes)}"
                del space[key]
    return space, dropped


def suggest(trial: Any, space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """One value per dimension: the trial's params.yaml overrides."""
    return {key: SUGGEST[dim.type](trial, key, dim) for key, dim in space.items()}


# Each objective from the trial's metrics/evaluate.json and its validated params; all minimised.
OBJECTIVES: dict[str, Callable[[Mapping[str, float], Params], float]] = {
    "fid": lambda metrics, params: float(metrics["fid"]),
    "sampling_cost": lambda metrics, params: float(
        network_evaluations(params.sample.sampler, params.sample.steps, params.sample.guidance_scale)
    ),
    "text_error": lambda metrics, params: float(metrics["text_error"]),
}
