"""The flows under Prefect's test harness: a real sweep of tiny DVC experiments, promotion.

One sweep (module fixture) runs four trials of a tiny config in a temporary git + DVC
repository and every test reads what it left: the Optuna journal, ``dvc exp show``,
the nested MLflow runs, then promotes by FID. Trials 0 and 2 differ only in
``sample.steps``, so trial 2 restores ``train`` from DVC's run cache; trial 1 asks for
more sampler steps than timesteps and fails validation before it runs; a second run of
the flow (trial 3) continues the study.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_PARAMS, full_params, make_pipeline_repo, run_in

STUDY = "tiny"
# TINY_PARAMS cut further: a trial trains 6 steps (loss logged every 2) and scores 16 samples.
SWEEP_PARAMS = {
    **TINY_PARAMS,
    "train": {**TINY_PARAMS["train"], "steps": 6, "log_every": 2, "checkpoint_every": 6, "bpd_images": 0},
    "sample": {"num_samples": 16, "batch_size": 16, "steps": 2, "grid_rows": 4},
    "evaluate": {"kid": False, "batch_size": 16, "digit_classifier_steps": 20},
    "sweep": {
        "study_name": STUDY,
        "n_trials": 2,
        "concurrency": 1,
        "space": {"sample.steps": {"type": "int", "low": 2, "high": 1000}},
    },
}
FIRST_RUN = [{"sample.steps": 2}, {"sample.steps": 1000}, {"sample.steps": 4}]  # 1000 > timesteps: fails


def make_sweep_repo(path: Path, cache: Path, params: dict | None = None) -> Path:
    """The shared pipeline repo plus flows/ and prefect.yaml, on a shared DVC cache."""
    repo = make_pipeline_repo(path, params or SWEEP_PARAMS)
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    run_in(repo, "dvc", "config", "--local", "cache.dir", str(cache))
    run_in(repo, "git", "add", "-A")
    run_in(repo, "git", "commit", "-qm", "flows")
    return repo


def experiments(repo: Path) -> dict[str, dict]:
    """``dvc exp show``: each experiment's name -> its metrics files."""
    shown = json.loads(run_in(repo, "dvc", "exp", "show", "--json").stdout)
    return {rev["name"]: rev["data"]["metrics"] for base in shown for exp in base.get("experiments") or [] for rev in exp["revs"]}


def experiment_names(repo: Path) -> set[str]:
    return set(experiments(repo))


# ---------------------------------------------------------------------------
# Fast: overrides and pruning, no pipeline
# ---------------------------------------------------------------------------


def test_overrides_use_hydra_syntax_and_add_missing_keys():
    from diffusion.config import merge_params
    from flows.commands import set_args

    raw = {"train": {"lr": 0.002}, "model": {"overrides": {}}}
    args = set_args({"train.lr": 0.001, "model.overrides.channel_mult": [1, 2], "diffusion.schedule": "linear"}, raw)
    assert args == ["-S", "train.lr=0.001", "-S", "++model.overrides.channel_mult=[1,2]", "-S", "++diffusion.schedule=linear"]
    merged = merge_params(raw, {"model.overrides.num_res_blocks": 2})
    assert merged["model"]["overrides"] == {"num_res_blocks": 2} and raw["model"]["overrides"] == {}


def test_sampling_cost_is_network_evaluations_per_image():
    """The objective is what the sampler table says each sampler costs, not its step count."""
    from diffusion.config import parse_params
    from diffusion.sampling.specs import SAMPLER_SPECS
    from flows.study import OBJECTIVES

    flow = {"process": "flow", "schedule": None, "prediction": None}  # euler and sde step in its own time
    for name, spec in SAMPLER_SPECS.items():
        params = parse_params(full_params({"sample": {"sampler": name, "steps": 7, "guidance_scale": 1.0},
                                           "diffusion": flow if spec.continuous_only else {}}))
        assert OBJECTIVES["sampling_cost"]({}, params) == spec.nfe(7) > 0
    guided = parse_params(full_params({"model": {"conditioning": "class"}, "sample": {"steps": 7, "guidance_scale": 3.0}}))
    assert OBJECTIVES["sampling_cost"]({}, guided) == 14  # the conditional and unconditional pass


