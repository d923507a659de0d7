"""Integration: prefect.yaml deployed to a real Prefect server, run by a process worker.

Starts a Prefect server, an MLflow server and a process worker on free localhost
ports, deploys from the repository's prefect.yaml, runs the ``train-sweep``
deployment with two tiny trials through the CLI, and waits for COMPLETED. Everything
it starts runs in its own process group and is stopped in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, ROOT, pipeline_env
from test_flows import SWEEP_PARAMS, make_sweep_repo, shared_cache

pytestmark = pytest.mark.integration

STUDY = "deployed"
# test_flows's config with another training seed and no model logged: prepare comes
# from the shared run cache, train runs here (its model would otherwise be found, by
# run cache, in a store that test_flows cannot read).
DEPLOY_PARAMS = {
    **SWEEP_PARAMS,
    "train": {**SWEEP_PARAMS["train"], "seed": 1},
    "tracking": {"log_model": False},
    "sweep": {
        "study_name": STUDY,
        "n_trials": 4,
        "concurrency": 1,
        # One point: trial 0 runs the pipeline, trial 1 is the same experiment again and
        # comes whole from DVC's run cache (its FID from the experiment's metrics).
        "space": {"sample.steps": {"type": "categorical", "choices": [3]}},
    },
}


# Make's targets from a test repository, with this checkout's venv, which is installed.
MAKE = ["make", "-s", "-f", str(ROOT / "Makefile"), f"VENV={ROOT / '.venv'}", "-o", str(ROOT / ".venv" / ".installed")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], *, env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A service in its own process group, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url}: not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def flow_run_id(out: str) -> str | None:
    """The id of the flow run that ``prefect deployment run`` printed it created, or None."""
    found = re.search(r"UUID: ([0-9a-f-]{36})", out)
    return found.group(1) if found else None


def cli(cmd: list[str], *, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_sweep_deployment_runs_on_a_process_worker(tmp_path_factory):
    """SQLite stores, one worker, started at the same moment as `make deploy` (which must not race it)."""
    base = tmp_path_factory.mktemp("deployment")
    repo = make_sweep_repo(base / "repo", shared_cache(tmp_path_factory), DEPLOY_PARAMS)
    prefect_port, mlflow_port = free_port(), free_port()
    env = pipeline_env(repo)
    env.update(
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{base / 'prefect.db'}",
        PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
    )
    prefect, mlflow = str(BIN / "prefect"), str(BIN / "mlflow")
    procs: list[subprocess.Popen] = []
    try:
        server_log, mlflow_log, worker_log = base / "prefect-server.log", base / "mlflow-server.log", base / "worker.log"
        procs.append(start(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--no-ui"],
            env=env, cwd=base, log=server_log,
        ))
        procs.append(start(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "artifacts")],
            env=env, cwd=base, log=mlflow_log,
        ))
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], server_log)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs[1], mlflow_log)

        # The worker (which creates the pool) and `make deploy` at the same moment.
        procs.append(start([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
                           env=env, cwd=repo, log=worker_log))
        deployed = cli([*MAKE, f"PREFECT_PORT={prefect_port}", "deploy"], env=env, cwd=repo, timeout=180)
        assert "train-sweep/train-sweep" in deployed.stdout

        start_run = time.monotonic()
        run = subprocess.run(
            [prefect, "deployment", "run", "train-sweep/train-sweep", "-p", "n_trials=2",
             "--watch", "--watch-interval", "5", "--watch-timeout", "480"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=540,
        )
        print(f"train-sweep deployment: 2 trials in {time.monotonic() - start_run:.0f} s")
        flow_run = flow_run_id(run.stdout)
        assert run.returncode == 0 and flow_run, (
            f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\nworker log:\n{worker_log.read_text()[-6000:]}"
        )
        inspected = cli([prefect, "flow-run", "inspect", flow_run, "--output", "json"], env=env, cwd=repo)
        assert json.loads(inspected.stdout)["state"]["type"] == "COMPLETED"

        from mlflow import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("diffusion")
        runs = client.search_runs([exp.experiment_id], f"tags.`sweep.study` = '{STUDY}'")
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        trials = [r for r in runs if "sweep.trial" in r.data.tags]
        assert len(parents) == 1 and len(trials) == 2
        assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
        assert all(r.info.status == "FINISHED" and r.data.metrics["fid"] > 0 for r in trials)
        first, second = sorted(trials, key=lambda r: int(r.data.tags["sweep.trial"]))
        assert second.data.tags["train.model_run_id"] == first.info.run_id
        assert second.data.metrics["fid"] == first.data.metrics["fid"]
    finally:
        for proc in reversed(procs):
            stop(proc)
