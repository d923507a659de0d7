"""train-sweep: an Optuna study over params.yaml's ``sweep.space``, each trial a DVC experiment.

- **Study** (:mod:`flows.study`): ``sweep.study_name`` in ``sweep.storage``; running
  again with the same name continues it. Objectives ``fid``, or ``[fid, sampling_cost]``
  for a Pareto front against network evaluations per image.
- **Trial**: Optuna suggests a value for every key of ``sweep.space`` (less those that
  mean nothing for the config, :func:`flows.study.searched_space`, each dropped with a
  log line); the trial is
  ``dvc exp run --temp --name <study>-<n> -S key=value ...``, a real experiment in
  ``dvc exp show``. Trials that differ only in sample params restore ``train`` from
  DVC's run cache instead of training again. A run that fails on a DVC lock (another
  trial's DVC holds it) runs again after a backoff.
- **MLflow** (:mod:`flows.reporting`): the sweep owns a parent run; each trial owns a
  run nested under it (tag ``mlflow.parentRunId``), tagged with its number and params,
  that its stages log into (``MLFLOW_RUN_ID``). The study's plots go to the parent run.
  A local SQLite store takes concurrent trials: MLflow's sessions wait out each other's
  writes (SQLite's busy timeout).
- **Pruning** (:mod:`flows.pruning`): the flow polls the trial's ``val_loss`` (``sweep.prune_on``), reports
  it to Optuna's MedianPruner and stops the experiment when told to prune.
- **Concurrency** (:mod:`flows.devices`): ``sweep.concurrency`` trials at once, each a
  Prefect task. Each trial leases one of the worker's GPUs (``CUDA_VISIBLE_DEVICES``)
  host-wide, waiting while all are held; on a CPU each gets its share of the cores.
  Workers share one study through its storage.
- **Failures**: a trial that crashes or ends in NaN is FAIL in Optuna and FAILED in
  MLflow, and the sweep goes on. On an RDB storage a trial whose worker died (its
  heartbeat stopped, :mod:`flows.study`) is FAIL and FAILED too, and is retried.
- **Many hosts** (:mod:`flows.remote`): with a default DVC remote, each trial fetches the
  runs it can restore and pushes its own, so hosts share data, run cache and models.
  ``sweep.max_trials`` caps the study's trials across every worker.
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from diffusion import tracking
from diffusion.evaluation import protocol
from diffusion.config import SearchDim, merge_params, parse_params
from diffusion.stages.paths import EVALUATE_METRICS, FID_PROTOCOL, MODEL_RUN, SAMPLE_RUN
from flows import processes
from flows.commands import check, command_env, run_with_lock_retries, set_args
from flows.devices import available_cores, cpu_threads, lease_gpu, worker_gpus
from flows.pipeline import dvc, stage_order
from flows.pruning import PruningReporter, pruning
from flows.remote import fetch_run_cache, pull_args, push_runs
from flows.reporting import end_stale_run, log_missing_params, log_study_plots, mlflow_client, open_parent_run, summarize
from flows.study import (
    OBJECTIVES, Heartbeat, ask, open_study, retried_trial, searched_space, suggest, through_outage,
)

POLL_S = 2.0
INTERVAL_METRICS = ("fid_low", "fid_high", "fid_se")  # the evaluate stage's interval of its FID
# Stages every trial shares unless the space changes their params section: run once,
# before concurrent trials start.
SHARED_STAGES = {"prepare": "data"}


class TrialFailed(RuntimeError):
    """A trial's experiment failed or gave a non-finite objective."""


# ---------------------------------------------------------------------------
# One trial: a DVC experiment in a temporary copy of the repository
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """What every trial of this sweep shares."""

    root: Path
    study_name: str
    objectives: list[str]
    raw_params: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    pruning: bool
    concurrency: int  # trials at once in this flow run
    gpus: tuple[str, ...]  # the worker's, leased one per trial; none: the CPU
    max_trials: int | None = None  # the study's cap across workers (flows.study.trials_counted)


@dataclass(frozen=True)
class TrialResult:
    number: int
    state: str  # "complete" or "pruned"
    run_id: str
    values: list[float] = field(default_factory=list)