def test_guidance_is_not_searched_for_an_unconditional_model():
    """The committed space searches sample.guidance_scale: only a class-conditional model keeps it."""
    from diffusion.config import parse_params
    from flows.study import searched_space

    unconditional = parse_params(full_params(
        {"model": {"conditioning": "none"}, "sample": {"sampler": "ddim", "guidance_scale": 1.0}}
    ))
    assert "sample.guidance_scale" in unconditional.sweep.space and unconditional.model.conditioning == "none"
    space, dropped = searched_space(unconditional)
    assert dropped == {"sample.guidance_scale": "classifier-free guidance needs a conditional model, "
                                                "and model.conditioning is none"}
    assert set(space) == set(unconditional.sweep.space) - {"sample.guidance_scale"}
    conditional = parse_params(full_params({"model": {"conditioning": "class"}, "sample": {"sampler": "ddim"}}))
    assert searched_space(conditional) == (dict(conditional.sweep.space), {})
    either = {"model.conditioning": {"type": "categorical", "choices": ["none", "class"]},
              "sample.guidance_scale": {"type": "float", "low": 1.0, "high": 4.0}}
    assert set(searched_space(parse_params(full_params({"sweep": {"space": either}})))[0]) == set(either)


def test_eta_is_not_searched_for_a_sampler_that_does_not_take_it():
    """The committed space searches sample.eta while the committed sampler is ddpm, which
    ignores eta: the sweep drops it (one reason). A ddim config keeps it, and so does a space
    that searches the sampler too."""
    from diffusion.config import parse_params
    from flows.study import searched_space

    committed = parse_params(full_params())
    assert committed.sample.sampler == "ddpm" and "sample.eta" in committed.sweep.space
    space, dropped = searched_space(committed)
    assert dropped == {"sample.eta": "the samplers that take eta are ddim, and sample.sampler is not one of them"}
    assert set(space) == set(committed.sweep.space) - {"sample.eta"}
    ddim = parse_params(full_params({"sample": {"sampler": "ddim"}}))
    assert searched_space(ddim) == (dict(ddim.sweep.space), {})
    either = {"sample.sampler": {"type": "categorical", "choices": ["ddpm", "ddim"]},
              "sample.eta": {"type": "float", "low": 0.0, "high": 1.0}}
    assert set(searched_space(parse_params(full_params({"sweep": {"space": either}})))[0]) == set(either)


def test_edm_churn_is_searched_only_for_a_sampler_that_takes_it():
    from diffusion.config import parse_params
    from flows.study import searched_space

    churn = {"sample.s_churn": {"type": "float", "low": 0.0, "high": 40.0}}
    ddpm = parse_params(full_params({"sweep": {"space": churn}}))
    assert searched_space(ddpm) == ({}, {"sample.s_churn": "the samplers that take s_churn are heun, and sample.sampler is not one of them"})
    heun = parse_params(full_params({"sample": {"sampler": "heun"}, "sweep": {"space": churn}}))
    assert searched_space(heun) == (dict(heun.sweep.space), {})


def test_unet_arguments_are_not_searched_for_a_transformer():
    """The committed space searches model.overrides.num_res_blocks, a U-Net argument: a DiT drops
    it (one reason), a sweep over model.name keeps it only where every choice takes it."""
    from diffusion.config import ConfigError, parse_params
    from flows.study import searched_space

    dit = parse_params(full_params({"model": {"name": "dit-cpu"}, "sample": {"sampler": "ddim"}}))
    space, dropped = searched_space(dit)
    assert dropped == {"model.overrides.num_res_blocks": "dit-cpu (a dit) has no such argument; it takes "
                                                         "depth, hidden_size, patch_size, num_heads, mlp_ratio, text_attention"}
    assert set(space) == set(dit.sweep.space) - {"model.overrides.num_res_blocks"}
    both = {"model.name": {"type": "categorical", "choices": ["dit-cpu", "latent-diffit-cpu"]},
            "model.overrides.depth": {"type": "int", "low": 2, "high": 6}}
    assert searched_space(parse_params(full_params({"sweep": {"space": both}})))[1] == {}
    with pytest.raises(ConfigError, match="'model.overrides.depth' is not an argument of unet-small"):
        both["model.name"]["choices"].append("unet-small")
        parse_params(full_params({"sweep": {"space": both}}))


