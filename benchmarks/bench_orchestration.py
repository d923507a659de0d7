"""Orchestration overhead: one sweep trial through Prefect, DVC and Optuna against the bare stages.

The same tiny trial (train, sample, evaluate; prepare is done once beforehand) runs
five ways, each in a fresh copy of one prepared repository, so every way trains
from scratch (its own checkpoints, DVC cache and MLflow store):

    direct      one Python process calls ``diffusion.stages.<stage>.run(params)``
    cli         ``diffusion train``, ``sample``, ``evaluate``: a process per stage
    dvc         ``dvc exp run --temp`` under an MLflow run that the caller owns, as a trial does
    flow        ``train_sweep(n_trials=1)`` in this process against a real Prefect server
    deployment  ``prefect deployment run 'train-sweep/train-sweep' --watch``, picked up by a process worker

Each way is timed in wall seconds and in CPU seconds (its processes' user + system
time, the Prefect server's and worker's included): on a machine shared with other
jobs, wall time swings with their load and CPU time hardly does. The overhead of a
way is its time minus ``direct``'s, as a share of ``direct``'s. For ``flow`` and
``deployment`` the trial's own MLflow run says how long the trial itself took; the
rest is per-sweep cost (flow start, study, parent run, plots; for ``deployment``
also the worker's pick-up and the flow process's start). A worker runs many flow
runs, so its own start is not counted. The ways run one after another and the order rotates by round, so that
load from other jobs on a shared machine spreads over all of them. The figure for
each way is the median over rounds.

    python benchmarks/bench_orchestration.py                 # 1 round, the test suite's tiny config
    python benchmarks/bench_orchestration.py --rounds 3 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from diffusion.config import merge_params
from diffusion.tracking import default_tracking_uri
from flows.commands import BIN
from flows.commands import QUIET as COMMAND_QUIET

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("direct", "cli", "dvc", "flow", "deployment")
QUIET = {**COMMAND_QUIET, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2")}  # as the Makefile's


def tiny_params(steps: int) -> dict:
    """tests/conftest.py's TINY_PARAMS, with a one-point sweep space (the trial is the base config)."""
    return {
        "data": {"source": "mnist5k", "image_size": 28, "holdout": 16, "reference_images": 48},
        "model": {"name": "unet-tiny"},
        "train": {"steps": steps, "batch_size": 16, "warmup_steps": 5, "checkpoint_every": 10, "log_every": 5,
                  "bpd_images": 2},
        "sample": {"num_samples": 48, "batch_size": 48, "steps": 5, "grid_rows": 4},
        "evaluate": {"batch_size": 48},
        "diffusion": {"timesteps": 100},
        "sweep": {"study_name": "bench", "n_trials": 1, "space": {"sample.steps": {"type": "categorical", "choices": [5]}}},
    }