def experiment_name(study_name: str, number: int) -> str:
    """A git-ref-safe name for ``dvc exp show``: ``<study>-<trial number>``."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', study_name).strip('-') or 'sweep'}-{number}"


def read_experiment(root: Path, name: str) -> tuple[dict[str, float] | None, dict | None, str | None, str | None]:
    """The experiment's ``metrics/evaluate.json``, its ``metrics/protocol.json``, the
    model run in its ``models/run.json`` and the sample run in its ``samples/run.json``."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    fs = DVCFileSystem(str(root), rev=name)

    def read(path: str) -> dict | None:
        try:
            return json.loads(fs.read_text(path))
        except (FileNotFoundError, DvcException):
            return None

    model, sample = read(str(MODEL_RUN)), read(str(SAMPLE_RUN))
    return read(str(EVALUATE_METRICS)), read(str(FID_PROTOCOL)), (model or {}).get("run_id"), (sample or {}).get("run_id")


def trial_env(sweep: Sweep, number: int, run_id: str, gpu: str | None, log: Callable[[str], Any]) -> dict[str, str]:
    """The trial's command environment: its MLflow run, its GPU or, beside other CPU trials, its threads."""
    threads = None if gpu is not None else cpu_threads(sweep.concurrency)
    if gpu is not None:
        log(f"trial {number}: GPU {gpu}")
    elif threads is not None:
        log(f"trial {number}: {threads} of {available_cores()} CPU threads ({sweep.concurrency} trials at once)")
    return command_env(sweep.root, run_id=run_id, gpu=gpu, threads=threads)


@task(cache_policy=NO_CACHE, task_run_name="trial-{number}")
def run_trial(number: int, trial: Any, overrides: dict[str, Any], sweep: Sweep) -> TrialResult:
    """Run the trial's experiment under its own MLflow run; raise :class:`TrialFailed` on failure."""
    logger = get_run_logger()
    client = mlflow_client(sweep.tracking_uri)
    name = experiment_name(sweep.study_name, number)
    run = client.create_run(
        sweep.experiment_id,
        run_name=f"trial-{number}",
        tags={
            "mlflow.parentRunId": sweep.parent_run_id,
            "sweep.study": sweep.study_name,
            "sweep.trial": str(number),
            "dvc.experiment": name,
            "sweep.repo": f"{socket.gethostname()}:{sweep.root}",  # the worker's host and clone
            **{f"sweep.param.{key}": json.dumps(value) for key, value in overrides.items()},
        },
    )
    run_id = run.info.run_id
    retry_of = retried_trial(trial)
    if retry_of is not None:
        client.set_tag(run_id, "sweep.retry_of", str(retry_of))
    through_outage(lambda: trial.set_user_attr("mlflow_run_id", run_id), logger.info)
    through_outage(lambda: trial.set_user_attr("dvc_experiment", name), logger.info)
    logger.info(f"trial {number}: {json.dumps(overrides)} -> MLflow run {run_id}, experiment {name}")
    status, state = "FAILED", "FAIL"
    try:
        params = parse_params(merge_params(sweep.raw_params, overrides), f"trial {number}")
        cmd = ["dvc", "exp", "run", "--temp", *pull_args(sweep.root), "--name", name, *set_args(overrides, sweep.raw_params)]
        reporter = (
            PruningReporter.for_trial(trial, client, run_id, params.train.steps, params.sweep.prune_on) if sweep.pruning else None
        )
        fetch_run_cache(sweep.root, command_env(sweep.root), logger)  # before the lease: it needs no GPU
        with lease_gpu(sweep.gpus, holder=f"trial {number} of study {sweep.study_name}", log=logger.info) as gpu:
            env = trial_env(sweep, number, run_id, gpu, logger.info)
            outcome = run_with_lock_retries(cmd, cwd=sweep.root, env=env, log=logger.info, watch=reporter, every=POLL_S)
        if outcome.stopped:
            status, state = "KILLED", "PRUNED"
            logger.info(f"trial {number}: pruned at step {reporter.last_step}")
            return TrialResult(number, "pruned", run_id)
        check(outcome, cmd)
        if reporter is not None:
            reporter.report()  # the points logged after the last poll
        metrics, recorded, model_run, sample_run = read_experiment(sweep.root, name)
        if metrics is None:
            # A repository that git-ignores metrics/ commits experiments without it: take what evaluate logged.
            logger.warning(f"trial {number}: {EVALUATE_METRICS} is not in experiment {name}; using the run's metrics")
            metrics = client.get_run(run_id).data.metrics
        if model_run and model_run != run_id:
            client.set_tag(run_id, "train.model_run_id", model_run)  # train came from DVC's run cache
        if sample_run and sample_run != run_id:
            client.set_tag(run_id, "sample.run_id", sample_run)  # so did sample: its run holds a reconstructed EMA's model
        try:
            values = [OBJECTIVES[objective](metrics, params) for objective in sweep.objectives]
        except KeyError as err:
            raise TrialFailed(f"trial {number}: no {err} in {EVALUATE_METRICS}") from None
        if not all(math.isfinite(v) for v in values):
            raise TrialFailed(f"trial {number}: objectives {dict(zip(sweep.objectives, values))} are not finite")
        for key in INTERVAL_METRICS:  # the FID's interval beside the objective, in Optuna's dashboard too
            if key in metrics:
                through_outage(lambda key=key: trial.set_user_attr(key, metrics[key]), logger.info)
        logged = client.get_run(run_id).data
        for key, value in {**metrics, **dict(zip(sweep.objectives, values))}.items():
            if key not in logged.metrics and key != "num_samples":  # evaluate came from DVC's run cache
                client.log_metric(run_id, key, value)
        if recorded and protocol.DIGEST_TAG not in logged.tags:
            # evaluate came from DVC's run cache: its FID protocol and interval from the experiment's file
            interval = {f"{protocol.INTERVAL_TAG_PREFIX}{key}": str(value) for key, value in recorded.pop("interval", {}).items()}
            for key, value in (protocol.to_tags(recorded) | interval).items():
                client.set_tag(run_id, key, value)
        log_missing_params(client, run_id, params, logged.params)
        push_runs(sweep.root, env, logger)
        status, state = "FINISHED", "COMPLETE"
        return TrialResult(number, "complete", run_id, values)
    except BaseException as err:
        client.set_tag(run_id, "sweep.error", f"{type(err).__name__}: {err}"[:5000])
        if processes.interrupted(err):  # the flow was stopped (SIGINT, SIGTERM, cancelled)
            status = "KILLED"
        raise
    finally:
        client.set_tag(run_id, "sweep.state", state)
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------