def plotly_traces(client, run_id: str, path: str, dst: Path) -> list[dict]:
    """The traces a plotly HTML artifact draws (its ``Plotly.newPlot`` data); the file
    carries plotly.js itself, so it opens without the internet."""
    html = Path(client.download_artifacts(run_id, path, str(dst))).read_text()
    embedded = re.search(r"\* plotly\.js v\d", html) and not re.search(r"<script[^>]*\ssrc=", html)
    assert embedded, f"{path}: plotly.js is not embedded"
    call = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    assert call, f"{path}: no plotly figure"
    return json.JSONDecoder().raw_decode(html, call.end())[0]


def log_points(client, run_id: str, key: str, points: dict[int, float]) -> None:
    for step, value in points.items():
        client.log_metric(run_id, key, value, step=step)


def test_pruning_compares_val_loss_from_a_quarter_of_the_trials_own_steps(tmp_path):
    """The sweep's study and pruner, a real MLflow store: val_loss (not loss) decides, and
    the warm-up is a quarter of the trial's own train.steps (8 here), not the base config's (400)."""
    from diffusion.config import merge_params, parse_params
    from flows.pruning import VAL_LOSS_METRIC, PruningReporter
    from flows.reporting import mlflow_client
    from flows.study import open_study

    raw = full_params({"train": {"steps": 400}, "sweep": {"space": {"train.steps": {"type": "int", "low": 8, "high": 400}}}})
    study = open_study(parse_params(raw).sweep, tmp_path, "prune", None, concurrency=1)
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("prune")

    def reporter_of(trial, steps: int) -> tuple[PruningReporter, str]:
        run_id = client.create_run(exp).info.run_id
        train_steps = parse_params(merge_params(raw, {"train.steps": steps})).train.steps
        return PruningReporter.for_trial(trial, client, run_id, train_steps), run_id

    for _ in range(2):  # the pruner's startup trials, val_loss 1.0 at every step
        trial = study.ask()
        reporter, run_id = reporter_of(trial, 8)
        log_points(client, run_id, VAL_LOSS_METRIC, {step: 1.0 for step in range(1, 9)})
        log_points(client, run_id, "loss", {step: 100.0 for step in range(1, 9)})
        assert reporter() is False
        study.tell(trial, 1.0)

    trial = study.ask()
    reporter, run_id = reporter_of(trial, 8)
    assert reporter.warmup_steps == 2
    log_points(client, run_id, "loss", {step: 0.001 for step in range(1, 9)})  # the raw loss would look best
    log_points(client, run_id, VAL_LOSS_METRIC, {1: 5.0})
    assert reporter() is False  # step 1 is before the trial's warm-up...
    assert trial.should_prune()  # ...though the pruner, asked, would prune it
    assert reporter() is False  # no new point, no question
    log_points(client, run_id, VAL_LOSS_METRIC, {2: 5.0})
    assert reporter() is True
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 5.0, 2: 5.0}


def test_a_pruned_trial_stops_its_command(tmp_path):
    """val_loss that the pruner rejects stops the running command within a poll or two."""
    import optuna

    from flows.commands import command_env, run_command
    from flows.pruning import VAL_LOSS_METRIC, PruningReporter
    from flows.reporting import mlflow_client

    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("stop")).info.run_id
    log_points(client, run_id, VAL_LOSS_METRIC, {2: 5.0, 4: 5.0})
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    reporter = PruningReporter.for_trial(trial, client, run_id, train_steps=8)
    start = time.monotonic()
    outcome = run_command(
        [sys.executable, "-c", "import time; print('training', flush=True); time.sleep(60)"],
        cwd=ROOT, env=command_env(ROOT), log=lambda line: None, watch=reporter, every=0.2, grace=5,
    )
    assert outcome.stopped and outcome.returncode != 0
    assert outcome.tail.splitlines()[0] == "training" and outcome.tail.endswith("KeyboardInterrupt")  # SIGINT
    assert time.monotonic() - start < 15
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {2: 5.0, 4: 5.0}


# ---------------------------------------------------------------------------
# A real sweep under the harness
# ---------------------------------------------------------------------------

