"""train-sweep: an Optuna study over params.yaml's ``sweep.space``, each trial a DVC experiment.

- **Study**: ``sweep.study_name`` in ``sweep.storage``: a journal file in ``.optuna/``
  by default, an RDB URL (``sqlite:///...``, ``postgresql://...``) or
  ``journal:<path>`` for many workers. Running again with the same name continues it.
- **Trial**: Optuna suggests a value for every key of ``sweep.space``; the trial is
  ``dvc exp run --temp --name <study>-<n> -S key=value ...``, a real experiment in
  ``dvc exp show``. Trials that differ only in sample params restore ``train`` from
  DVC's run cache instead of training again.
- **Objectives**: ``fid`` (``metrics/evaluate.json``), minimised; with
  ``sweep.objectives: [fid, sampling_cost]`` also the sampler's network evaluations
  per image (``sample.steps``), and the study keeps a Pareto front.
- **MLflow**: the sweep owns a parent run; each trial owns a run nested under it
  (tag ``mlflow.parentRunId``), tagged with its number and params, that its stages
  log into (``MLFLOW_RUN_ID``). The study's plots go to the parent run.
- **Pruning**: ``train`` logs ``loss`` every ``log_every`` steps into the trial's run;
  the flow polls that history, reports it to Optuna's MedianPruner and stops the
  experiment when told to prune.
- **Concurrency**: ``sweep.concurrency`` trials at once, each a Prefect task; slot i
  gets the i-th GPU of the worker's ``CUDA_VISIBLE_DEVICES``. Workers that each own a
  GPU share one study through its storage: run the deployment once per worker.
- **Failures**: a trial that crashes or ends in NaN is FAIL in Optuna and FAILED in
  MLflow, and the sweep goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from diffusion import protocol, tracking
from diffusion.config import Params, SearchDim, SweepParams, parse_params
from diffusion.stages.paths import FID_PROTOCOL
from flows.commands import apply_overrides, check, command_env, run_command, set_args, tracking_uri
from flows.pipeline import dvc, stage_order

STUDY_DIR = Path(".optuna")
JOURNAL = "journal.log"
EVALUATE_METRICS = "metrics/evaluate.json"
MODEL_RUN_FILE = "models/run.json"
LOSS_METRIC = "loss"
POLL_S = 2.0
# Stages every trial shares unless the space changes their params section: run once,
# before concurrent trials start.
SHARED_STAGES = {"prepare": "data"}


class TrialFailed(RuntimeError):
    """A trial's experiment failed or gave a non-finite objective."""


# ---------------------------------------------------------------------------
# Study: storage, search space, objectives
# ---------------------------------------------------------------------------


def open_storage(storage: str | None, root: Path) -> Any:
    """``None`` or ``journal:<path>``: a journal file (relative to the repo); else an RDB URL for Optuna."""
    if storage is not None and not storage.startswith("journal:"):
        return storage
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage.removeprefix("journal:")) if storage else STUDY_DIR / JOURNAL
    path = path if path.is_absolute() else root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def pruning(cfg: SweepParams) -> bool:
    """Optuna prunes single-objective studies only."""
    return cfg.pruning and len(cfg.objectives) == 1


def open_study(cfg: SweepParams, params: Params, root: Path, study_name: str, storage: str | None, concurrency: int):
    """Create the study, or load it when one of that name exists (its trials go on counting)."""
    import optuna

    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if pruning(cfg):
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=params.train.steps // 4)
    return optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage, root),
        directions=["minimize"] * len(cfg.objectives),
        sampler=optuna.samplers.TPESampler(constant_liar=concurrency > 1),
        pruner=pruner,
        load_if_exists=True,
    )


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


