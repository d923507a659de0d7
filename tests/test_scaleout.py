"""Integration: a sweep across two hosts on a real PostgreSQL, and the cluster's faults.

One scenario, every part real: PostgreSQL (:mod:`postgres`), the team MLflow server
of ``make team-server`` on it (basic auth, its own artifact root), the Optuna study on
it, a Prefect server, and two process workers, each in its own clone of one origin
repository ("host A", "host B"), sharing one DVC remote directory and nothing else.

1. Set-up races: worker A starts while ``make deploy`` runs; both succeed, and
   ``make deploy`` and ``dvc remote add -d -f`` run again change nothing. The origin
   has pushed the prepared data to the remote (``flows/remote.py``).
2. Host A runs trial 0, which trains, and pushes its runs to the remote.
3. Runs on A and B at once (two sweeps on one store), capped at ``sweep.max_trials``
   = 3 trials: worker A is killed (SIGKILL) mid-trial, then PostgreSQL and the MLflow
   server are restarted while B's trials run.

Then: the killed trial is FAIL and FAILED and was retried once on B; exactly 3 trials
count; every trial has one MLflow run, in a final state; only trial 0 trained, and
B's trials restored its model from the remote's run cache.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import postgres
from conftest import BIN, ROOT, pipeline_env, run_in
from services import MAKE, cli, flow_run_id, free_port, start, stop, wait_http
from test_flows import SWEEP_PARAMS, make_sweep_repo

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postgres.missing() is not None, reason=str(postgres.missing())),
]

STUDY = "scaleout"
MAX_TRIALS = 3
PASSWORD = "scale-out-test"  # the team server's admin, created at its first start


def scaleout_params(storage: str) -> dict:
    """test_flows's tiny config with another training seed and no model logged (prepare comes
    from the session's shared run cache, train runs here), its study on PostgreSQL: every trial
    differs from trial 0 only in sample.steps, so only trial 0 trains."""
    return {
        **SWEEP_PARAMS,
        "train": {**SWEEP_PARAMS["train"], "seed": 1},
        "tracking": {"log_model": False},
        "sweep": {
            "study_name": STUDY, "n_trials": MAX_TRIALS, "concurrency": 1, "storage": storage, "max_trials": MAX_TRIALS,
            "heartbeat_s": 1, "trial_retries": 1, "pruning": False,
            "space": {"sample.steps": {"type": "categorical", "choices": [2, 3]}},
        },
    }


def clone(origin: Path, path: Path) -> Path:
    """A host's working copy: a git clone with its own (empty) DVC cache."""
    run_in(origin.parent, "git", "clone", "-q", str(origin), str(path))
    return path