# A three-stage stand-in for the pipeline, seconds per trial: train records its MLflow
# run, GPU and CPU threads and sleeps, so that concurrent trials overlap; evaluate's
# "fid" is 100 / sample.steps.
TOY_DVC_YAML = """
stages:
  prepare: {cmd: python toy.py prepare, params: [data], outs: [data/x.txt]}
  train: {cmd: python toy.py train, deps: [data/x.txt], params: [train], outs: [models/run.json]}
  evaluate:
    cmd: python toy.py evaluate
    deps: [models/run.json]
    params: [sample]
    metrics: [{metrics/evaluate.json: {cache: false}}]
"""
TOY_PY = """
import json, os, sys, time, yaml
params = yaml.safe_load(open("params.yaml"))
stage = sys.argv[1]
for d in ("data", "models", "metrics"):
    os.makedirs(d, exist_ok=True)
if stage == "prepare":
    open("data/x.txt", "w").write("x")
elif stage == "train":
    start = time.time()
    time.sleep(4)
    json.dump({"run_id": os.environ["MLFLOW_RUN_ID"], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "threads": [os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")],
               "start": start, "end": time.time()}, open("models/run.json", "w"))
else:
    json.dump({"fid": 100.0 / params["sample"]["steps"]}, open("metrics/evaluate.json", "w"))
"""