def suggest(trial: Any, space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """One value per dimension: the trial's params.yaml overrides."""
    return {key: SUGGEST[dim.type](trial, key, dim) for key, dim in space.items()}


# Each objective from the trial's metrics/evaluate.json and its validated params; all minimised.
OBJECTIVES: dict[str, Callable[[Mapping[str, float], Params], float]] = {
    "fid": lambda metrics, params: float(metrics["fid"]),
    "sampling_cost": lambda metrics, params: float(params.sample.steps),  # network evaluations per image
}


# ---------------------------------------------------------------------------
# MLflow: the sweep's parent run and the trials' runs
# ---------------------------------------------------------------------------


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_parent_run(client: Any, exp_id: str, study: Any, cfg: SweepParams) -> str:
    """The sweep's run: the study's own (a continued study keeps nesting under it) or a new one."""
    from mlflow.exceptions import MlflowException

    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            if client.get_run(run_id).info.experiment_id == exp_id:
                client.update_run(run_id, status="RUNNING")
                return run_id
        except MlflowException:
            pass  # another tracking store: start a parent run in this one
    run = client.create_run(
        exp_id,
        run_name=f"sweep-{study.study_name}",
        tags={
            "sweep.study": study.study_name,
            "sweep.role": "parent",
            "sweep.objectives": json.dumps(list(cfg.objectives)),
            "sweep.space": json.dumps({k: v.model_dump(exclude_defaults=True) for k, v in cfg.space.items()}),
        },
    )
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def log_missing_params(client: Any, run_id: str, params: Params, logged: Mapping[str, str]) -> None:
    """The trial's params that no stage logged (a stage restored from the run cache logs
    nothing), flattened as the stages flatten them, so every trial compares in the UI."""
    from mlflow.entities import Param

    from diffusion.tracking import flatten

    flat = flatten(params.model_dump(exclude={"sweep", "tracking"}))
    missing = [Param(key, value[:6000]) for key, value in flat.items() if key not in logged]
    for start in range(0, len(missing), 100):
        client.log_batch(run_id, params=missing[start : start + 100])


@dataclass
class LossReporter:
    """Reports the training loss in the trial's MLflow run to Optuna; True when the trial should stop."""

    trial: Any
    client: Any
    run_id: str
    last_step: int = -1

    def __call__(self) -> bool:
        history = self.client.get_metric_history(self.run_id, LOSS_METRIC)
        new = sorted((m.step, m.value) for m in history if m.step > self.last_step and math.isfinite(m.value))
        for step, value in new:
            self.trial.report(value, step)
            self.last_step = step
        return bool(new) and self.trial.should_prune()


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


@dataclass(frozen=True)
class TrialResult:
    number: int
    state: str  # "complete" or "pruned"
    run_id: str
    values: list[float] = field(default_factory=list)


def experiment_name(study_name: str, number: int) -> str:
    """A git-ref-safe name for ``dvc exp show``: ``<study>-<trial number>``."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', study_name).strip('-') or 'sweep'}-{number}"


def read_experiment(root: Path, name: str) -> tuple[dict[str, float] | None, dict | None, str | None]:
    """The experiment's ``metrics/evaluate.json``, its ``metrics/protocol.json`` and the
    model run in its ``models/run.json``."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    fs = DVCFileSystem(str(root), rev=name)

    def read(path: str) -> dict | None:
        try:
            return json.loads(fs.read_text(path))
        except (FileNotFoundError, DvcException):
            return None

    model = read(MODEL_RUN_FILE)
    return read(EVALUATE_METRICS), read(str(FID_PROTOCOL)), (model or {}).get("run_id")


@task(cache_policy=NO_CACHE, task_run_name="trial-{number}")
def run_trial(number: int, trial: Any, overrides: dict[str, Any], sweep: Sweep, gpu: str | None) -> TrialResult:
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
            **{f"sweep.param.{key}": json.dumps(value) for key, value in overrides.items()},
        },
    )
    run_id = run.info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("dvc_experiment", name)
    logger.info(f"trial {number}: {json.dumps(overrides)} -> MLflow run {run_id}, experiment {name}")
    status, state = "FAILED", "FAIL"
    try:
        cmd = ["dvc", "exp", "run", "--temp", "--name", name, *set_args(overrides, sweep.raw_params)]
        reporter = LossReporter(trial, client, run_id) if sweep.pruning else None
        env = command_env(sweep.root, run_id=run_id, gpu=gpu)
        outcome = run_command(cmd, cwd=sweep.root, env=env, log=logger.info, watch=reporter, every=POLL_S)
        if outcome.stopped:
            status, state = "KILLED", "PRUNED"
            logger.info(f"trial {number}: pruned at step {reporter.last_step}")
            return TrialResult(number, "pruned", run_id)
        check(outcome, cmd)
        metrics, recorded, model_run = read_experiment(sweep.root, name)
        if metrics is None:
            # A repository that git-ignores metrics/ commits experiments without it: take what evaluate logged.
            logger.warning(f"trial {number}: {EVALUATE_METRICS} is not in experiment {name}; using the run's metrics")
            metrics = client.get_run(run_id).data.metrics
        if model_run and model_run != run_id:
            client.set_tag(run_id, "train.model_run_id", model_run)  # train came from DVC's run cache
        params = parse_params(apply_overrides(sweep.raw_params, overrides), f"trial {number}")
        try:
            values = [OBJECTIVES[objective](metrics, params) for objective in sweep.objectives]
        except KeyError as err:
            raise TrialFailed(f"trial {number}: no {err} in {EVALUATE_METRICS}") from None
        if not all(math.isfinite(v) for v in values):
            raise TrialFailed(f"trial {number}: objectives {dict(zip(sweep.objectives, values))} are not finite")
        logged = client.get_run(run_id).data
        for objective, value in zip(sweep.objectives, values):
            if objective not in logged.metrics:
                client.log_metric(run_id, objective, value)
        if recorded and protocol.DIGEST_TAG not in logged.tags:
            # evaluate came from DVC's run cache: its FID protocol from the experiment's file
            for key, value in protocol.to_tags(recorded).items():
                client.set_tag(run_id, key, value)
        log_missing_params(client, run_id, params, logged.params)
        status, state = "FINISHED", "COMPLETE"
        return TrialResult(number, "complete", run_id, values)
    except BaseException as err:
        client.set_tag(run_id, "sweep.error", f"{type(err).__name__}: {err}"[:5000])
        raise
    finally:
        client.set_tag(run_id, "sweep.state", state)
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------


