"""Orchestration overhead: one sweep trial through Prefect, DVC and Optuna against the bare stages.

The same tiny trial (train, sample, evaluate; prepare is done once beforehand) runs
five ways, each in a fresh copy of one prepared repository, so every way trains
from scratch (its own checkpoints, DVC cache and MLflow store):

    direct      one Python process calls ``diffusion.stages.<stage>.run(params)``
    cli         ``diffusion train``, ``sample``, ``evaluate``: a process per stage
    dvc         ``dvc exp run --temp`` under an MLflow run that the caller owns, as a trial does
    flow        ``train_sweep(n_trials=1)`` in this process against a real Prefect server
    deployment  ``prefect deployment run 'train-sweep/train-sweep' --watch``, picked up by a process worker

The overhead of a way is its wall time minus ``direct``'s, as a share of
``direct``'s. For ``flow`` and ``deployment`` the trial's own MLflow run says how
long the trial took; the rest is per-sweep cost (flow start, study, parent run,
plots; for ``deployment`` also the worker's pick-up and the flow process's start). The ways run one after another and the order rotates by round, so that
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAYS = ("direct", "cli", "dvc", "flow", "deployment")
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


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
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
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
    (path / "params.yaml").write_text(yaml.safe_dump(params))
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
    from flows.sweep import experiment_id, mlflow_client

    env = env_for(repo)
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    run = client.create_run(experiment_id(client, "diffusion", env["MLFLOW_TRACKING_URI"]), run_name="bench-dvc")
    env["MLFLOW_RUN_ID"] = run.info.run_id
    sh(["dvc", "exp", "run", "--temp", "--name", "bench-dvc"], repo, env)
    client.set_terminated(run.info.run_id)


def run_flow(repo: Path, ctx: dict) -> None:
    sh([sys.executable, "-c", f"from flows.sweep import train_sweep; train_sweep(repo={str(repo)!r})"],
       repo, env_for(repo, **ctx["prefect_env"]))


def run_deployment(repo: Path, ctx: dict) -> None:
    env = env_for(repo, **ctx["prefect_env"])
    prefect = str(BIN / "prefect")
    sh([prefect, "--no-prompt", "deploy", "--name", "train-sweep"], repo, env)  # untimed below
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
                              cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        time.sleep(5)  # the worker's first poll
        ctx["clock"] = time.perf_counter()
        out = sh([prefect, "deployment", "run", "train-sweep/train-sweep", "--watch", "--watch-interval", "2"], repo, env)
        if "finished successfully in 'Completed'" not in out.stdout:
            raise RuntimeError(out.stdout[-3000:])
    finally:
        stop(worker)


def trial_seconds(repo: Path) -> float:
    """How long the sweep's trial ran (its MLflow run): the rest of a flow is per-sweep cost."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
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
    times: dict[str, list[float]] = {way: [] for way in args.ways}
    trials: dict[str, list[float]] = {way: [] for way in ("flow", "deployment")}
    try:
        template = template_repo(work / "template", tiny_params(args.steps))
        ctx: dict = {}
        if {"flow", "deployment"} & set(args.ways):
            server, ctx["prefect_env"] = prefect_server(work / "prefect-home")
        for round_ in range(args.rounds):
            order = args.ways[round_ % len(args.ways):] + args.ways[: round_ % len(args.ways)]
            for way in order:
                repo = fresh(template, work, f"{way}-{round_}")
                ctx["clock"] = time.perf_counter()
                RUNNERS[way](repo, ctx)
                times[way].append(time.perf_counter() - ctx["clock"])
                note = ""
                if way in ("flow", "deployment"):
                    trials[way].append(trial_seconds(repo))
                    note = f"  (its trial {trials[way][-1]:.1f} s)"
                print(f"round {round_}: {way:<10} {times[way][-1]:7.1f} s{note}", flush=True)
                shutil.rmtree(repo, ignore_errors=True)
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(times["direct"]) if "direct" in times else None
    result = {}
    print(f"\n{'way':<11} {'median s':>9} {'overhead s':>11} {'overhead %':>11}")
    for way, values in times.items():
        median = statistics.median(values)
        over = median - base if base else float("nan")
        result[way] = {"median_s": round(median, 1), "overhead_s": round(over, 1),
                       "overhead_pct": round(100 * over / base, 1) if base else None}
        print(f"{way:<11} {median:9.1f} {over:11.1f} {100 * over / base if base else float('nan'):10.1f}%")
    for way, values in trials.items():
        if values:
            trial = statistics.median(values)
            result[way]["trial_s"] = round(trial, 1)
            print(f"{way}: its trial {trial:.1f} s, the rest (per sweep) {result[way]['median_s'] - trial:.1f} s")
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "ways": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