def make_toy_repo(repo: Path, params: dict) -> Path:
    """A git + DVC repository of the toy pipeline with ``params`` over the committed params."""
    repo.mkdir()
    (repo / "dvc.yaml").write_text(TOY_DVC_YAML)
    (repo / "toy.py").write_text(TOY_PY)
    (repo / ".gitignore").write_text("/mlflow/\n/.optuna/\n")
    (repo / "params.yaml").write_text(json.dumps(full_params(params)))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@localhost"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "toy"]):
        run_in(repo, *cmd)
    return repo


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_concurrent_two_objective_sweep(device, prefect_harness, tmp_path, monkeypatch):
    """Two trials at once; FID vs sampling cost, a Pareto front and its plot.

    gpu: the worker owns GPUs 0,1,2 and another process holds 0, so the trials lease 1
    and 2. cpu: no GPUs, so each trial gets half the cores' threads.
    """
    from mlflow import MlflowClient

    from flows.devices import available_cores
    from flows.sweep import train_sweep
    from test_concurrency import Holder

    params = {"data": {"seed": 0}, "train": {"lr": 0.001}, "sample": {"steps": 5},
              "sweep": {"study_name": "toy", "concurrency": 2, "objectives": ["fid", "sampling_cost"],
                        "space": {"sample.steps": {"type": "categorical", "choices": [2, 5]},
                                  "train.lr": {"type": "float", "low": 0.0001, "high": 0.01, "log": True}}}}
    repo = make_toy_repo(tmp_path / "toy", params)
    uri = f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    leases = tmp_path / "leases"
    monkeypatch.setenv("DIFFUSION_GPU_LEASE_DIR", str(leases))
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(threads, raising=False)
    other = None
    if device == "gpu":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
        other = Holder("0", "another flow run", leases)
        assert other.gpu() == "0"
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    enqueue = [{"sample.steps": 2, "train.lr": 0.001}, {"sample.steps": 5, "train.lr": 0.002}]
    try:
        summary = train_sweep(n_trials=2, enqueue=enqueue, repo=str(repo))
    finally:
        if other is not None:
            other.release()

    assert summary["trials"] == {0: "COMPLETE", 1: "COMPLETE"}
    front = sorted(tuple(best["values"].values()) for best in summary["best"])
    assert front == [(20.0, 10.0), (50.0, 4.0)]  # neither dominates: both on the Pareto front (2 passes a guided step)
    assert {"toy-0", "toy-1"} <= experiment_names(repo)

    import dvc.api

    trained = [json.loads(dvc.api.read("models/run.json", repo=str(repo), rev=f"toy-{n}")) for n in (0, 1)]
    if device == "gpu":
        assert {t["gpu"] for t in trained} == {"1", "2"}  # one free GPU each
        assert all(t["threads"] == [None, None] for t in trained)
    else:
        share = str(max(1, available_cores() // 2))
        assert [(t["gpu"], t["threads"]) for t in trained] == [(None, [share, share])] * 2
    assert trained[0]["start"] < trained[1]["end"] and trained[1]["start"] < trained[0]["end"]  # at once
    client = MlflowClient(uri)
    # the default's guidance (w = 2) costs two passes a step
    assert {client.get_run(t["run_id"]).data.metrics["sampling_cost"] for t in trained} == {4.0, 10.0}
    plots = {a.path for a in client.list_artifacts(summary["parent_run_id"], "optuna")}
    assert {"optuna/history.html", "optuna/pareto_front.html"} <= plots
    pareto = plotly_traces(client, summary["parent_run_id"], "optuna/pareto_front.html", tmp_path)
    assert sorted(point for trace in pareto for point in zip(trace["x"], trace["y"])) == front


class Messages(logging.Handler):
    """The messages of the records a logger handles, each once (whether or not it propagates)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_an_unconditional_sweep_drops_the_guidance_dimension(prefect_harness, tmp_path, monkeypatch):
    """model.conditioning is none: sample.guidance_scale is not searched, and one log line says why."""
    from mlflow import MlflowClient

    from flows.sweep import train_sweep

    params = {"model": {"conditioning": "none"}, "sample": {"steps": 5, "guidance_scale": 1.0},
              "sweep": {"study_name": "plain", "concurrency": 1, "space": {
        "sample.steps": {"type": "categorical", "choices": [2]},
        "sample.guidance_scale": {"type": "float", "low": 1.0, "high": 6.0}}}}
    repo = make_toy_repo(tmp_path / "toy", params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    flow_log, logged = logging.getLogger("prefect.flow_runs"), Messages()  # the flow's own log
    flow_log.addHandler(logged)
    try:
        summary = train_sweep(n_trials=1, repo=str(repo))
    finally:
        flow_log.removeHandler(logged)
    why = "classifier-free guidance needs a conditional model, and model.conditioning is none"
    assert summary["trials"] == {0: "COMPLETE"} and summary["dropped"] == {"sample.guidance_scale": why}
    assert [m for m in logged.messages if "dropped" in m] == [f"sweep.space: sample.guidance_scale dropped: {why}"]
    assert _study(repo, "plain").trials[0].params == {"sample.steps": 2}
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(summary["parent_run_id"])
    assert list(json.loads(parent.data.tags["sweep.space"])) == ["sample.steps"]


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """PREFECT_HOME and the Prefect database in tmp: importing prefect creates the home."""
    home = tmp_path_factory.mktemp("prefect-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_HOME", str(home))
    patch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    yield home
    patch.undo()


@pytest.fixture(autouse=True)
def _no_prefect_home_outside_tmp(prefect_home):
    """Every test here (flows import prefect) runs with the session's tmp PREFECT_HOME."""


@pytest.fixture(scope="session")
def prefect_harness(prefect_home):
    """A throwaway Prefect API (a temporary server and database) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory, shared_cache):
    """Two runs of train-sweep: trials 0-2 (one fails), then trial 3 continues the study."""
    repo = make_sweep_repo(tmp_path_factory.mktemp("sweep") / "repo", shared_cache)
    uri = f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    from flows.sweep import train_sweep

    try:
        start = time.monotonic()
        first = train_sweep(n_trials=3, enqueue=FIRST_RUN, repo=str(repo), return_state=True)
        second = train_sweep(n_trials=1, enqueue=[{"sample.steps": 2}], repo=str(repo), return_state=True)
        print(f"sweep: 4 trials in {time.monotonic() - start:.0f} s")
        yield {"repo": repo, "uri": uri, "first": first, "second": second}
    finally:
        patch.undo()


def _study(repo: Path, name: str = STUDY):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(repo / ".optuna" / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def test_sweep_completes_despite_a_failed_trial(swept):
    assert swept["first"].is_completed(), swept["first"].message
    assert swept["second"].is_completed(), swept["second"].message
    summary = swept["first"].result()
    assert summary["trials"] == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    assert summary["best"][0]["number"] in (0, 2)


def test_trials_are_in_optuna_storage(swept):
    study = _study(swept["repo"])
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # the second run continued the study
    assert [t.params["sample.steps"] for t in study.trials] == [2, 1000, 4, 2]
    assert all(t.user_attrs["mlflow_run_id"] for t in study.trials)
    # Trial 0 trained: Optuna holds every val_loss point of its run (the last ones reported after the run).
    from mlflow import MlflowClient

    from flows.pruning import VAL_LOSS_METRIC

    history = MlflowClient(swept["uri"]).get_metric_history(study.trials[0].user_attrs["mlflow_run_id"], VAL_LOSS_METRIC)
    assert study.trials[0].intermediate_values == {m.step: m.value for m in history}


def test_trials_are_dvc_experiments(swept):
    shown = experiments(swept["repo"])
    assert {f"{STUDY}-0", f"{STUDY}-2", f"{STUDY}-3"} <= set(shown)
    assert f"{STUDY}-1" not in shown  # a failed experiment is not saved
    # Each experiment commit carries its metrics (metrics/ is not git-ignored): the FID
    # that `dvc exp show` lists is the value Optuna was told.
    study = _study(swept["repo"])
    for number in (0, 2, 3):
        fid = shown[f"{STUDY}-{number}"]["metrics/evaluate.json"]["data"]["fid"]
        assert fid == pytest.approx(study.trials[number].values[0], rel=1e-12)


def test_trials_are_nested_mlflow_runs(swept, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(swept["uri"])
    study = _study(swept["repo"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials}
    for number, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["sweep.trial"] == str(number)
        assert json.loads(run.data.tags["sweep.param.sample.steps"]) == study.trials[number].params["sample.steps"]
    assert [runs[n].info.status for n in range(4)] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    assert runs[1].data.tags["sweep.state"] == "FAIL"
    # Trial 0 trained; trials 2 and 3 restored its model from DVC's run cache.
    assert "loss" in runs[0].data.metrics
    assert runs[2].data.tags["train.model_run_id"] == runs[0].info.run_id
    assert runs[3].data.tags["train.model_run_id"] == runs[0].info.run_id
    for n in (0, 2, 3):
        assert runs[n].data.metrics["fid"] == pytest.approx(study.trials[n].values[0])
    plots = {a.path for a in client.list_artifacts(parent, "optuna")}
    assert {"optuna/history.html", "optuna/parallel_coordinates.html", "optuna/trials.csv"} <= plots
    # The plots draw the study's complete trials: trial number against FID, and a line per trial
    # through its FID and sample.steps (hover labels, Optuna's 3 significant digits).
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    history = plotly_traces(client, parent, "optuna/history.html", tmp_path)[0]
    assert history["name"] == "fid" and history["x"] == [0, 2, 3]
    assert history["y"] == pytest.approx([t.values[0] for t in complete], rel=1e-12)
    lines = plotly_traces(client, parent, "optuna/parallel_coordinates.html", tmp_path)
    assert sorted(trace["customdata"] for trace in lines if "customdata" in trace) == sorted(
        [["fid", f"{t.values[0]:.3g}"], ["sample.steps", f"{t.params['sample.steps']:.3g}"]] for t in complete
    )


def test_promotion_follows_fid_under_one_protocol(swept):
    """CLI, flow and library promote alike; champion moves only to a lower FID measured
    under the same protocol: trials 0 and 3 (2 sampler steps) tie, trial 2 took 4 steps."""
    import torch
    from mlflow import MlflowClient

    from diffusion import registry
    from flows.promote import promote

    repo, uri = swept["repo"], swept["uri"]
    study = _study(repo)
    runs = {t.number: t.user_attrs["mlflow_run_id"] for t in study.trials}

    cli = run_in(repo, "diffusion", "promote", "--name", STUDY, "--run-id", runs[0])
    assert "challenger and champion: there was no champion" in cli.stdout
    tie = registry.promote(STUDY, run_id=runs[3], tracking_uri=uri)
    assert tie.fid == pytest.approx(study.trials[0].values[0])  # the same samples
    assert not tie.champion and tie.message.endswith("which it does not beat")
    other = registry.promote(STUDY, run_id=runs[2], tracking_uri=uri)
    assert not other.champion
    assert other.message.endswith("whose FID was measured under another protocol: steps 4 (vs 2)")

    flowed = promote(name=STUDY, study=STUDY, repo=str(repo))  # the best trial: already registered
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    assert flowed["fid"] == pytest.approx(best.values[0])
    assert flowed["champion"] is (flowed["run_id"] == runs[0])

    client = MlflowClient(uri)
    versions = {v.tags["source_run"]: v.version for v in client.search_model_versions(f"name = '{STUDY}'")}
    assert set(versions) == {runs[0], runs[2], runs[3]}  # one version per promoted run
    assert client.get_model_version_by_alias(STUDY, "challenger").version == flowed["version"] == versions[flowed["run_id"]]
    champion = client.get_model_version_by_alias(STUDY, "champion")
    assert champion.version == versions[runs[0]] and champion.tags["fid.protocol.steps"] == "2"
    assert float(champion.tags["fid"]) == pytest.approx(study.trials[0].values[0])

    model = registry.load_model(f"models:/{STUDY}@champion", tracking_uri=uri)
    assert model.sampling["steps"] == 2
    samples = model(torch.randn(1, 1, 28, 28))
    assert samples.shape == (1, 1, 28, 28) and torch.isfinite(samples).all()


def test_a_sweep_over_the_guidance_scale_of_a_text_conditional_model(prefect_harness, tmp_path_factory, shared_cache):
    """train-sweep of the tiny config made text-conditional (captions dropped to the empty one
    with train.p_uncond) on two objectives, FID and text_error: trials at guidance scales 1 and
    3, the second restoring train from DVC's run cache, each FID recorded with the scale that
    drew its images and each trial's text error from its evaluate stage."""
    import dvc.api
    from mlflow import MlflowClient

    from diffusion.packaged import PackagedDiffusion
    from flows.sweep import train_sweep

    scale = "sample.guidance_scale"
    params = {**SWEEP_PARAMS, "model": {**SWEEP_PARAMS["model"], "conditioning": "text"},
              "text": {"overrides": {"width": 32, "depth": 1, "heads": 2, "max_length": 40}},
              "train": {**SWEEP_PARAMS["train"], "p_uncond": 0.2},
              "sweep": {**SWEEP_PARAMS["sweep"], "study_name": "guided", "objectives": ["fid", "text_error"],
                        "space": {scale: {"type": "float", "low": 1.0, "high": 6.0}}}}
    root = tmp_path_factory.mktemp("guided")
    repo = make_sweep_repo(root / "repo", shared_cache, params)
    uri = f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    try:
        summary = train_sweep(n_trials=2, enqueue=[{scale: 1.0}, {scale: 3.0}], repo=str(repo))
    finally:
        patch.undo()

    assert summary["trials"] == {0: "COMPLETE", 1: "COMPLETE"} and summary["dropped"] == {}
    trials = _study(repo, "guided").trials
    assert [t.params[scale] for t in trials] == [1.0, 3.0]
    shown, client = experiments(repo), MlflowClient(uri)
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    for trial, run in zip(trials, runs):
        metrics = shown[f"guided-{trial.number}"]
        assert metrics["metrics/protocol.json"]["data"]["guidance_scale"] == trial.params[scale]
        assert metrics["metrics/evaluate.json"]["data"]["fid"] == pytest.approx(trial.values[0], rel=1e-12)
        assert metrics["metrics/evaluate.json"]["data"]["text_error"] == pytest.approx(trial.values[1], rel=1e-12)
        assert run.data.tags["fid.protocol.guidance_scale"] == json.dumps(trial.params[scale])
        assert run.data.metrics["fid"] == pytest.approx(trial.values[0])
    assert trials[0].values != trials[1].values  # guidance drew other images
    assert runs[1].data.tags["train.model_run_id"] == runs[0].info.run_id  # one training for both
    model_file = root / "model.pt"
    model_file.write_bytes(dvc.api.read("models/model.pt", repo=str(repo), rev="guided-0", mode="rb"))
    model = PackagedDiffusion.load(model_file)
    assert model.conditioning == "text" and model.model_spec["text_encoder"]["name"] == "char-transformer"


def test_train_pipeline_runs_each_stage_as_a_task(prefect_harness, tmp_path_factory, shared_cache):
    """train-pipeline in a repo whose stages all restore from the shared run cache."""
    from flows.pipeline import train_pipeline

    repo = make_sweep_repo(tmp_path_factory.mktemp("pipeline") / "repo", shared_cache)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    try:
        ran = train_pipeline(repo=str(repo))
        assert ran == [f"dvc repro --single-item {stage}" for stage in (
            "validate", "prepare", "train_vae", "encode", "encode_text", "train_classifier", "train", "fit_schedule",
            "train_digit_classifier", "sample", "evaluate",
        )]
        assert json.loads((repo / "metrics" / "evaluate.json").read_text())["fid"] > 0
        ran = train_pipeline(params={"sample.steps": 4}, name="from-flow", repo=str(repo))
        assert ran == ["dvc exp run --temp --name from-flow -S sample.steps=4"]
        assert "from-flow" in experiment_names(repo)
        state = train_pipeline(params={"sample.steps": 1000}, retries=0, repo=str(repo), return_state=True)
        assert state.is_failed()  # a failed command fails the task and the flow
    finally:
        patch.undo()
