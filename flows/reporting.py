"""What a sweep writes to MLflow: its parent run, each trial's run, the study's plots and best trials.

The sweep owns a parent run, and each trial a run nested under it (see
:mod:`flows.sweep`). A trial's run gets the params no stage logged; the parent run
gets Optuna's plots, the trials table and the best trial(s).
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from prefect import get_run_logger

from diffusion.config import Params, SweepParams


def mlflow_client(uri: str):
    from diffusion.tracking import mlflow_client as client  # a new SQLite store is created under its lock

    return client(uri)


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


def end_stale_run(client: Any, trial: Any, logger: Any) -> None:
    """The MLflow run of a trial failed for its dead worker (a stale heartbeat): FAILED, tagged why."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    logger.warning(f"trial {trial.number}: its worker stopped sending heartbeats; FAIL, to be retried")
    if not run_id or client.get_run(run_id).info.status != "RUNNING":
        return
    client.set_tag(run_id, "sweep.state", "FAIL")
    client.set_tag(run_id, "sweep.error", "its worker stopped sending heartbeats (killed, or its host lost)")
    client.set_terminated(run_id, "FAILED")


def log_missing_params(client: Any, run_id: str, params: Params, logged: Mapping[str, str]) -> None:
    """The trial's params that no stage logged (a stage restored from the run cache logs
    nothing), flattened as the stages flatten them, so every trial compares in the UI."""
    from mlflow.entities import Param

    from diffusion.tracking import flatten

    flat = flatten(params.model_dump(exclude={"sweep", "tracking"}))
    missing = [Param(key, value[:6000]) for key, value in flat.items() if key not in logged]
    for start in range(0, len(missing), 100):
        client.log_batch(run_id, params=missing[start : start + 100])


def log_study_plots(study: Any, client: Any, run_id: str, objectives: list[str]) -> list[str]:
    """Optuna's history, importances and parallel coordinates (and the Pareto front) as
    interactive HTML (``optuna.visualization``, plotly).

    Each file embeds plotly.js, so it opens in the MLflow UI, or from disk, without the
    internet. The trials table goes along as CSV. A plot Optuna fails to draw is skipped
    with a warning (with no complete trial yet, Optuna draws it empty, and says so).
    """
    import optuna
    from optuna import visualization as plots

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
                figure = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                logger.warning(f"optuna plot {name}: {err}")
                continue
        client.log_figure(run_id, figure, f"optuna/{name}.html", save_kwargs={"include_plotlyjs": True})
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
             "fid_interval": [t.user_attrs.get("fid_low"), t.user_attrs.get("fid_high")],
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "dvc_experiment": t.user_attrs.get("dvc_experiment")}
            for t in front
        ]
        first = min(front, key=lambda t: t.values[0])
        metrics += [Metric(f"best_{name}", v, now, step) for name, v in zip(objectives, first.values)]
        metrics += [Metric(f"best_{key}", first.user_attrs[key], now, step) for key in ("fid_low", "fid_high") if key in first.user_attrs]
        client.set_tag(run_id, "sweep.best_trial", str(first.number))
        client.set_tag(run_id, "sweep.best_run_id", first.user_attrs.get("mlflow_run_id", ""))
    client.log_batch(run_id, metrics=metrics)
    return {"counts": dict(counts), "best": best}