def run_trials(study: Any, sweep: Sweep, space: Mapping[str, SearchDim], n_trials: int) -> dict[int, str]:
    """Ask, run and tell ``n_trials`` trials, at most ``sweep.concurrency`` at once; their end states.

    Fewer when the study reaches ``sweep.max_trials`` (counted on every worker before each ask).
    When the flow is stopped (SIGINT, SIGTERM, cancelled), the trials' commands are stopped
    (:func:`flows.processes.stop_all`) and the trials still running are FAIL, as Optuna's own
    ``optimize`` leaves an interrupted trial.
    """
    from optuna.trial import TrialState

    running: dict[Any, tuple[Any, Heartbeat]] = {}
    try:
        return _run_trials(study, sweep, space, n_trials, running)
    except BaseException as err:
        if processes.interrupted(err):
            processes.stop_all()
            for trial, heartbeat in running.values():
                heartbeat.stop()
                through_outage(lambda trial=trial: study.tell(trial, state=TrialState.FAIL, skip_if_finished=True),
                               get_run_logger().info)
        raise


def _run_trials(
    study: Any, sweep: Sweep, space: Mapping[str, SearchDim], n_trials: int, running: dict[Any, tuple[Any, Heartbeat]]
) -> dict[int, str]:
    from optuna.trial import TrialState

    logger = get_run_logger()
    states: dict[int, str] = {}
    started = 0

    def tell(trial: Any, heartbeat: Heartbeat, **result: Any) -> str:
        """The trial's end state in the study; a trial another worker failed (its heartbeat was
        late) keeps that state."""
        heartbeat.stop()
        return through_outage(lambda: study.tell(trial, skip_if_finished=True, **result), logger.info).state.name

    while started < n_trials or running:
        while len(running) < sweep.concurrency and started < n_trials:
            trial = ask(study, sweep.max_trials, logger.info)
            if trial is None:
                n_trials = started
                break
            heartbeat = Heartbeat(trial, logger.info)
            started += 1
            try:
                overrides = suggest(trial, space)
            except (ValueError, KeyError) as err:  # an enqueued value outside the space
                logger.error(f"trial {trial.number}: {err}")
                states[trial.number] = tell(trial, heartbeat, state=TrialState.FAIL)
                continue
            running[run_trial.submit(trial.number, trial, overrides, sweep)] = (trial, heartbeat)
        if not running:
            continue
        future = next(as_completed(list(running)))
        future.wait()  # sets the final state; before it, .state may still be the API's "Running"
        trial, heartbeat = running.pop(future)
        if future.state.is_completed():
            result: TrialResult = future.result()
            if result.state == "pruned":
                states[trial.number] = tell(trial, heartbeat, state=TrialState.PRUNED)
            else:
                states[trial.number] = tell(trial, heartbeat, values=result.values)
        else:
            logger.warning(f"trial {trial.number} failed: {future.state.message}; the sweep goes on")
            states[trial.number] = tell(trial, heartbeat, state=TrialState.FAIL)
    return states