def env_for(repo: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["MLFLOW_TRACKING_URI"] = default_tracking_uri(repo)
    env.pop("MLFLOW_RUN_ID", None)
    env.update(extra)
    return env


def sh(cmd: list[str], repo: Path, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=repo, env=env or env_for(repo), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def template_repo(path: Path, params: dict) -> Path:
    """git + DVC repo with dvc.yaml, diffusion/, flows/, prefect.yaml, tiny params; prepare done."""
    path.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(ROOT / name, path / name)
    for tree in ("diffusion", "flows"):
        shutil.copytree(ROOT / tree, path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    (path / "params.yaml").write_text(yaml.safe_dump(merge_params(committed, params)))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@localhost"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"], ["dvc", "repro", "prepare"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "prepared"]):
        sh(cmd, path)
    return path


def fresh(template: Path, parent: Path, name: str) -> Path:
    repo = parent / name
    shutil.copytree(template, repo, symlinks=True)
    return repo


# ---------------------------------------------------------------------------
# The five ways
# ---------------------------------------------------------------------------

DIRECT = """
from diffusion.config import load_params
from diffusion.stages import evaluate, sample, train
params = load_params("params.yaml")
for stage in (train, sample, evaluate):
    stage.run(params)
"""


def run_direct(repo: Path, ctx: dict) -> None:
    sh([sys.executable, "-c", DIRECT], repo)


def run_cli(repo: Path, ctx: dict) -> None:
    for stage in ("train", "sample", "evaluate"):
        sh(["diffusion", stage], repo)


def run_dvc(repo: Path, ctx: dict) -> None:
    from diffusion import tracking
    from flows.reporting import mlflow_client

    env = env_for(repo)
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    run = client.create_run(tracking.experiment_id("diffusion", env["MLFLOW_TRACKING_URI"]), run_name="bench-dvc")
    env["MLFLOW_RUN_ID"] = run.info.run_id
    sh(["dvc", "exp", "run", "--temp", "--name", "bench-dvc"], repo, env)
    client.set_terminated(run.info.run_id)


def run_flow(repo: Path, ctx: dict) -> None:
    sh([sys.executable, "-c", f"from flows.sweep import train_sweep; train_sweep(repo={str(repo)!r})"],
       repo, env_for(repo, **ctx["prefect_env"]))


def run_deployment(repo: Path, ctx: dict) -> None:
    import psutil

    env = env_for(repo, **ctx["prefect_env"])
    prefect = str(BIN / "prefect")
    sh([prefect, "--no-prompt", "deploy", "--name", "train-sweep"], repo, env)  # once per deployment: untimed
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
                              cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    services = [*ctx["services"], psutil.Process(worker.pid)]
    try:
        time.sleep(5)  # a worker runs for many flow runs: its start is not the trial's
        ctx["clock"], ctx["cpu0"] = time.perf_counter(), cpu_seconds(services)
        out = sh([prefect, "deployment", "run", "train-sweep/train-sweep", "--watch", "--watch-interval", "2"], repo, env)
        ctx["end"] = (time.perf_counter(), cpu_seconds(services))
        if "finished successfully in 'Completed'" not in out.stdout:
            raise RuntimeError(out.stdout[-3000:])
    finally:
        stop(worker)


def cpu_seconds(services: list) -> float:
    """CPU time of every finished child of this process (with theirs), plus the services' so far.

    CPU time, unlike wall time, hardly moves with other jobs' load on a shared machine.
    """
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime
    for proc in services:
        t = proc.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def trial_seconds(repo: Path) -> float:
    """How long the sweep's trial ran (its MLflow run): the rest of a flow is per-sweep cost."""
    from mlflow import MlflowClient

    client = MlflowClient(default_tracking_uri(repo))
    exp = client.get_experiment_by_name("diffusion")
    (run,) = client.search_runs([exp.experiment_id], "tags.`sweep.trial` = '0'")
    return (run.info.end_time - run.info.start_time) / 1000


RUNNERS = {"direct": run_direct, "cli": run_cli, "dvc": run_dvc, "flow": run_flow, "deployment": run_deployment}


# ---------------------------------------------------------------------------
# A real Prefect server for the flow and deployment ways
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def prefect_server(home: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                            env={**os.environ, **QUIET, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5):
                break
        except OSError:
            time.sleep(1)
    else:
        stop(proc)
        raise RuntimeError("the Prefect server did not start")
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"],
                   env={**os.environ, **QUIET, **env}, capture_output=True, check=True)
    return proc, env


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="training steps of the trial (default: 30, the tests' tiny config)")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args(argv)

    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")  # importing prefect (flows) creates it
    server = None
    walls: dict[str, list[float]] = {way: [] for way in args.ways}
    cpus: dict[str, list[float]] = {way: [] for way in args.ways}
    trials: dict[str, list[float]] = {way: [] for way in ("flow", "deployment") if way in args.ways}
    try:
        template = template_repo(work / "template", tiny_params(args.steps))
        ctx: dict = {"services": []}
        if {"flow", "deployment"} & set(args.ways):
            server, ctx["prefect_env"] = prefect_server(work / "prefect-home")
            import psutil

            ctx["services"] = [psutil.Process(server.pid)]
        for round_ in range(args.rounds):
            order = args.ways[round_ % len(args.ways):] + args.ways[: round_ % len(args.ways)]
            for way in order:
                repo = fresh(template, work, f"{way}-{round_}")
                # The Prefect server's CPU counts for the ways that use it (it idles through the rest).
                services = ctx["services"] if way in ("flow", "deployment") else []
                ctx.update(clock=time.perf_counter(), cpu0=cpu_seconds(services))
                RUNNERS[way](repo, ctx)
                end, cpu = ctx.pop("end", None) or (time.perf_counter(), cpu_seconds(services))
                walls[way].append(end - ctx["clock"])
                cpus[way].append(cpu - ctx["cpu0"])
                note = ""
                if way in trials:
                    trials[way].append(trial_seconds(repo))
                    note = f"  (its trial {trials[way][-1]:.1f} s wall)"
                print(f"round {round_}: {way:<10} {walls[way][-1]:7.1f} s wall {cpus[way][-1]:7.1f} s CPU{note}"
                      f"  load {os.getloadavg()[0]:.1f}", flush=True)
                shutil.rmtree(repo, ignore_errors=True)
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)

    result: dict[str, dict] = {}
    base = {kind: statistics.median(series["direct"]) for kind, series in (("wall", walls), ("cpu", cpus))} \
        if "direct" in walls else None
    print(f"\n{'way':<11} {'wall s':>8} {'overhead':>9} {'CPU s':>8} {'overhead':>9} {'CPU overhead %':>15}")
    for way in args.ways:
        wall, cpu = statistics.median(walls[way]), statistics.median(cpus[way])
        result[way] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        if base:
            result[way] |= {"wall_overhead_s": round(wall - base["wall"], 1), "cpu_overhead_s": round(cpu - base["cpu"], 1),
                            "cpu_overhead_pct": round(100 * (cpu - base["cpu"]) / base["cpu"], 1)}
            print(f"{way:<11} {wall:8.1f} {wall - base['wall']:9.1f} {cpu:8.1f} {cpu - base['cpu']:9.1f} "
                  f"{100 * (cpu - base['cpu']) / base['cpu']:14.1f}%")
        if way in trials:
            result[way]["trial_wall_s"] = round(statistics.median(trials[way]), 1)
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "ways": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