def runs_flow(proc: subprocess.Popen, run_id: str) -> bool:
    """Whether ``proc`` (a worker) executes that flow run: a process below it carries its id,
    as the process worker passes it (PREFECT__FLOW_RUN_ID)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and every descendant (the flow run, DVC, the stage)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def trial_runs(client, exp_id: str) -> list:
    return client.search_runs([exp_id], f"tags.`sweep.study` = '{STUDY}' and tags.`sweep.trial` != ''")


def wait_for(what: str, check, timeout: float = 300, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_a_sweep_across_two_hosts_survives_a_killed_worker_and_restarted_servers(tmp_path_factory, monkeypatch, shared_cache):
    import optuna
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("scaleout")
    pg = postgres.Postgres().start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        optuna_url = pg.create_database("optuna")
        origin = make_sweep_repo(base / "origin", shared_cache, scaleout_params(optuna_url))
        remote = base / "dvc-remote"
        for _ in range(2):  # once per repository; again, it changes nothing
            run_in(origin, "dvc", "remote", "add", "-d", "-f", "shared", str(remote))
        run_in(origin, "git", "add", ".dvc/config")
        run_in(origin, "git", "commit", "-qm", "the shared DVC remote")
        # The team's prepared data in the remote (the session's run cache of prepare), as the
        # trials push theirs: trial 0 on host A restores prepare, and trains.
        assert "new outputs pushed" in run_in(origin, str(BIN / "python"), "-m", "flows.remote").stdout
        hosts = {name: clone(origin, base / f"host-{name}") for name in ("A", "B")}

        prefect_port, mlflow_port = free_port(), free_port()
        tracking = f"http://127.0.0.1:{mlflow_port}"
        env = pipeline_env(origin)
        env.update(
            PREFECT_HOME=str(base / "prefect-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{base / 'prefect.db'}",
            PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
            PREFECT_WORKER_QUERY_SECONDS="2",
            MLFLOW_TRACKING_URI=tracking, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD,
        )
        team_env = {
            **env, "MLFLOW_TEAM_HOST": "127.0.0.1", "MLFLOW_TEAM_PORT": str(mlflow_port), "MLFLOW_TEAM_WORKERS": "1",
            "MLFLOW_TEAM_BACKEND_STORE_URI": pg.create_database("mlflow"),
            "MLFLOW_TEAM_ARTIFACTS_DESTINATION": str(base / "artifacts"),
            "MLFLOW_TEAM_AUTH_DATABASE_URI": pg.create_database("mlflow_auth"),
            "MLFLOW_AUTH_CONFIG_PATH": str(base / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "scale-out-test-key",
        }
        prefect = str(BIN / "prefect")
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this test's own client
            monkeypatch.setenv(key, env[key])

        def team_server() -> None:
            procs["mlflow"] = start([*MAKE, "team-server"], env=team_env, cwd=ROOT, log=base / "mlflow-server.log")

        team_server()
        procs["prefect"] = start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--no-ui"],
                                 env=env, cwd=base, log=base / "prefect-server.log")
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs["prefect"], base / "prefect-server.log")
        wait_http(f"{tracking}/health", procs["mlflow"], base / "mlflow-server.log", timeout=240)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError, match="401"):  # the team server asks who you are
            urllib.request.urlopen(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)

        def worker(name: str) -> subprocess.Popen:
            return start([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1",
                          "--name", f"gpu-cpu@host-{name}"], env=env, cwd=hosts[name], log=base / f"worker-{name}.log")

        # 1. The worker (which creates the pool) and `make deploy` at the same moment; deploy again.
        deploy = [*MAKE, "-C", str(hosts["A"]), f"PREFECT_PORT={prefect_port}", "deploy"]
        procs["worker-A"] = worker("A")
        for _ in range(2):
            assert "train-sweep/train-sweep" in cli(deploy, env=env, cwd=hosts["A"], timeout=180).stdout
        procs["worker-B"] = worker("B")
        assert procs["worker-A"].poll() is None, (base / "worker-A.log").read_text()[-3000:]

        def run(name: str, n_trials: int, enqueue: list | None = None, watch: bool = True) -> subprocess.Popen:
            cmd = [prefect, "deployment", "run", "train-sweep/train-sweep", "-p", f"n_trials={n_trials}",
                   "-p", f"repo={hosts[name]}", *(["-p", f"enqueue={json.dumps(enqueue)}"] if enqueue else [])]
            if watch:
                cmd += ["--watch", "--watch-interval", "3", "--watch-timeout", "480"]
            return subprocess.Popen(cmd, cwd=hosts[name], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def finished(proc: subprocess.Popen) -> str:
            out = proc.communicate(timeout=540)[0]
            logs = "\n".join(f"{p.name}:\n{p.read_text()[-4000:]}" for p in sorted(base.glob("worker-*.log")))
            assert proc.returncode == 0 and "finished successfully" in out, f"{out[-3000:]}\n{logs}"
            return flow_run_id(out)

        # 2. Host A trains trial 0 and pushes its runs to the remote.
        start_sweep = time.monotonic()
        finished(run("A", 1, [{"sample.steps": 2}]))
        assert (remote / "runs").is_dir()
        client = MlflowClient(tracking)
        exp_id = client.get_experiment_by_name("diffusion").experiment_id

        # 3. Two sweeps at once; worker A killed mid-trial; PostgreSQL and MLflow restarted.
        on_b = run("B", MAX_TRIALS + 2, [{"sample.steps": 3}])  # the cap stops it
        doomed_run = flow_run_id(run("A", 2, watch=False).communicate(timeout=120)[0])
        victim = wait_for("a trial running on host A", lambda: [
            r for r in trial_runs(client, exp_id)
            if r.info.status == "RUNNING" and r.data.tags["sweep.repo"].endswith(str(hosts["A"]))
        ])[0]
        # Either worker may have taken either run (one pool): kill the one executing host A's run.
        doomed = wait_for("the worker of host A's run", lambda: [
            name for name in ("worker-A", "worker-B") if runs_flow(procs[name], doomed_run)], timeout=60)[0]
        kill_tree(procs.pop(doomed))
        running_on_b = lambda: [r for r in trial_runs(client, exp_id)  # noqa: E731
                                if r.info.status == "RUNNING" and r.data.tags["sweep.repo"].endswith(str(hosts["B"]))]
        wait_for("a trial running on host B", running_on_b)
        pg.restart()
        stop(procs.pop("mlflow"))
        team_server()
        wait_http(f"{tracking}/health", procs["mlflow"], base / "mlflow-server.log", timeout=240)
        finished(on_b)
        print(f"scale-out: {MAX_TRIALS} trials on two hosts in {time.monotonic() - start_sweep:.0f} s")

        # The study: trial 0 and three more complete (the cap), the killed one FAIL and retried once.
        study = optuna.load_study(study_name=STUDY, storage=optuna_url)
        states = {t.number: t.state.name for t in study.trials}
        killed = int(victim.data.tags["sweep.trial"])
        assert states[killed] == "FAIL"
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") is not None]
        # Retried once; the retry may itself have started while the MLflow server was down (a FAIL).
        assert [t.system_attrs["failed_trial"] for t in retries] == [killed]
        # A stage that starts while the MLflow server is down fails at once (a FAIL trial, not a lost one).
        assert list(states.values()).count("COMPLETE") == MAX_TRIALS and set(states.values()) == {"COMPLETE", "FAIL"}, states

        # MLflow: one run per trial, each final; the killed one FAILED; the complete ones carry their FID.
        runs = {int(r.data.tags["sweep.trial"]): r for r in trial_runs(client, exp_id)}
        assert sorted(runs) == sorted(states) and len(trial_runs(client, exp_id)) == len(states)
        assert runs[killed].info.status == "FAILED" and runs[killed].data.tags["sweep.state"] == "FAIL"
        for trial in study.trials:
            if trial.state.name == "COMPLETE":
                assert runs[trial.number].info.status == "FINISHED"
                assert runs[trial.number].data.metrics["fid"] == pytest.approx(trial.values[0])
        assert runs[retries[0].number].data.tags["sweep.retry_of"] == str(killed)
        assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in client.search_runs([exp_id]))

        # One training for the whole sweep: host B restored trial 0's model from the remote's run cache.
        trained = [n for n, r in runs.items() if "loss" in r.data.metrics]
        assert trained == [0] and runs[0].data.tags["sweep.repo"].endswith(str(hosts["A"]))
        on_host_b = [n for n, r in runs.items() if r.data.tags["sweep.repo"].endswith(str(hosts["B"]))]
        assert len(on_host_b) >= 2
        for n in on_host_b:
            if states[n] == "COMPLETE":
                assert runs[n].data.tags["train.model_run_id"] == runs[0].info.run_id
    finally:
        for proc in reversed(list(procs.values())):
            stop(proc)
        pg.stop()