@flow(name="train-sweep", log_prints=True)
def train_sweep(
    n_trials: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    concurrency: int | None = None,
    enqueue: list[dict[str, Any]] | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """Run ``n_trials`` more trials of the study in params.yaml's ``sweep`` section.

    Every argument left out comes from params.yaml. ``enqueue``: params to try first
    (Optuna's ``enqueue_trial``), e.g. ``[{"sample.steps": 50}]``. ``repo``: the
    repository root. Returns the trial states, the best trial(s), the parent run and
    the dimensions of ``sweep.space`` dropped (:func:`flows.study.searched_space`), each with why.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    params = parse_params(raw, str(root / "params.yaml"))
    space, dropped = searched_space(params)
    for key, why in dropped.items():
        logger.info(f"sweep.space: {key} dropped: {why}")
    cfg = params.sweep.model_copy(update={"space": space})
    if not cfg.space:
        raise ValueError("params.yaml: sweep.space is empty; declare at least one dimension to search")
    n_trials = n_trials or cfg.n_trials
    concurrency = max(1, min(concurrency or cfg.concurrency, n_trials))
    study_name = study_name or cfg.study_name
    uri = tracking.tracking_uri(root)
    client = mlflow_client(uri)
    study = open_study(cfg, root, study_name, storage or cfg.storage, concurrency,
                       on_stale=lambda study, trial: end_stale_run(client, trial, logger))
    for fixed in enqueue or []:
        through_outage(lambda: study.enqueue_trial(fixed), logger.info)

    exp_id = tracking.experiment_id(params.tracking.experiment, uri)
    parent = open_parent_run(client, exp_id, study, cfg)
    logger.info(f"study {study_name!r}: {n_trials} trials, {concurrency} at once; MLflow parent run {parent}")
    status = "FAILED"
    try:
        # Concurrent trials would each run the stages they share; one trial at a time runs
        # them once, and DVC's run cache serves the rest.
        if concurrency > 1:
            fetch_run_cache(root, command_env(root), logger)
            stages = stage_order(root)
            for stage, section in SHARED_STAGES.items():
                if stage in stages and not any(key.split(".")[0] == section for key in cfg.space):
                    dvc(f"dvc repro {stage}", ["repro", *pull_args(root), stage], str(root))
        sweep = Sweep(
            root=root,
            study_name=study_name,
            objectives=list(cfg.objectives),
            raw_params=raw,
            tracking_uri=uri,
            experiment_id=exp_id,
            parent_run_id=parent,
            pruning=pruning(cfg),
            concurrency=concurrency,
            gpus=tuple(worker_gpus()),
            max_trials=cfg.max_trials,
        )
        states = run_trials(study, sweep, cfg.space, n_trials)
        summary = summarize(study, client, parent, sweep.objectives, states)
        log_study_plots(study, client, parent, sweep.objectives)
        status = "FINISHED"
    except BaseException as err:
        if processes.interrupted(err):
            status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    if "COMPLETE" not in states.values() and "FAIL" in states.values():
        raise TrialFailed(f"no trial of this run completed: {states}")
    return {"study": study_name, "parent_run_id": parent, "trials": states, "dropped": dropped, **summary}


if __name__ == "__main__":
    processes.run_main(train_sweep)