def gpu_slots() -> list[str]:
    """The worker's GPUs (``CUDA_VISIBLE_DEVICES``); none: trials keep the worker's device."""
    return [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def run_trials(study: Any, sweep: Sweep, space: Mapping[str, SearchDim], n_trials: int, concurrency: int) -> dict[int, str]:
    """Ask, run and tell ``n_trials`` trials, at most ``concurrency`` at once; their end states."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    gpus = gpu_slots()
    free = list(range(concurrency))
    running: dict[Any, tuple[Any, int]] = {}
    states: dict[int, str] = {}
    started = 0
    while started < n_trials or running:
        while free and started < n_trials:
            slot = free.pop(0)
            trial = study.ask()
            started += 1
            try:
                overrides = suggest(trial, space)
            except (ValueError, KeyError) as err:  # an enqueued value outside the space
                logger.error(f"trial {trial.number}: {err}")
                study.tell(trial, state=TrialState.FAIL)
                states[trial.number] = "FAIL"
                free.append(slot)
                continue
            gpu = gpus[slot % len(gpus)] if gpus else None
            running[run_trial.submit(trial.number, trial, overrides, sweep, gpu)] = (trial, slot)
        if not running:
            continue
        future = next(as_completed(list(running)))
        future.wait()  # sets the final state; before it, .state may still be the API's "Running"
        trial, slot = running.pop(future)
        free.append(slot)
        if future.state.is_completed():
            result: TrialResult = future.result()
            if result.state == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, result.values)
            states[trial.number] = result.state.upper()
        else:
            logger.warning(f"trial {trial.number} failed: {future.state.message}; the sweep goes on")
            study.tell(trial, state=TrialState.FAIL)
            states[trial.number] = "FAIL"
    return states


def log_study_plots(study: Any, client: Any, run_id: str, objectives: list[str]) -> list[str]:
    """Optuna's history, importances and parallel coordinates (and the Pareto front) as PNGs.

    plotly is not installed, so these are ``optuna.visualization.matplotlib``; the
    trials table goes along as CSV. A plot the study cannot draw yet (too few
    complete trials) is skipped with a warning.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    logger = get_run_logger()
    target = None if len(objectives) == 1 else (lambda t: t.values[0])
    figures: dict[str, Callable[[], Any]] = {
        "history": lambda: plots.plot_optimization_history(study, target=target, target_name=objectives[0]),
        "importances": lambda: plots.plot_param_importances(study, target=target, target_name=objectives[0]),
        "parallel_coordinates": lambda: plots.plot_parallel_coordinate(study, target=target, target_name=objectives[0]),
    }
    if len(objectives) > 1:
        figures["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=objectives)
    logged = []
    for name, draw in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                logger.warning(f"optuna plot {name}: {err}")
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        client.log_figure(run_id, figure, f"optuna/{name}.png", save_kwargs={"bbox_inches": "tight", "dpi": 120})
        plt.close(figure)
        logged.append(name)
    client.log_text(run_id, study.trials_dataframe().to_csv(index=False), "optuna/trials.csv")
    return logged


def summarize(study: Any, client: Any, run_id: str, objectives: list[str], ran: Mapping[int, str]) -> dict[str, Any]:
    """The best trial(s) onto the parent run as metrics and tags; the summary the flow returns.

    ``ran``: this flow run's trials, whose first objective goes on the ``trial_<objective>`` curve.
    """
    from mlflow.entities import Metric

    counts = Counter(t.state.name for t in study.trials)
    now, step = int(time.time() * 1000), len(study.trials)
    metrics = [Metric(f"trials_{state.lower()}", n, now, step) for state, n in counts.items()]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    metrics += [Metric(f"trial_{objectives[0]}", t.values[0], now, t.number) for t in complete if t.number in ran]
    best: list[dict[str, Any]] = []
    if complete:
        front = study.best_trials if len(objectives) > 1 else [study.best_trial]
        best = [
            {"number": t.number, "values": dict(zip(objectives, t.values)), "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "dvc_experiment": t.user_attrs.get("dvc_experiment")}
            for t in front
        ]
        first = min(front, key=lambda t: t.values[0])
        metrics += [Metric(f"best_{name}", v, now, step) for name, v in zip(objectives, first.values)]
        client.set_tag(run_id, "sweep.best_trial", str(first.number))
        client.set_tag(run_id, "sweep.best_run_id", first.user_attrs.get("mlflow_run_id", ""))
    client.log_batch(run_id, metrics=metrics)
    return {"counts": dict(counts), "best": best}


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
    repository root. Returns the trial states, the best trial(s) and the parent run.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    params = parse_params(raw, str(root / "params.yaml"))
    cfg = params.sweep
    if not cfg.space:
        raise ValueError("params.yaml: sweep.space is empty; declare at least one dimension to search")
    n_trials = n_trials or cfg.n_trials
    concurrency = max(1, min(concurrency or cfg.concurrency, n_trials))
    study_name = study_name or cfg.study_name
    study = open_study(cfg, params, root, study_name, storage or cfg.storage, concurrency)
    for fixed in enqueue or []:
        study.enqueue_trial(fixed)

    uri = tracking_uri(root)
    client = mlflow_client(uri)
    exp_id = tracking.experiment_id(params.tracking.experiment, uri)
    parent = open_parent_run(client, exp_id, study, cfg)
    logger.info(f"study {study_name!r}: {n_trials} trials, {concurrency} at once; MLflow parent run {parent}")
    status = "FAILED"
    try:
        # Concurrent trials would each run the stages they share; one trial at a time runs
        # them once, and DVC's run cache serves the rest.
        if concurrency > 1:
            stages = stage_order(root)
            for stage, section in SHARED_STAGES.items():
                if stage in stages and not any(key.split(".")[0] == section for key in cfg.space):
                    dvc(f"dvc repro {stage}", ["repro", stage], str(root))
        sweep = Sweep(
            root=root,
            study_name=study_name,
            objectives=list(cfg.objectives),
            raw_params=raw,
            tracking_uri=uri,
            experiment_id=exp_id,
            parent_run_id=parent,
            pruning=pruning(cfg),
        )
        states = run_trials(study, sweep, cfg.space, n_trials, concurrency)
        summary = summarize(study, client, parent, sweep.objectives, states)
        log_study_plots(study, client, parent, sweep.objectives)
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status)
    if "COMPLETE" not in states.values() and "FAIL" in states.values():
        raise TrialFailed(f"no trial of this run completed: {states}")
    return {"study": study_name, "parent_run_id": parent, "trials": states, **summary}


if __name__ == "__main__":
    train_sweep()
